"""Planning a 10,000-slide lake in S3 with 1% new slides: seconds and HTTP requests.

    .venv/bin/python bench/plan.py [--slides 10000] [--prefixes 4] [--new-every 100]
        [--batch 64] [--repeats 3]                  # S3 (~3-4 min): results/plan_<host>.json
    .venv/bin/python bench/plan.py --parts local [--local-slides 100000]
                                                    # (~1-2 min): results/plan_local_<host>.json

Set-up, on a moto S3 server on 127.0.0.1 (its own process, counting every request it answers,
by client: s3fs/botocore and delta-rs's Rust object_store, by User-Agent):

- ``--slides`` small objects (8 bytes: planning only lists them) under ``--prefixes`` prefixes
  (one per cohort), and a manifest CSV of them;
- the job config: ``kaiko-vits16`` with ``weights: random`` (resolved locally, no network);
- ``plan_job`` once on the empty lake (every slide is work), then the slides rows of all but
  every ``--new-every``-th slide committed with ``Lake.commit_slides`` in commits of
  ``--batch`` rows, as a job's coordinator leaves them (no compaction), with the work keys
  and fingerprints that plan gave (the tiles table is not needed to plan and is not built).

Measured: ``plan_job(cfg, Lake(cfg.output, cfg.storage))`` (Lake construction included),
``--repeats`` times, on that uncompacted lake and again after ``Lake.compact()``, checking it
finds exactly the new slides; requests counted at the server between the start and the end
of each call, and a phase breakdown (manifest, fingerprints, committed snapshot). Ray is
never started (checked: ``ray.is_initialized()`` stays false).

Without a checkpoint, delta-rs loads a snapshot by reading every commit's JSON since the last
one twice; ``Lake.compact()`` leaves a checkpoint per table (since 5107b85), so a compacted
lake's snapshot is one checkpoint file.

``--parts local`` repeats the compacted case on local disk at ``--local-slides`` (100,000): the
same code minus the network, i.e. the CPU side of planning at 10x, for the extrapolation.
Client CPU time is recorded next to wall time (the S3 server runs in its own process).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import cpu_model, write_results  # noqa: E402
from lakekit import CountingS3, code_state, set_s3_env, slides_rows, versions  # noqa: E402

set_s3_env()

from pipeline.config import JobConfig, build_config  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.models import registry  # noqa: E402
from pipeline.plan import Plan, plan_job, resolve_all_weights  # noqa: E402
from pipeline.sink import SLIDES, Lake, table_files  # noqa: E402
from pipeline.storage import fingerprints  # noqa: E402

MODEL = "kaiko-vits16"
COHORTS = ("TCGA-BRCA", "TCGA-LUAD", "TCGA-COAD", "CPTAC-UCEC", "PLCO", "CAMELYON", "PANDA",
           "HEST")


def layout(n: int, prefixes: int, root: str) -> list[dict[str, str]]:
    """Manifest rows: slides in cohort order, one prefix (directory) per cohort."""
    per = math.ceil(n / prefixes)
    rows = []
    for i in range(n):
        cohort = COHORTS[i // per % len(COHORTS)] + ("" if prefixes <= len(COHORTS)
                                                     else f"-{i // per}")
        sid = f"{cohort}-{i:07d}"
        rows.append({"slide_id": sid, "uri": f"{root}/{cohort}/{sid}.svs", "cohort": cohort})
    return rows


def manifest_csv(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["slide_id", "uri", "cohort"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def job(manifest: str, output: str, storage: dict[str, Any]) -> JobConfig:
    return build_config({"manifest": manifest, "output": output, "storage": storage,
                         "models": [{"id": MODEL, "weights": "random"}]})


def commit_all_but_new(cfg: JobConfig, plan: Plan, new_every: int, batch: int
                       ) -> dict[str, Any]:
    """Slides rows for every task but each ``new_every``-th, ``batch`` rows a commit."""
    lake = Lake(cfg.output, cfg.storage)
    dim = registry.get(MODEL).dim
    done = [t for i, t in enumerate(plan.tasks) if i % new_every != 0]
    t0 = time.perf_counter()
    for s in range(0, len(done), batch):
        part = done[s:s + batch]
        ids = [t.entry.slide_id for t in part]
        cohorts = [t.entry.cohort for t in part]
        keys = [t.work_keys[MODEL] for t in part]
        rows = slides_rows(ids, cohorts, keys,
                           [lake.tiles_relpath(c, i, k) for i, c, k in
                            zip(ids, cohorts, keys, strict=True)], dim,
                           uris=[t.entry.uri for t in part],
                           fingerprints=[str(t.fingerprint) for t in part], seed=s)
        lake.commit_slides(MODEL, rows, replace=False)
    return {"committed": len(done), "commits": math.ceil(len(done) / batch),
            "seconds": time.perf_counter() - t0,
            "data_files": len(table_files(lake.delta(SLIDES, MODEL)))}


def timed_plan(cfg: JobConfig, s3: CountingS3 | None, expect_tasks: int | None,
               keep_log: bool = False) -> dict[str, Any]:
    if s3 is not None:
        s3.reset(keep_log=keep_log)
    t0, c0 = time.perf_counter(), time.process_time()
    plan = plan_job(cfg, Lake(cfg.output, cfg.storage))
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"seconds": wall, "cpu_s": time.process_time() - c0,
                           "tasks": len(plan.tasks),
                           "up_to_date": plan.up_to_date[MODEL], "errors": len(plan.errors)}
    if s3 is not None:
        out["requests"] = s3.report()
        if keep_log:
            out["request_log"] = s3.log()
    if expect_tasks is not None:
        assert len(plan.tasks) == expect_tasks, (len(plan.tasks), expect_tasks)
        assert not plan.errors, plan.errors[:3]
    return out


def phases(cfg: JobConfig, s3: CountingS3 | None) -> dict[str, Any]:
    """The three parts of plan_job that touch storage, one at a time."""
    out: dict[str, Any] = {}

    def part(name: str, fn: Any) -> Any:
        if s3 is not None:
            s3.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        out[name] = {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        if s3 is not None:
            out[name]["requests"] = s3.report()
        return res

    weights = part("resolve_weights", lambda: resolve_all_weights(cfg))
    manifest = part("read_manifest", lambda: read_manifest(cfg.manifest, cfg.storage,
                                                           cfg.default_cohort))
    lake = part("Lake()", lambda: Lake(cfg.output, cfg.storage))
    part("lake.committed()", lambda: lake.committed())
    part("fingerprints()", lambda: fingerprints([e.uri for e in manifest.entries],
                                                cfg.storage))
    t0, c0 = time.perf_counter(), time.process_time()
    plan_job(cfg, Lake(cfg.output, cfg.storage), weights)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    parts = [v for k, v in out.items() if k != "resolve_weights"]
    out["everything else (keys, compare)"] = {
        "seconds": max(0.0, total - sum(v["seconds"] for v in parts)),
        "cpu_s": max(0.0, cpu - sum(v["cpu_s"] for v in parts))}
    out["plan_job (same run)"] = {"seconds": total, "cpu_s": cpu}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    secs = [r["seconds"] for r in runs]
    out = {"best_s": min(secs), "median_s": statistics.median(secs), "runs": runs}
    if "requests" in runs[0]:
        out["requests"] = runs[0]["requests"]["total"]
        out["requests_all_runs"] = [r["requests"]["total"] for r in runs]
    return out


def bench_s3(args: argparse.Namespace) -> dict[str, Any]:
    import s3fs

    s3 = CountingS3()
    try:
        bucket = s3.bucket("bench-plan")
        storage = {"endpoint_url": s3.endpoint}
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
        rows = layout(args.slides, args.prefixes, f"s3://{bucket}/slides")
        t0 = time.perf_counter()
        fs.pipe({r["uri"].removeprefix("s3://"): b"slide..." for r in rows})
        fs.pipe_file(f"{bucket}/manifests/slides.csv", manifest_csv(rows))
        setup = {"objects_s": time.perf_counter() - t0}
        cfg = job(f"s3://{bucket}/manifests/slides.csv", f"s3://{bucket}/lake", storage)
        print(f"S3: {args.slides:,} slide objects under {args.prefixes} prefixes "
              f"({setup['objects_s']:.0f} s)", flush=True)

        empty = timed_plan(cfg, s3, args.slides)
        print(f"plan on the empty lake: {empty['seconds']:.2f} s, "
              f"{empty['requests']['total']} requests", flush=True)
        plan = plan_job(cfg, Lake(cfg.output, cfg.storage))
        new = len(range(0, args.slides, args.new_every))
        commits = commit_all_but_new(cfg, plan, args.new_every, args.batch)
        print(f"committed {commits['committed']:,} slides rows in {commits['commits']} "
              f"commits ({commits['seconds']:.0f} s; {commits['data_files']} data files)",
              flush=True)
        uncompacted = summarise([timed_plan(cfg, s3, new) for _ in range(args.repeats)])
        s3.reset()
        t0 = time.perf_counter()
        Lake(cfg.output, cfg.storage).compact()
        compaction = {"seconds": time.perf_counter() - t0, "requests": s3.total(),
                      "data_files_after": len(table_files(
                          Lake(cfg.output, cfg.storage).delta(SLIDES, MODEL)))}
        runs = [timed_plan(cfg, s3, new, keep_log=(i == 0)) for i in range(args.repeats)]
        compacted = summarise(runs)
        breakdown = phases(cfg, s3)
        prefixes = {r["uri"].rsplit("/", 1)[0] for r in rows}
        return {"setup": setup, "slides": args.slides, "new_slides": new,
                "prefixes": len(prefixes), "empty_lake": empty, "commits": commits,
                "uncompacted": uncompacted, "compaction": compaction,
                "compacted": compacted, "phases_compacted": breakdown,
                "list_pages_expected": sum(math.ceil(sum(r["uri"].startswith(p + "/")
                                                         for r in rows) / 1000)
                                           for p in prefixes)}
    finally:
        s3.stop()


def bench_local(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    n = args.local_slides
    root = scratch / "slides"
    rows = layout(n, args.prefixes, str(root))
    t0 = time.perf_counter()
    for d in {Path(r["uri"]).parent for r in rows}:
        d.mkdir(parents=True, exist_ok=True)
    for r in rows:
        with open(r["uri"], "wb") as fh:
            fh.write(b"slide...")
    (scratch / "slides.csv").write_bytes(manifest_csv(rows))
    cfg = job(str(scratch / "slides.csv"), str(scratch / "lake"), {})
    setup_s = time.perf_counter() - t0
    empty = timed_plan(cfg, None, n)
    plan = plan_job(cfg, Lake(cfg.output, cfg.storage))
    commits = commit_all_but_new(cfg, plan, args.new_every, max(args.batch, 10_000))
    Lake(cfg.output, cfg.storage).compact()
    new = len(range(0, n, args.new_every))
    compacted = summarise([timed_plan(cfg, None, new) for _ in range(args.repeats)])
    return {"slides": n, "setup_s": setup_s, "empty_lake": empty, "commits": commits,
            "compacted": compacted, "phases_compacted": phases(cfg, None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=10_000)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--new-every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64, help="slides rows per commit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--local-slides", type=int, default=100_000)
    ap.add_argument("--parts", default="s3", help="s3 and/or local (comma-separated)")
    args = ap.parse_args()
    logging.getLogger("pipeline").setLevel(logging.ERROR)
    out: dict[str, Any] = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                       "loadavg_start": os.getloadavg()},
                           "versions": versions(), "code": code_state(), "args": vars(args)}
    started = time.perf_counter()
    parts = set(args.parts.split(","))
    if "s3" in parts:
        report_s3(out, args)
    if "local" in parts:
        report_local(out, args)
    ray = sys.modules.get("ray")  # plan_job must not need Ray
    out["ray_imported"] = ray is not None
    out["ray_initialized"] = bool(ray is not None and ray.is_initialized())
    out["wall_s"] = time.perf_counter() - started
    out["machine"]["loadavg_end"] = os.getloadavg()
    kind = "plan" if "s3" in parts else "plan_local"
    print(f"\nray imported: {out['ray_imported']}, initialized: {out['ray_initialized']}; "
          f"{out['wall_s']:.0f} s; results: {write_results(kind, out)}")


def report_s3(out: dict[str, Any], args: argparse.Namespace) -> None:
    s = out["s3"] = bench_s3(args)
    print(f"\nplan_job, {s['slides']:,} slides ({s['new_slides']} new), moto S3, "
          f"best / median of {args.repeats}")
    for name in ("uncompacted", "compacted"):
        r = s[name]
        print(f"{name:<26} {r['best_s']:6.2f} / {r['median_s']:6.2f} s  {r['requests']:>4} "
              f"requests  {r['runs'][0]['requests']['by_client']}")
    print(f"(expected LIST pages for the slides: {s['list_pages_expected']})")
    for name in ("uncompacted", "compacted"):
        print(f"{name}, by operation:", s[name]["runs"][0]["requests"]["by_operation"])
    print(f"({s['commits']['commits']} commits of {args.batch} before compaction; "
          f"Lake.compact() leaves a checkpoint per table since 5107b85)")
    print("phases (compacted):")
    for k, v in s["phases_compacted"].items():
        req = f"  {v['requests']['total']} requests" if "requests" in v else ""
        print(f"  {k:<34} {v['seconds']:6.2f} s (client cpu {v['cpu_s']:5.2f} s){req}")


def report_local(out: dict[str, Any], args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        loc = out["local"] = bench_local(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nlocal disk, {loc['slides']:,} slides, compacted: best "
          f"{loc['compacted']['best_s']:.2f} s, median {loc['compacted']['median_s']:.2f} s"
          f" (empty lake {loc['empty_lake']['seconds']:.2f} s)")
    for k, v in loc["phases_compacted"].items():
        print(f"  {k:<34} {v['seconds']:6.2f} s (cpu {v['cpu_s']:5.2f} s)")


if __name__ == "__main__":
    main()
