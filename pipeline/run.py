"""Builds and runs the Ray Data pipeline; the job entry point.

    manifest -> plan (validate, fingerprint, skip what is committed) -> one slide per block
      -> tiling tasks (CPU), one pass per tiling spec -> one encoder actor pool per model
      -> driver-side sink (commit each slide as soon as all its tiles are embedded; hand its
      embeddings to a slide-encoder actor where configured) -> run record

Only embeddings reach the driver: tiles are dropped by the last encoder of a pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import JobConfig, SlideEncoderConfig, TilingConfig
from pipeline.manifest import Manifest, SlideEntry, read_manifest
from pipeline.models import registry
from pipeline.models.weights import WeightsRef, resolve_weights
from pipeline.sink import Lake, SlideBuffer, now, slide_row
from pipeline.slide_encode import SlideEncoderStage, get_slide_model
from pipeline.storage import Fingerprint, fingerprint, url_to_fs
from pipeline.tiling import tile_slides

log = logging.getLogger("pipeline")

RECIPE_VERSION = 1  # bump when an embedding recipe changes meaning: forces recomputation
TILE_ORDER = "row-major"


def code_version() -> str:
    return __version__


def work_key(fp: Fingerprint, model_id: str, weights: WeightsRef, tiling: TilingConfig) -> str:
    """Everything that changes a slide's rows for a model; equal keys mean nothing to redo."""
    parts = [str(fp), model_id, weights.identity, tiling.spec_hash(), RECIPE_VERSION]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def slide_work_key(tile_key: str, weights: WeightsRef, cfg: SlideEncoderConfig) -> str:
    """A slide encoder's output depends on its input tile embeddings and its own settings."""
    parts = [tile_key, cfg.id, weights.identity, sorted(cfg.layers), cfg.global_pool]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def model_tiling(cfg: JobConfig) -> dict[str, TilingConfig]:
    """Each model's tiling: its declared field of view unless the job fixes mpp/tile size."""
    return {m.id: cfg.tiling.for_model(*registry.tiling_spec(registry.get(m.id)))
            for m in cfg.models}


def tiling_groups(cfg: JobConfig) -> list[tuple[TilingConfig, list[str]]]:
    """Models that share a tiling spec share one tiling pass."""
    groups: dict[str, tuple[TilingConfig, list[str]]] = {}
    for model_id, tiling in model_tiling(cfg).items():
        groups.setdefault(tiling.spec_hash(), (tiling, []))[1].append(model_id)
    return list(groups.values())


def slide_encoders(cfg: JobConfig) -> dict[str, SlideEncoderConfig]:
    """tile model id -> its slide encoder config, for models that have one."""
    return {m.id: m.slide_encoder for m in cfg.models if m.slide_encoder is not None}


@dataclass
class SlideTask:
    entry: SlideEntry
    fingerprint: Fingerprint
    models: list[str]  # tile models to run; their slide encoders run with them
    work_keys: dict[str, str]  # per output model (tile models and slide encoders)
    stale_cohort: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Plan:
    manifest: Manifest
    weights: dict[str, WeightsRef]  # per output model (tile models and slide encoders)
    tasks: list[SlideTask]
    errors: list[dict[str, Any]]
    up_to_date: dict[str, int]

    def summary(self) -> dict[str, Any]:
        per_model = {m: sum(m in t.work_keys and m in t.stale_cohort for t in self.tasks)
                     for m in self.weights}
        return {
            "manifest_rows": len(self.manifest.entries) + len(self.manifest.problems),
            "slides_to_process": len(self.tasks),
            "work_per_model": per_model,
            "up_to_date_per_model": self.up_to_date,
            "errors_before_tiling": len(self.errors),
        }


def error_row(*, slide_id: str | None, uri: str | None, cohort: str | None, stage: str,
              reason: str, model: str | None = None, row: int | None = None) -> dict[str, Any]:
    return {"slide_id": slide_id, "uri": uri, "cohort": cohort, "model": model, "stage": stage,
            "reason": reason, "manifest_row": row, "at": now()}


def resolve_all_weights(cfg: JobConfig) -> dict[str, WeightsRef]:
    """Fails the job, before any slide is touched, when any model's weights are unusable."""
    refs = {}
    for m in cfg.models:
        refs[m.id] = resolve_weights(m, cfg.storage)
        if m.slide_encoder is not None:
            s = m.slide_encoder
            refs[s.id] = resolve_weights(s, cfg.storage, spec=get_slide_model(s.id))
    for model_id, ref in refs.items():
        if ref.random:
            log.warning("=" * 78)
            log.warning("MODEL %s RUNS WITH RANDOM WEIGHTS (%s): its embeddings are meaningless. "
                        "Recorded as random_weights=true in every output row.",
                        model_id, ref.identity)
            log.warning("=" * 78)
    return refs


def plan_job(cfg: JobConfig, lake: Lake, weights: dict[str, WeightsRef] | None = None) -> Plan:
    weights = weights or resolve_all_weights(cfg)
    manifest = read_manifest(cfg.manifest, cfg.storage, cfg.default_cohort)
    errors = [error_row(slide_id=p.slide_id, uri=p.uri, cohort=p.cohort, stage="manifest",
                        reason=p.reason, row=p.row) for p in manifest.problems]
    committed = lake.committed()
    slides_of = slide_encoders(cfg)
    tiling_of = model_tiling(cfg)
    tasks: list[SlideTask] = []
    up_to_date = {m: 0 for m in weights}
    for e in manifest.entries:
        try:
            fs, path = url_to_fs(e.uri, cfg.storage)
            fp = fingerprint(fs, path)
        except FileNotFoundError:
            errors.append(error_row(slide_id=e.slide_id, uri=e.uri, cohort=e.cohort,
                                    stage="stage", reason=f"slide file not found: {e.uri}",
                                    row=e.row))
            continue
        except Exception as err:  # noqa: BLE001 - any storage failure is this slide's error
            errors.append(error_row(slide_id=e.slide_id, uri=e.uri, cohort=e.cohort,
                                    stage="stage", row=e.row,
                                    reason=f"cannot stat slide: {type(err).__name__}: {err}"))
            continue
        keys = {m.id: work_key(fp, m.id, weights[m.id], tiling_of[m.id]) for m in cfg.models}
        for m, s in slides_of.items():
            keys[s.id] = slide_work_key(keys[m], weights[s.id], s)
        todo, stale = [], {}
        for m in cfg.models:
            # A slide encoder needs its tile model's embeddings: both run, or neither.
            outputs = [m.id] + ([m.slide_encoder.id] if m.slide_encoder else [])
            previous = {o: committed.get((e.slide_id, o)) for o in outputs}
            if all(d and d.work_key == keys[o] and d.cohort == e.cohort
                   for o, d in previous.items()):
                for o in outputs:
                    up_to_date[o] += 1
                continue
            todo.append(m.id)
            stale.update({o: d.cohort if d else None for o, d in previous.items()})
        if todo:
            tasks.append(SlideTask(e, fp, todo, keys, stale))
    return Plan(manifest, weights, tasks, errors, up_to_date)


# ----------------------------------------------------------------------------------------------
# The job.


def init_ray(cfg: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory_gb:
        kwargs["object_store_memory"] = int(cfg.ray.object_store_memory_gb * 2**30)
    log.info("no cluster address given: starting an embedded local Ray")
    ray.init(address="local", **kwargs)


def versions() -> dict[str, str]:
    out = {"pipeline": code_version(), "python": platform.python_version()}
    for name in ("ray", "torch", "timm", "pyarrow", "openslide"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "")
            if name == "openslide":
                out["libopenslide"] = getattr(mod, "__library_version__", "")
        except Exception:  # noqa: BLE001 - informational only
            out[name] = "unavailable"
    return out


def _use_gpu(device: str) -> bool:
    import ray

    if device == "cuda":
        return True
    if device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def warn_if_cluster_too_small(cfg: JobConfig, use_gpu: dict[str, bool]) -> None:
    """A pipeline whose stages cannot all hold a slot at once stalls instead of streaming."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.ray.tiling_cpus + sum(cfg.ray.encoder_cpus * m.actors for m in cfg.models
                                     if not use_gpu[m.id])
    if cpus < need:
        log.warning("the cluster has %g CPUs now but one tiling task plus the CPU encoder "
                    "actors need %g: the job waits for more nodes (autoscaling) or stalls; "
                    "lower ray.encoder_cpus / models[].actors", cpus, need)


def build_dataset(cfg: JobConfig, tiling: TilingConfig, tasks: list[SlideTask],
                  plan: Plan, use_gpu: dict[str, bool]) -> Any:
    """One tiling pass (one tiling spec) feeding the encoders of the models that share it."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from pipeline.encode import TileEncoder

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    # Blocks of ~16 MB of tiles (a few chunks). At Ray Data's default (128 MB) a block holds
    # a whole slide or more, an encoder task takes several slides at once, and with the pixels
    # dropped its output reaches the driver only when all of them are done: commits come in
    # bursts, late, and a failure loses more work. Much smaller blocks cost Ray Data more in
    # per-block scheduling than the tiles are worth.
    ctx.target_max_block_size = max(16 << 20, tiling.chunk_tiles * tiling.tile_size ** 2 * 3)
    if cfg.ray.object_store_budget_gb:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=int(cfg.ray.object_store_budget_gb * 2**30))
    items = [{"slide_id": t.entry.slide_id, "uri": t.entry.uri,
              "mpp": t.entry.mpp if t.entry.mpp is not None else float("nan"),
              "models": ",".join(t.models)} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A task of N decode threads reserves N CPUs; a single-threaded one what the config says
    # (a fraction on small machines, where tiling needs a few % of a core per encoder core).
    cpus = max(cfg.ray.tiling_cpus, tiling.threads) if tiling.threads > 1 else cfg.ray.tiling_cpus
    tiler_args: dict[str, Any] = {"num_cpus": cpus,
                                  # A memory request also keeps Ray from fusing tiling into the
                                  # encoder actors, which would serialise the two stages.
                                  "memory": 512 * 2**20}
    if cfg.ray.tiler_resource:
        tiler_args["resources"] = {cfg.ray.tiler_resource: 0.001}
    if cfg.ray.tiling_concurrency:
        tiler_args["compute"] = TaskPoolStrategy(size=cfg.ray.tiling_concurrency)
    ds = ds.map_batches(tile_slides, batch_size=1, batch_format="numpy",
                        fn_kwargs={"tiling": tiling.model_dump(),
                                   "storage": cfg.storage.model_dump()},
                        **tiler_args)
    active = [m for m in cfg.models if any(m.id in t.models for t in tasks)]
    for i, m in enumerate(active):
        enc_args: dict[str, Any] = {"num_cpus": cfg.ray.encoder_cpus,
                                    "num_gpus": 1 if use_gpu[m.id] else 0}
        if cfg.ray.encoder_resource:
            enc_args["resources"] = {cfg.ray.encoder_resource: 0.001}
        model_cfg = m.model_dump()
        model_cfg["cpu_threads"] = max(1, math.ceil(cfg.ray.encoder_cpus))
        ds = ds.map_batches(
            TileEncoder, batch_size=m.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=m.actors),
            fn_constructor_kwargs={"model_cfg": model_cfg,
                                   "weights": asdict(plan.weights[m.id]),
                                   "storage_cfg": cfg.storage.model_dump(),
                                   "drop_tiles": i == len(active) - 1},
            **enc_args)
    return ds


def start_slide_encoders(cfg: JobConfig, plan: Plan, use_gpu: dict[str, bool]
                         ) -> dict[str, Any]:
    """One slide-encoder actor per tile model that has one (it runs once per slide)."""
    import ray

    actors = {}
    for m, s in slide_encoders(cfg).items():
        if not any(m in t.models for t in plan.tasks):
            continue
        opts: dict[str, Any] = {"num_gpus": 1 if use_gpu[m] else 0,
                                # No CPU reservation: it would starve tiling on small machines;
                                # it runs briefly once per slide.
                                "num_cpus": 0}
        if cfg.ray.encoder_resource:
            opts["resources"] = {cfg.ray.encoder_resource: 0.001}
        actors[m] = ray.remote(SlideEncoderStage).options(**opts).remote(
            s.model_dump(), asdict(plan.weights[s.id]), cfg.storage.model_dump())
    return actors


class Committer:
    """Driver-side sink: buffers each slide's embeddings and commits it once complete."""

    def __init__(self, cfg: JobConfig, plan: Plan, lake: Lake, run_id: str,
                 use_gpu: dict[str, bool], slide_actors: dict[str, Any] | None = None):
        self.cfg, self.plan, self.lake, self.run_id = cfg, plan, lake, run_id
        self.tasks: dict[str, SlideTask] = {}
        self.tiling = cfg.tiling
        self.dims = {m.id: registry.get(m.id).dim for m in cfg.models}
        self.use_gpu = use_gpu
        self.slides_of = slide_encoders(cfg)
        self.slide_actors = slide_actors or {}
        # slide-encoder results in flight: future -> (task, tile model, slide-row values)
        self.pending: dict[Any, tuple[SlideTask, str, dict[str, Any]]] = {}
        self.buffers: dict[str, SlideBuffer] = {}
        self.done: set[str] = set()
        self.errors: list[dict[str, Any]] = list(plan.errors)
        self.errors_written = 0
        self.error_parts = 0
        self.last_flush = time.monotonic()
        self.committed: dict[str, int] = {m: 0 for m in plan.weights}
        self.tiles_encoded: dict[str, int] = {m: 0 for m in plan.weights}
        self.timings: list[dict[str, Any]] = []
        # first encoded batch at the driver: start-up and pipeline fill end here
        self.first_batch: dict[str, Any] | None = None

    def start_pass(self, tiling: TilingConfig, tasks: list[SlideTask]) -> None:
        """A new tiling pass: the slides it covers, restricted to the models that share it."""
        self.tiling = tiling
        self.tasks = {t.entry.slide_id: t for t in tasks}
        self.buffers.clear()
        self.done.clear()

    def end_pass(self, job_error: str | None) -> None:
        """Every slide of the pass not committed or failed by now gets an error row."""
        reason = f"job stopped before this slide finished: {job_error}" if job_error else \
            "slide produced no output (internal error: please report)"
        for sid, task in self.tasks.items():
            if sid not in self.done:
                self._fail(task, "incomplete", reason, ",".join(task.models))

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ids = batch["slide_id"]
        if self.first_batch is None:
            self.first_batch = {"at": time.time(), "rows": len(ids)}
        for sid in np.unique(ids):
            sid = str(sid)
            rows = np.nonzero(ids == sid)[0]
            if sid in self.done:
                continue  # a retried task re-delivered rows of a slide already committed
            task = self.tasks[sid]
            err = str(batch["error"][rows[0]])
            if err:
                self._fail(task, str(batch["error_stage"][rows[0]]), err)
                continue
            buf = self.buffers.get(sid)
            if buf is None:
                buf = SlideBuffer(sid, int(batch["num_tiles"][rows[0]]),
                                  {m: self.dims[m] for m in task.models})
                self.buffers[sid] = buf
            cols = {m: f"emb__{m}" for m in task.models}
            buf.add(rows, batch, cols)
            if buf.complete:
                self._commit(task, buf)
        self.collect_slide_embeddings(wait=False)
        if time.monotonic() - self.last_flush > self.cfg.errors_flush_seconds:
            self.flush_errors()

    def _fail(self, task: SlideTask, stage: str, reason: str, model: str | None = None) -> None:
        e = task.entry
        self.errors.append(error_row(slide_id=e.slide_id, uri=e.uri, cohort=e.cohort,
                                     stage=stage, reason=reason, row=e.row, model=model))
        self.buffers.pop(e.slide_id, None)
        self.done.add(e.slide_id)

    def _values(self, task: SlideTask, buf: SlideBuffer, m: str) -> dict[str, Any]:
        """The slide row of tile model ``m`` (mean pooling), lineage included."""
        e, meta = task.entry, buf.meta
        ref = self.plan.weights[m]
        spec = registry.get(m)
        gpu = self.use_gpu[m]
        return {
                "slide_id": e.slide_id, "uri": e.uri, "fingerprint": str(task.fingerprint),
                "size_bytes": task.fingerprint.size, "width": meta["width"],
                "height": meta["height"], "mpp": meta["mpp"], "mpp_source": meta["mpp_source"],
                "vendor": meta.get("vendor"), "objective_power": meta.get("objective_power"),
                "target_mpp": meta["target_mpp"], "tile_px": meta["tile_px"],
                "tile_l0": meta["tile_l0"], "level": meta["level"],
                "num_tiles": buf.num_tiles, "tissue_area_mm2": meta["tissue_area_mm2"],
                "tile_order": TILE_ORDER, "aggregation": "mean", "layer": None,
                "source_model": m, "model_dim": spec.dim,
                "precision": spec.precision if gpu else "fp32", "device": "cuda" if gpu else "cpu",
                "weights": ref.source, "weights_identity": ref.identity,
                "weights_sha256": ref.sha256, "random_weights": ref.random,
                "tiling": json.dumps(self.tiling.model_dump(), sort_keys=True),
                "tiling_hash": self.tiling.spec_hash(),
                "work_key": task.work_keys[m], "code_version": code_version(),
                "run_id": self.run_id,
                "tiling_started_at": _ts(meta.get("tiling_started_at", buf.t_first)),
                "committed_at": now(), "extra": json.dumps(e.extra, default=str),
            }

    def _commit(self, task: SlideTask, buf: SlideBuffer) -> None:
        e, meta = task.entry, buf.meta
        for m in task.models:
            values = self._values(task, buf, m)
            self.lake.commit_slide(m, e.cohort, e.slide_id, buf.tiles_table(m),
                                   slide_row(self.dims[m], [values], buf.mean_embedding(m)),
                                   stale_cohort=task.stale_cohort.get(m))
            self.committed[m] += 1
            self.tiles_encoded[m] += buf.num_tiles
            if m in self.slides_of:
                # Tiling order is the buffer's index order; coordinates are level-0 px.
                coords = np.stack([buf.x, buf.y], axis=1)
                fut = self.slide_actors[m].__call__.remote(buf.emb[m], coords)
                self.pending[fut] = (task, m, values)
        self.timings.append({
            "slide_id": e.slide_id, "num_tiles": buf.num_tiles, "models": task.models,
            "tiling_started_at": meta.get("tiling_started_at"), "last_chunk_at": buf.t_last,
            "committed_at": time.time(), "tiler_peak_rss_mb": buf.rss_mb,
            "tiler_node": meta.get("node"), "tiler_pid": meta.get("pid"),
            "reader": meta.get("reader"),
            "encoder_nodes": {m: sorted(n) for m, n in buf.encoder_nodes.items()},
        })
        log.info("committed %s (%d tiles, %s)", e.slide_id, buf.num_tiles, ",".join(task.models))
        del self.buffers[e.slide_id]
        self.done.add(e.slide_id)

    def collect_slide_embeddings(self, wait: bool) -> None:
        """Commit the slide-encoder rows whose results are back (all of them if ``wait``)."""
        if not self.pending:
            return
        import ray

        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending),
                            timeout=None if wait else 0)
        for fut in ready:
            task, m, values = self.pending.pop(fut)
            s = self.slides_of[m]
            try:
                layers = ray.get(fut)
            except Exception as err:  # noqa: BLE001 - this slide's failure, not the job's
                self._fail(task, "slide_encoder", f"{s.id}: {type(err).__name__}: {err}", s.id)
                continue
            ref = self.plan.weights[s.id]
            gpu = self.use_gpu[m]
            spec = get_slide_model(s.id)
            pooling = "global-pool" if s.global_pool else "cls"
            rows = [{**values, "aggregation": f"{s.id} ({pooling})", "layer": layer,
                     "model_dim": spec.dim, "precision": "fp16" if gpu else "fp32",
                     "weights": ref.source, "weights_identity": ref.identity,
                     "weights_sha256": ref.sha256, "random_weights": ref.random,
                     "work_key": task.work_keys[s.id], "committed_at": now()}
                    for layer in layers]
            emb = np.stack([layers[r["layer"]] for r in rows])
            e = task.entry
            self.lake.commit_slide(s.id, e.cohort, e.slide_id, None,
                                   slide_row(spec.dim, rows, emb),
                                   stale_cohort=task.stale_cohort.get(s.id))
            self.committed[s.id] = self.committed.get(s.id, 0) + 1

    def finish(self, job_error: str | None) -> None:
        """Slide-encoder results still in flight are committed, or failed: nothing lost."""
        if job_error is None:
            self.collect_slide_embeddings(wait=True)
        for task, m, _ in self.pending.values():
            self._fail(task, "incomplete", f"job stopped before the slide encoder finished: "
                       f"{job_error}", self.slides_of[m].id)
        self.pending.clear()
        self.flush_errors()

    def flush_errors(self) -> None:
        pending = self.errors[self.errors_written:]
        if pending:
            self.lake.write_errors(self.run_id, self.error_parts, pending)
            self.error_parts += 1
            self.errors_written = len(self.errors)
        self.last_flush = time.monotonic()


def _ts(t: float | None) -> Any:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc) if t else None


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def run_job(cfg: JobConfig, run_id: str | None = None) -> dict[str, Any]:
    """Run one job to completion and return its run record (also written to OUT/runs/)."""
    run_id = run_id or new_run_id()
    started = time.time()
    lake = Lake(cfg.output, cfg.storage)
    weights = resolve_all_weights(cfg)
    plan = plan_job(cfg, lake, weights)
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running", "started_at": _ts(started),
        "config": cfg.model_dump(), "versions": versions(), "plan": plan.summary(),
        "weights": {m: asdict(r) for m, r in weights.items()},
    }
    lake.write_run(run_id, record)
    log.info("run %s: %s", run_id, json.dumps(plan.summary()))
    use_gpu: dict[str, bool] = {}
    committer = None
    job_error = None
    try:
        if plan.tasks:
            init_ray(cfg)
            use_gpu = {m.id: _use_gpu(m.device) for m in cfg.models}
            for m, gpu in use_gpu.items():
                if not gpu:
                    log.warning("model %s: no GPU in the cluster; encoding on CPU (slow)", m)
            warn_if_cluster_too_small(cfg, use_gpu)
            committer = Committer(cfg, plan, lake, run_id, use_gpu,
                                  start_slide_encoders(cfg, plan, use_gpu))
            for tiling, group in tiling_groups(cfg):
                tasks = [replace(t, models=[m for m in t.models if m in group])
                         for t in plan.tasks if set(t.models) & set(group)]
                if not tasks:
                    continue
                committer.start_pass(tiling, tasks)
                ds = build_dataset(cfg, tiling, tasks, plan, use_gpu)
                try:
                    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                        committer.add(batch)
                except BaseException as err:
                    committer.end_pass(f"{type(err).__name__}: {err}")
                    raise
                committer.end_pass(None)
        else:
            committer = Committer(cfg, plan, lake, run_id, use_gpu)
    except BaseException as err:
        job_error = f"{type(err).__name__}: {err}"
        raise
    finally:
        if committer is not None:
            committer.finish(job_error)
            record.update({
                "status": "failed" if job_error else "succeeded",
                "error": job_error,
                "finished_at": _ts(time.time()),
                "wall_s": round(time.time() - started, 3),
                "counts": {
                    "committed": committer.committed,
                    "tiles_encoded": committer.tiles_encoded,
                    "up_to_date": plan.up_to_date,
                    "errors": len(committer.errors),
                },
                "encoders": {m: ("cuda" if g else "cpu") for m, g in use_gpu.items()},
                "first_batch": committer.first_batch,
                "slides": committer.timings,
            })
            lake.write_run(run_id, record)
    return record
