"""Builds and runs the Ray Data pipeline; the job entry point.

    plan (pipeline.plan) -> lease on the lake -> one Ray Data pipeline per tiling spec, all
    running at once: slides -> tiling tasks (CPU) -> one encoder actor pool per model, the
    last of which routes to writer actors (pipeline.writer: one tiles file per slide and model)
    -> the coordinator (pipeline.coordinator, in this process), which sees only metadata and
    commits Delta transactions -> compaction -> the run record and its report

No tile embedding reaches the driver: encoders hand them to writers on the cluster.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import queue
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from pipeline.config import ConfigError, JobConfig, TilingConfig
from pipeline.coordinator import Coordinator, utc_time
from pipeline.handoff import MODELS_COLUMN, SLIDE_ID
from pipeline.lease import Lease
from pipeline.manifest import Manifest, read_manifest
from pipeline.placement import (
    Placement,
    cpus_needed,
    fit_encoder_cpus,
    on_nodes_labelled,
    place,
)
from pipeline.plan import (
    Plan,
    SlideTask,
    code_version,
    plain_text,
    plan_job,
    resolve_all_weights,
    slide_encoders,
    tiling_groups,
)
from pipeline.sink import Lake
from pipeline.slide_encode import SlideEncoderStage
from pipeline.storage import RetryPolicy, join
from pipeline.tiling import tiling_stage
from pipeline.unsaved import UnsavedRecords, keep, recover, unsaved_root
from pipeline.writer import SinkWriter, WriterTask, route_to_writers, writer_of

log = logging.getLogger("pipeline")

__all__ = ["plan_job", "run_job"]


# ----------------------------------------------------------------------------------------------
# The job.


def init_ray(cfg: JobConfig) -> bool:
    """Connect to the configured cluster or start a local Ray; True if this call started or
    joined it (the job then shuts it down at its end), False if Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
        try:
            ray.init(address=address, log_to_driver=True)
        except (ValueError, ConnectionError, TimeoutError, RuntimeError) as err:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {address!r} (from {source}): "
                f"{type(err).__name__}: {err}. Give the head's GCS address (host:6379), 'auto' "
                "on a cluster node, or unset it to run on an embedded local Ray; under "
                "`ray job submit` Ray sets it for you") from None
        return True
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    if cfg.ray.object_store_memory_gb:
        kwargs["object_store_memory"] = int(cfg.ray.object_store_memory_gb * 2**30)
    log.info("no cluster address given: starting an embedded local Ray")
    ray.init(address="local", **kwargs)
    return True


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


def build_dataset(cfg: JobConfig, tiling: TilingConfig, tasks: list[SlideTask],
                  plan: Plan, placement: Placement, writers: list[Any]) -> Any:
    """One tiling pass (one tiling spec) feeding the encoders of the models that share it."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from pipeline.encode import TileEncoder

    ctx = ray.data.DataContext.get_current()
    options = copy.copy(ctx.execution_options)
    if cfg.ray.object_store_budget_gb:
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=int(cfg.ray.object_store_budget_gb * 2**30))
    settings = {
        "enable_progress_bars": sys.stderr.isatty(),
        # Ray Core never restarts an actor whose constructor raised; Ray Data starts another
        # in its place this many times in a row, then fails the dataset (and the job) with it.
        "max_consecutive_actor_init_deaths": cfg.ray.actor_start_failures,
        # Blocks of ~16 MB of tiles (a few chunks). At Ray Data's default (128 MB) a block
        # holds a whole slide or more, an encoder task takes several slides at once, and with
        # the pixels dropped its output reaches the writers only when all of them are done:
        # commits come in bursts, late, and a failure loses more work. Much smaller blocks
        # cost Ray Data more in per-block scheduling than the tiles are worth.
        "target_max_block_size": max(16 << 20, tiling.chunk_tiles * tiling.tile_size ** 2 * 3),
        "execution_options": options,
    }
    items = [{SLIDE_ID: t.entry.slide_id, "uri": t.entry.uri,
              "mpp": t.entry.mpp if t.entry.mpp is not None else float("nan"),
              MODELS_COLUMN: ",".join(t.models), "cohort": t.entry.cohort,
              # the bytes tiled must be these (pipeline.storage.staged_slide checks)
              "fingerprint": str(t.fingerprint)} for t in tasks]
    # The dataset takes a copy of the context as it is created: this pass's settings go
    # into that copy only, and later jobs in this process start from Ray's defaults.
    with data_context(ctx, settings):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A task of N decode threads reserves N CPUs; a single-threaded one what the config says
    # (a fraction on small machines, where tiling needs a few % of a core per encoder core).
    cpus = max(cfg.ray.tiling_cpus, tiling.threads) if tiling.threads > 1 else cfg.ray.tiling_cpus
    tiler_args: dict[str, Any] = {"num_cpus": cpus,
                                  # A memory request also keeps Ray from fusing tiling into the
                                  # encoder actors, which would serialise the two stages.
                                  "memory": 512 * 2**20}
    tiler_args.update(on_nodes_labelled(cfg.ray.tiler_resource))
    if cfg.ray.tiling_concurrency:
        tiler_args["compute"] = TaskPoolStrategy(size=cfg.ray.tiling_concurrency)
    ds = ds.map_batches(tiling_stage, batch_size=1, batch_format="numpy",
                        fn_kwargs={"tiling": tiling, "storage": cfg.storage,
                                   "output": cfg.output},
                        **tiler_args)
    active = [m for m in cfg.models if any(m.id in t.models for t in tasks)]
    routing = routing_encoder()
    for i, m in enumerate(active):
        last = i == len(active) - 1
        enc_args: dict[str, Any] = {"num_cpus": cfg.ray.encoder_cpus,
                                    "num_gpus": placement.gpus[m.id]}
        enc_args.update(on_nodes_labelled(cfg.ray.encoder_resource))
        kwargs: dict[str, Any] = {"model": m, "weights": plan.weights[m.id],
                                  "storage": cfg.storage, "drop_tiles": last,
                                  "threads": max(1, math.ceil(cfg.ray.encoder_cpus))}
        if last:
            kwargs["writers"] = writers
        ds = ds.map_batches(
            routing if last else TileEncoder, batch_size=m.batch_size, batch_format="numpy",
            zero_copy_batch=True,  # the encoder only reads the tiles: no copy of each batch
            compute=ActorPoolStrategy(size=m.actors), fn_constructor_kwargs=kwargs, **enc_args)
    return ds


@contextlib.contextmanager
def data_context(ctx: Any, settings: dict[str, Any]) -> Iterator[None]:
    """Ray Data's context is one per process: a job that set its object-store budget there
    left it to every later job of that process (a notebook; the test suite, where a 10 MB
    budget slowed the next jobs 4x). Set for the block, then put back as it was."""
    before = {name: getattr(ctx, name) for name in settings}
    for name, value in settings.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(ctx, name, value)


def routing_encoder() -> type:
    """The pass's last encoder hands its embeddings to the writers itself: no stage between
    (a task stage there delayed each slide's rows by seconds), no extra object-store hop; what
    goes on to the coordinator is one metadata row a slide."""
    from pipeline.encode import TileEncoder

    class RoutingTileEncoder(TileEncoder):
        def __init__(self, *, writers: list[Any], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.writers = writers

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return route_to_writers(super().__call__(batch), writers=self.writers)

    return RoutingTileEncoder


def start_slide_encoders(cfg: JobConfig, plan: Plan, placement: Placement
                         ) -> dict[str, Any]:
    """One slide-encoder actor per tile model that has one (it runs once per slide)."""
    import ray

    actors = {}
    for m, s in slide_encoders(cfg).items():
        if not any(m in t.models for t in plan.tasks):
            continue
        opts: dict[str, Any] = {"num_gpus": placement.slide_gpus[s.id],
                                # No CPU reservation: it would starve tiling on small machines;
                                # it runs briefly once per slide.
                                "num_cpus": 0}
        opts.update(on_nodes_labelled(cfg.ray.encoder_resource))
        actors[m] = ray.remote(SlideEncoderStage).options(**opts).remote(
            s, plan.weights[s.id], cfg.storage)
    return actors


def start_writers(cfg: JobConfig, tasks: list[SlideTask], slide_actors: dict[str, Any]
                  ) -> list[Any]:
    """The pass's writer actors, each knowing only the slides it owns."""
    import ray

    n = max(1, min(cfg.sink.writers, len(tasks)))
    shards: list[dict[str, WriterTask]] = [{} for _ in range(n)]
    has_encoder = set(slide_encoders(cfg))
    for t in tasks:
        shards[writer_of(t.entry.slide_id, n)][t.entry.slide_id] = WriterTask(
            t.entry.cohort, tuple(t.models), {m: t.work_keys[m] for m in t.models},
            {m: m in has_encoder for m in t.models})
    # A writer lost with its node comes back empty: slides it was buffering end as
    # "incomplete" error rows (re-run to finish them); the job itself goes on.
    opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
    opts.update(on_nodes_labelled(cfg.sink.writer_resource))
    actor = ray.remote(SinkWriter).options(**opts)
    return [actor.remote(cfg.output, cfg.storage, cfg.sink.embedding_dtype,
                         shard, {m: a for m, a in slide_actors.items()}) for shard in shards]


_CAUSE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def failure_text(err: BaseException) -> str:
    """What stopped the job, as one plain line: Ray wraps an actor's or task's exception in
    its traceback text (with colour codes); the last exception line of it is the cause."""
    text = plain_text(f"{type(err).__name__}: {err}")
    lines = text.splitlines()
    if len(lines) <= 1:
        return text
    causes = [m for m in (_CAUSE.match(line.strip()) for line in lines[1:]) if m]
    if not causes:
        return lines[0]
    where = ("an actor failed to start" if "creation task" in lines[0]
             else f"{type(err).__name__}")
    return f"{where}: {causes[-1].group(1)}: {causes[-1].group(2)}"


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


_DONE = object()


def _drain(pid: int, ds: Any, out: queue.Queue) -> None:
    """Runs one pass in a thread: every pass streams at once (all models' pools busy)."""
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            out.put((pid, batch))
        out.put((pid, _DONE))
    except BaseException as err:  # noqa: BLE001 - handed to the coordinator's thread
        out.put((pid, err))


def passes_fit_at_once(cfg: JobConfig, groups: list[list[str]], use_gpu: dict[str, bool]
                       ) -> bool:
    """Can every pass hold one tiling task and all its encoder actors at the same time?

    If not, concurrent passes would each hold actors while none can tile (a deadlock), so
    they run one after another, as small clusters must. GPUs fit if ``place`` can share them."""
    import ray

    res = ray.cluster_resources()
    try:
        place(cfg, groups, use_gpu, res.get("GPU", 0.0), concurrent=True)
    except ConfigError:
        return False
    return cpus_needed(cfg, groups, concurrent=True)[0] <= res.get("CPU", 0)


def run_passes(cfg: JobConfig, plan: Plan, coord: Coordinator, use_gpu: dict[str, bool]
               ) -> None:
    """All tiling passes at once where the cluster holds them (one after another where it
    does not); the coordinator consumes their metadata in this thread."""
    import ray

    passes = []
    for pid, (tiling, group) in enumerate(tiling_groups(cfg)):
        tasks = [replace(t, models=[m for m in t.models if m in group])
                 for t in plan.tasks if set(t.models) & set(group)]
        if tasks:
            passes.append((pid, tiling, group, tasks))
    groups = [[m for m in p[2] if any(m in t.models for t in p[3])] for p in passes]
    at_once = len(passes) <= 1 or passes_fit_at_once(cfg, groups, use_gpu)
    # Fits, or stops here (ConfigError naming the settings) before any actor is created.
    resources = ray.cluster_resources()
    placement = place(cfg, groups, use_gpu, resources.get("GPU", 0.0), at_once)
    encoder_cpus = fit_encoder_cpus(cfg, groups, resources.get("CPU", 0.0), at_once,
                                    fixed_size=not (cfg.ray.address or os.environ.get(
                                        "RAY_ADDRESS")))
    if encoder_cpus != cfg.ray.encoder_cpus:
        log.warning("ray.encoder_cpus lowered from %g to %g: %g CPUs hold one tiling task and "
                    "every encoder actor at once only so (set it to silence this)",
                    cfg.ray.encoder_cpus, encoder_cpus, resources.get("CPU", 0.0))
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(
            update={"encoder_cpus": encoder_cpus})})
    placement = replace(placement, encoder_cpus=encoder_cpus)
    coord.placement = placement
    for note in placement.notes:
        log.info("placement: %s", note)
    slide_actors = start_slide_encoders(cfg, plan, placement)
    if not at_once:
        log.warning("the cluster cannot hold the encoders of all %d tiling passes at once: "
                    "running them one after another (more CPUs/GPUs, or fewer "
                    "models[].actors / ray.encoder_cpus, lets them run together)", len(passes))
    coord.pass_mode = "concurrent" if at_once else "sequential"
    out: queue.Queue = queue.Queue()
    writers: dict[int, list[Any]] = {}
    waiting = list(passes)

    def start(pid: int, tiling: TilingConfig, tasks: list[SlideTask]) -> None:
        coord.start_pass(pid, tiling, tasks)
        writers[pid] = start_writers(cfg, tasks, slide_actors)
        ds = build_dataset(cfg, tiling, tasks, plan, placement, writers[pid])
        threading.Thread(target=_drain, args=(pid, ds, out), name=f"pass-{pid}",
                         daemon=True).start()

    running: set[int] = set()
    while waiting and (at_once or not running):
        pid, tiling, _, tasks = waiting.pop(0)
        start(pid, tiling, tasks)
        running.add(pid)
    failure: BaseException | None = None
    while running:
        try:
            pid, item = out.get(timeout=0.25)
        except queue.Empty:
            coord.tick()
            continue
        if item is _DONE or isinstance(item, BaseException):
            running.discard(pid)
            error = None if item is _DONE else failure_text(item)
            coord.end_pass(pid, error)
            for w in writers.pop(pid):
                ray.kill(w)
            if isinstance(item, BaseException) and failure is None:
                failure = item
            if waiting and failure is None:
                nxt, tiling, _, tasks = waiting.pop(0)
                start(nxt, tiling, tasks)
                running.add(nxt)
            continue
        coord.add(pid, item)
    for pid, _, _, tasks in waiting:  # never started: the job failed before them
        coord.start_pass(pid, passes[0][1], tasks)
        coord.end_pass(pid, failure_text(failure))
    for a in slide_actors.values():
        ray.kill(a)
    if failure is not None:
        raise failure


def outcome_error(cfg: JobConfig, plan: Plan, coord: Coordinator) -> str | None:
    """Why a run that raised nothing still did not do its work (for its status and exit code)."""
    rows = len(plan.manifest.entries) + len(plan.manifest.problems)
    failed = {e["slide_id"] for e in coord.errors}
    committed = {s["slide_id"] for s in coord.timings}  # slides committed by this run
    had_work = len(plan.tasks) + len(plan.errors)
    if had_work == 0:
        return None  # everything was already committed: nothing to do is success
    if not committed:
        return (f"committed nothing: {len(failed)} of {rows} manifest rows failed "
                "(see the errors table)")
    fraction = len(failed - committed) / max(1, len(failed | committed))
    if fraction > cfg.max_failed_fraction:
        return (f"{fraction:.0%} of the slides failed, above max_failed_fraction "
                f"{cfg.max_failed_fraction:.0%} (see the errors table)")
    return None


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> None:
    """A run id names a file (OUT/runs/<id>.json) and fills a column: no paths, no spaces."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise ConfigError(f"--run-id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-' "
                          "(no '/' or '..'), e.g. nightly-2026-12-01")


RAY_WORKING_DIR_COPY = "/runtime_resources/working_dir_files/"


def check_output_survives(output: str, cwd: str | None = None) -> None:
    """Under ``ray job submit --working-dir``, the driver runs in Ray's temporary copy of that
    dir: a local output inside it is deleted with it. Refuse it before any work."""
    cwd = os.path.realpath(cwd or os.getcwd())
    if "://" in output and not output.startswith("file://"):
        return
    path = os.path.realpath(output.split("://", 1)[-1])
    if RAY_WORKING_DIR_COPY in cwd + "/" and (path + "/").startswith(cwd.rstrip("/") + "/"):
        raise ConfigError(
            f"output: {output} lies inside Ray's temporary copy of the job's working dir "
            f"({cwd}), which Ray deletes: use an absolute path on shared storage or an "
            "object-store URL (s3://...)")


def run_job(cfg: JobConfig, run_id: str | None = None) -> dict[str, Any]:
    """Run one job to completion and return its run record (also written to OUT/runs/)."""
    check_output_survives(cfg.output)
    run_id = run_id or new_run_id()
    check_run_id(run_id)
    started = time.time()
    lake = Lake(cfg.output, cfg.storage, cfg.sink.embedding_dtype)
    weights = resolve_all_weights(cfg)
    # A manifest that cannot be read stops the job before it touches the lake.
    manifest = read_manifest(cfg.manifest, cfg.storage, cfg.default_cohort)
    lease = Lease(lake.fs, lake.root, run_id, cfg.sink.lease_ttl_s, cfg.sink.lease_wait_s,
                  lake.retry)
    lease.acquire()
    try:
        # What storage refused at the end of an earlier run goes in first (this machine's).
        recover(lake, unsaved_root(cfg.sink.unsaved_dir))
        if lake.has_run(run_id):
            raise ConfigError(f"--run-id {run_id!r} was used before on this lake (its record "
                              "would be overwritten): give this attempt a new id, e.g. "
                              f"{run_id}-r2")
        if lease.took_over:
            mark_abandoned(lake, run_id, lease.took_over)
        return _run_leased(cfg, run_id, started, lake, weights, manifest)
    finally:
        lease.release()


def mark_abandoned(lake: Lake, by: str, dead: dict[str, Any]) -> None:
    """A run whose lease was taken over died without finishing: its record says so."""
    dead_id = str(dead.get("run_id"))
    try:
        check_run_id(dead_id)
        if not lake.has_run(dead_id):
            return
        record = lake.read_run(dead_id)
    except (ConfigError, ValueError):
        return  # a lease not written by this tool names no record of ours
    if record.get("status") != "running":
        return
    record.update({"status": "abandoned", "abandoned_by": by, "abandoned_how": dead["how"],
                   "abandoned_at": utc_time(time.time())})
    lake.write_run(dead_id, record)
    log.warning("run %s never finished (%s): its record now says 'abandoned'; its committed "
                "slides stay, the rest is done by this run", dead_id, dead["how"])


def _run_leased(cfg: JobConfig, run_id: str, started: float, lake: Lake,
                weights: dict[str, Any], manifest: Manifest) -> dict[str, Any]:
    plan = plan_job(cfg, lake, weights, manifest)
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running", "started_at": utc_time(started),
        "driver_host": socket.gethostname(), "driver_pid": os.getpid(),
        "config": cfg.model_dump(), "versions": versions(), "plan": plan.summary(),
        "weights": {m: asdict(r) for m, r in weights.items()},
    }
    lake.write_run(run_id, record)
    log.info("run %s: %s", run_id, json.dumps(plan.summary()))
    use_gpu: dict[str, bool] = {}
    coord = Coordinator(cfg, plan, lake, run_id, use_gpu)

    def running_record(progress: dict[str, Any]) -> None:
        record["progress"] = progress
        # best effort and brief: an outage must not hold up the commits behind it
        lake.write_run(run_id, record, retry=RetryPolicy(retries=2, budget_s=5))

    coord.on_progress = running_record
    job_error = None
    compaction: dict[str, Any] | None = None
    started_ray = False
    try:
        if plan.tasks:
            started_ray = init_ray(cfg)
            use_gpu.update({m.id: _use_gpu(m.device) for m in cfg.models})
            # A slide encoder follows its own device setting, not its tile model's.
            use_gpu.update({s.id: _use_gpu(s.device) for s in slide_encoders(cfg).values()})
            for m, gpu in use_gpu.items():
                if not gpu:
                    log.warning("model %s: no GPU in the cluster; encoding on CPU (slow)", m)
            run_passes(cfg, plan, coord, use_gpu)
    except BaseException as err:
        job_error = failure_text(err)
        raise
    finally:
        coord.finish(job_error)
        if job_error is None and cfg.sink.compact and any(coord.committed.values()):
            try:
                compaction = lake.compact()
            except Exception as err:  # noqa: BLE001 - the commits are in; compact later
                compaction = {"error": f"{type(err).__name__}: {err}"}
                log.error("compaction failed (run `python -m pipeline compact %s` later): %s",
                          cfg.output, compaction["error"])
        unsaved = sum(len(rows) for _, rows in coord.unwritten)
        unsaved_error = (f"storage refused {unsaved} error rows to the end" if unsaved else None)
        verdict = job_error or unsaved_error or outcome_error(cfg, plan, coord)
        record.update({
            "status": "failed" if verdict else "succeeded",
            "error": plain_text(verdict) if verdict else None,
            "finished_at": utc_time(time.time()),
            "wall_s": round(time.time() - started, 3),
            "counts": {
                "committed": coord.committed,
                "tiles_encoded": coord.tiles_encoded,
                "up_to_date": plan.up_to_date,
                "errors": len(coord.errors),
            },
            "encoders": {m: ("cuda" if g else "cpu") for m, g in use_gpu.items()},
            "first_batch": coord.first_batch,
            "passes": coord.pass_mode,
            "placement": coord.placement.summary() if coord.placement else None,
            "commits": {"count": len(coord.commits),
                        "seconds": round(sum(c["seconds"] for c in coord.commits), 3)},
            "compaction": compaction,
            "progress": coord.progress(),
            "slides": coord.timings,
        })
        if cfg.sink.report:
            record["report"] = _write_report(cfg, run_id, record)
        kept = _save_record(cfg, lake, run_id, record, coord)
        if started_ray:  # a Ray this job started (or joined) is not left behind
            import ray

            ray.shutdown()
        if kept is not None:
            message = (f"run {run_id}: storage stayed unavailable past storage.retry_budget_s="
                       f"{cfg.storage.retry_budget_s:g} s at the end of the run: "
                       f"{unsaved} error rows{' and the run record' if kept[1] else ''} could "
                       f"not be written to {cfg.output}. They are kept in {kept[0]} and "
                       "written to the lake by the next run on it from this machine.")
            if job_error is None:
                raise UnsavedRecords(message)
            log.error("%s", message)
    return record


def _write_report(cfg: JobConfig, run_id: str, record: dict[str, Any]) -> str | None:
    """The run's HTML report, path relative to the lake (the record links it); a report that
    cannot be made costs a log line, never the run's outcome."""
    from pipeline.report import REPORTS, write_report

    try:
        write_report(cfg.output, run_id, storage=cfg.storage, record=record)
    except Exception as err:  # noqa: BLE001 - the embeddings are in; the page can be redone
        log.warning("could not write the run report (python -m pipeline report %s --run %s "
                    "writes it later): %s: %s", cfg.output, run_id, type(err).__name__, err)
        return None
    log.info("report: %s", join(cfg.output, REPORTS, f"{run_id}.html"))
    return f"{REPORTS}/{run_id}.html"


def _save_record(cfg: JobConfig, lake: Lake, run_id: str, record: dict[str, Any],
                 coord: Coordinator) -> tuple[Any, bool] | None:
    """Write the run record; what storage refuses (it, error rows) is kept on local disk.
    Returns (folder, record kept) when anything was kept."""
    record_kept = False
    try:
        lake.write_run(run_id, record)
    except Exception as err:  # noqa: BLE001 - kept locally below, and the run fails loudly
        log.error("could not write the run record: %s: %s", type(err).__name__, err)
        record_kept = True
    if not coord.unwritten and not record_kept:
        return None
    folder = keep(unsaved_root(cfg.sink.unsaved_dir), lake.url, run_id, coord.app_id,
                  coord.unwritten, record if record_kept else None)
    return folder, record_kept
