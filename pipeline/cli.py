"""Command line: `python -m pipeline run job.yaml` (also installed as `wsi-embed`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig, load_config, parse_override


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "manifest", None):
        out["manifest"] = args.manifest
    if getattr(args, "output", None):
        out["output"] = args.output
    if getattr(args, "models", None):
        out["models"] = [{"id": m, "weights": args.weights or "hub"} for m in args.models]
    elif getattr(args, "weights", None):
        raise ConfigError("--weights needs --model (it applies to the models named there)")
    for item in getattr(args, "set", None) or []:
        key, value = parse_override(item)
        out[key] = value
    return out


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="YAML job file")
    p.add_argument("--manifest", help="override `manifest:`")
    p.add_argument("--output", help="override `output:`")
    p.add_argument("--model", dest="models", action="append",
                   help="run only this model (repeatable); replaces `models:`")
    p.add_argument("--weights", help="weights for the --model models ('random', 'hub', a path)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any field, e.g. --set tiling.mpp=0.25 "
                        "--set models.0.batch_size=32")


def _load(args: argparse.Namespace) -> JobConfig:
    return load_config(args.job, _overrides(args))


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import run_job

    cfg = _load(args)
    try:
        record = run_job(cfg, run_id=args.run_id)
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as err:
        from pipeline.manifest import ManifestError
        from pipeline.models.weights import WeightsError
        from pipeline.run import failure_text

        if isinstance(err, (ManifestError, WeightsError)):
            raise
        logging.getLogger("pipeline").debug("the job failed", exc_info=True)
        print(f"error: the job failed: {failure_text(err)} (its record and error rows are in "
              f"{cfg.output.rstrip('/')}/runs and /errors; --log-level debug shows the "
              "traceback)", file=sys.stderr)
        return 1
    counts = record["counts"]
    print(json.dumps({"run_id": record["run_id"], "status": record["status"],
                      "wall_s": record["wall_s"], **counts}, indent=2))
    print(f"outputs: {cfg.output.rstrip('/')}/{{tiles,slides,errors,runs}}")
    return 0 if record["status"] == "succeeded" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.config import StorageConfig
    from pipeline.status import lake_status, render

    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    status = lake_status(args.output, storage)
    print(json.dumps(status, indent=2, default=str) if args.json else render(status))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's self-contained HTML report; print where it went."""
    from pipeline.config import StorageConfig
    from pipeline.report import ReportError, write_report

    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    try:
        where = write_report(args.output, args.run, storage=storage, path=args.out,
                             pca_slides=args.pca_slides)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(where)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pipeline.doctor import doctor

    cfg = _load(args) if args.job else None
    checks, code = doctor(cfg)
    for c in checks:
        print(c.line())
    failed = sum(c.status == "FAIL" for c in checks)
    print(f"doctor: {len(checks)} checks, {failed} failed")
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    # pipeline.plan, not pipeline.run: planning imports neither Ray nor torch.
    from pipeline.plan import plan_job, tiling_groups
    from pipeline.sink import Lake

    cfg = _load(args)

    plan = plan_job(cfg, Lake(cfg.output, cfg.storage))
    summary = plan.summary()
    # What each model will be fed, and which models share a tiling pass (decode once).
    summary["tiling_passes"] = [
        {"models": models, "tile_px": t.tile_size, "mpp": t.mpp, "min_tissue": t.min_tissue,
         "reader": t.reader, "spec_hash": t.spec_hash()} for t, models in tiling_groups(cfg)]
    if args.estimate:
        from pipeline.estimate import estimate

        summary["estimate"] = estimate(cfg, plan, sample=args.estimate)
    print(json.dumps(summary, indent=2))
    for e in plan.errors:
        print(f"error: row {e['manifest_row']} {e['slide_id']}: {e['reason']}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Compact a lake's slides and errors tables; drop tiles files no slides row names."""
    from pipeline.config import StorageConfig
    from pipeline.lease import Lease
    from pipeline.sink import Lake

    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else \
        StorageConfig()
    lake = Lake(args.output, storage)
    # Orphans are told from files of a job still committing by the lease: hold it meanwhile.
    with Lease(lake.fs, lake.root, f"compact-{os.getpid()}", 120.0, args.wait):
        report = lake.compact()
        if args.vacuum_hours is not None:
            report["vacuumed"] = lake.vacuum(args.vacuum_hours)
    print(json.dumps(report, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models import specs as registry  # the facts: torch only for FLOPs
    from pipeline.models.specs import SLIDE_MODELS

    if args.markdown:
        print(registry.markdown_table(), end="")
        return 0
    if args.choosing:
        print(registry.choosing_table(), end="")
        return 0
    if args.json:
        out = []
        for spec in registry.MODELS.values():
            px, mpp = registry.tiling_spec(spec)
            out.append({"id": spec.id, "kind": "tile", "dim": spec.dim, "params": spec.params,
                        "precision": spec.precision, "tile_px": px, "mpp": mpp,
                        "input_px": spec.input_size, "hub_repo": spec.hub_repo,
                        "gated": spec.gated, "licence": spec.licence,
                        "benchmark": spec.benchmark})
        for s in SLIDE_MODELS.values():
            out.append({"id": s.id, "kind": "slide", "dim": s.dim, "params": s.params,
                        "input_model": s.input_model, "hub_repo": s.hub_repo,
                        "licence": s.licence})
        print(json.dumps(out, indent=2))
        return 0
    rows = [("id", "dim", "params", "precision", "tile spec", "weights", "licence")]
    for spec in registry.MODELS.values():
        px, mpp = registry.tiling_spec(spec)
        rows.append((spec.id, str(spec.dim), f"{spec.params:,}", spec.precision,
                     f"{px}px@{mpp:g}mpp->{spec.input_size}", spec.hub_repo or "-",
                     spec.licence))
    for s in SLIDE_MODELS.values():
        rows.append((s.id, str(s.dim), f"{s.params:,}", s.precision,
                     f"slide encoder of {s.input_model}", s.hub_repo or "-", s.licence))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(Path(args.output))


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog="wsi-embed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wsi-embed {__version__}")
    # --log-level works before or after the subcommand (each subparser knows it too).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, parents=[common])

    p = command("run", "run a job: tile, encode, commit")
    _job_args(p)
    p.add_argument("--run-id", help="fixed run id (e.g. one per night, for schedulers)")
    p.set_defaults(func=cmd_run)
    p = command("plan", "validate the job and show what a run would do; no Ray")
    p.add_argument("--estimate", nargs="?", type=int, const=8, default=0, metavar="N",
                   help="also plan N sample slides (default 8) and estimate tiles, "
                        "core-hours and GPU-hours from bench/results")
    _job_args(p)
    p.set_defaults(func=cmd_plan)
    p = command("compact", "compact a lake's tables (jobs do it at their end)")
    p.add_argument("output", help="the lake's root URL (the job's output:)")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, on-prem)")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a running job")
    p.add_argument("--vacuum-hours", type=float, default=None,
                   help="also delete files that left the tables more than this many hours "
                   "ago (readers of older snapshots lose them)")
    p.set_defaults(func=cmd_compact)
    p = command("models", "list the model registry")
    p.add_argument("--markdown", action="store_true", help="the README's table")
    p.add_argument("--json", action="store_true", help="every entry as JSON, for scripts")
    p.add_argument("--choosing", action="store_true",
                   help="the README's 'Choosing a model' table (cost per tile, gating, licence)")
    p.set_defaults(func=cmd_models)
    p = command("status", "what the lake's latest or running job is doing, what fails now")
    p.add_argument("output", help="the lake (output root), a path or URL")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, on-prem)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = command("report", "write a run's self-contained HTML report (plots, errors, previews)")
    p.add_argument("output", help="the lake (output root), a path or URL")
    p.add_argument("--run", help="run id (default: the latest run)")
    p.add_argument("--out", help="where to write the page (default: OUT/reports/<run_id>.html)")
    p.add_argument("--pca-slides", type=int, default=3, metavar="N",
                   help="embedding (PCA) maps for up to N slides per tile model (default 3)")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, on-prem)")
    p.set_defaults(func=cmd_report)
    p = command("doctor", "check this machine (and a job: manifest, slides, output, weights)")
    p.add_argument("job", nargs="?", help="YAML job file (optional)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="as for run")
    p.set_defaults(func=cmd_doctor)

    p = command("demo", "run the bundled offline demo (random weights)")
    p.add_argument("--output", default="demo-output")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from pipeline.lease import LakeBusy
        from pipeline.manifest import ManifestError
        from pipeline.models.weights import WeightsError
        from pipeline.storage import StorageUnavailable
        from pipeline.unsaved import UnsavedRecords

        if isinstance(err, (ManifestError, WeightsError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, (UnsavedRecords, StorageUnavailable, LakeBusy)):
            print(f"error: {err}", file=sys.stderr)  # says what failed and what to do
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
