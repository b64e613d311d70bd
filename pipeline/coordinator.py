"""The coordinator: the one place a job's results meet, as metadata only.

It sees one row per slide from every pass (the writers' ``SlideResult``: file paths, pooled
embeddings, timings), builds the slides rows from typed values, and commits Delta
transactions in small batches: tiles files first, then slides rows, both under the run's
application id so a retried commit that did land is not repeated. It also sends each slide to
its slide encoder's rows, batches error rows (kept for the next flush when storage refuses
them), and reports progress. No tile embedding reaches it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.config import JobConfig, TilingConfig
from pipeline.handoff import ERROR, ERROR_STAGE, META, SLIDE_ID, TilingMeta
from pipeline.models import specs
from pipeline.models.precision import precision_label, run_precision
from pipeline.placement import Placement
from pipeline.plan import TILE_ORDER, Plan, SlideTask, code_version, error_row, slide_encoders
from pipeline.sink import Lake, TilesFile, now, slides_table
from pipeline.slide_encode import aggregation_label, get_slide_model
from pipeline.writer import RESULT, SlideResult, unpack

log = logging.getLogger("pipeline")


@dataclass
class _Pending:
    """Rows of one output model waiting for the next commit."""

    files: list[TilesFile] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    replaced_tiles: list[str] = field(default_factory=list)
    replace: bool = False
    slides: list[str] = field(default_factory=list)


class Coordinator:
    """Sees one metadata row per slide from every pass and commits them in small batches."""

    def __init__(self, cfg: JobConfig, plan: Plan, lake: Lake, run_id: str,
                 use_gpu: dict[str, bool]):
        self.cfg, self.plan, self.lake, self.run_id = cfg, plan, lake, run_id
        self.use_gpu = use_gpu
        self.slides_of = slide_encoders(cfg)
        self.passes: dict[int, tuple[TilingConfig, dict[str, SlideTask]]] = {}
        self.done: dict[int, set[str]] = {}
        self.pending: dict[str, _Pending] = {}
        self.pending_slides = 0
        self.last_commit = time.monotonic()
        self.errors: list[dict[str, Any]] = list(plan.errors)
        self.errors_batched = 0  # errors[:errors_batched] are in a batch (written or not)
        self.unwritten: list[tuple[int, list[dict[str, Any]]]] = []  # (txn number, rows)
        self.last_error_flush = time.monotonic()
        # Every transaction of this run carries (app_id, seq): a retried write that did land
        # before its reply was lost is recognised, not repeated (Lake._append_once).
        self.app_id = f"wsi-pipeline:{run_id}"
        self.seq = 0
        self.committed: dict[str, int] = {m: 0 for m in plan.weights}
        self.tiles_encoded: dict[str, int] = {m: 0 for m in plan.weights}
        self.timings: list[dict[str, Any]] = []
        self.uncommitted_timings: list[dict[str, Any]] = []  # written, waiting for a commit
        self.commits: list[dict[str, Any]] = []
        # first encoded batch at the driver: start-up and pipeline fill end here
        self.first_batch: dict[str, Any] | None = None
        self.pass_mode = "none"
        self.placement: Placement | None = None
        self.last_progress = time.monotonic()
        # called with progress() every cfg.progress_seconds
        self.on_progress: Callable[[dict[str, Any]], None] | None = None

    def start_pass(self, pid: int, tiling: TilingConfig, tasks: list[SlideTask]) -> None:
        self.passes[pid] = (tiling, {t.entry.slide_id: t for t in tasks})
        self.done[pid] = set()

    def end_pass(self, pid: int, job_error: str | None) -> None:
        """Every slide of the pass not written or failed by now gets an error row."""
        reason = f"job stopped before this slide finished: {job_error}" if job_error else \
            "slide produced no output (internal error: please report)"
        for sid, task in self.passes[pid][1].items():
            if sid not in self.done[pid]:
                self._fail(pid, task, "incomplete", reason, ",".join(task.models))

    def add(self, pid: int, batch: dict[str, np.ndarray]) -> None:
        if self.first_batch is None:
            self.first_batch = {"at": time.time(), "rows": len(batch["slide_id"])}
        tiling, tasks = self.passes[pid]
        for sid, err, stage, meta, result in zip(batch[SLIDE_ID], batch[ERROR],
                                                 batch[ERROR_STAGE], batch[META],
                                                 batch[RESULT], strict=True):
            sid = str(sid)
            if sid in self.done[pid]:
                continue  # a retried task re-delivered a slide already handled
            task = tasks[sid]
            if err:
                self._fail(pid, task, str(stage), str(err),
                           tiled=TilingMeta.decode(meta) if meta else None)
                continue
            res = unpack(result)
            if res is not None and res.error:
                self._fail(pid, task, "write", res.error, ",".join(task.models), res.meta)
            elif res is not None:
                self._accept(pid, tiling, task, res)
        self.tick()

    def tick(self) -> None:
        """Commit and flush errors when due (called on every batch and while waiting)."""
        due = time.monotonic() - self.last_commit >= self.cfg.sink.commit_seconds
        if self.pending_slides and (due or self.pending_slides >= self.cfg.sink.commit_slides):
            self.commit()
        if time.monotonic() - self.last_error_flush > self.cfg.errors_flush_seconds:
            self.flush_errors()
        if time.monotonic() - self.last_progress >= self.cfg.progress_seconds:
            self.report_progress()

    def progress(self) -> dict[str, Any]:
        """Where the run stands: slides done of those planned, rates, an ETA from the rate
        since the first commit."""
        planned = len(self.plan.tasks)
        committed = {t["slide_id"] for t in self.timings}
        failed = {e["slide_id"] for e in self.errors} - committed
        done = len(committed) + len(failed & {t.entry.slide_id for t in self.plan.tasks})
        tiles = sum(t["num_tiles"] for t in self.timings)
        now_s = time.time()
        window = [t for t in self.timings if t["committed_at"] >= now_s - 60]
        first = min((t["committed_at"] for t in self.timings), default=None)
        rate = done / (now_s - first) if first and now_s > first else None
        return {"at": utc_time(now_s), "slides_planned": planned,
                "slides_committed": len(committed), "slides_failed": len(failed),
                "tiles_committed": tiles,
                "tiles_per_s_last_minute": round(sum(t["num_tiles"] for t in window) / 60, 1),
                "eta_s": round((planned - done) / rate) if rate else None}

    def report_progress(self) -> None:
        self.last_progress = time.monotonic()
        p = self.progress()
        eta = f"{p['eta_s'] // 60}m{p['eta_s'] % 60:02d}s" if p["eta_s"] is not None else "?"
        log.info("progress: %d/%d slides committed, %d failed, %d tiles, %.1f tiles/s "
                 "(last minute), ETA %s", p["slides_committed"], p["slides_planned"],
                 p["slides_failed"], p["tiles_committed"], p["tiles_per_s_last_minute"], eta)
        if self.on_progress is not None:
            try:
                self.on_progress(p)
            except Exception as err:  # noqa: BLE001 - progress is best effort; commits are not
                log.warning("could not update the run record's progress: %s", err)

    def _fail(self, pid: int, task: SlideTask, stage: str, reason: str,
              model: str | None = None, tiled: TilingMeta | None = None) -> None:
        """Error rows of one slide, one per model; ``tiled`` names its preview files when
        the slide got as far as its thumbnail."""
        e = task.entry
        for m in (model.split(",") if model else task.models):  # one model per row
            self.errors.append(error_row(slide_id=e.slide_id, uri=e.uri, cohort=e.cohort,
                                         stage=stage, reason=reason, row=e.row, model=m,
                                         preview_path=tiled.preview_path if tiled else None,
                                         geojson_path=tiled.geojson_path if tiled else None))
        log.warning("slide %s failed (%s): %s", e.slide_id, stage, reason)
        self.done[pid].add(e.slide_id)

    def _values(self, tiling: TilingConfig, task: SlideTask, res: SlideResult, m: str
                ) -> dict[str, Any]:
        """The slide row of tile model ``m`` (mean pooling), lineage included."""
        e, meta, plan = task.entry, res.meta, res.meta.plan
        assert plan is not None  # a written slide was planned
        ref = self.plan.weights[m]
        spec = specs.get(m)
        gpu = self.use_gpu[m]
        m_cfg = next(c for c in self.cfg.models if c.id == m)
        return {
            "slide_id": e.slide_id, "uri": e.uri, "fingerprint": str(task.fingerprint),
            "size_bytes": task.fingerprint.size, "width": plan.width, "height": plan.height,
            "mpp": plan.mpp, "mpp_source": plan.mpp_source, "vendor": plan.vendor,
            "objective_power": plan.objective_power, "target_mpp": plan.target_mpp,
            "tile_px": plan.tile_px, "tile_l0": plan.tile_l0, "level": plan.level,
            "upsampled": plan.upsampled,
            "num_tiles": res.num_tiles, "tissue_area_mm2": plan.tissue_area_mm2,
            **res.qc, **_read_values(meta),
            "preview_path": meta.preview_path, "geojson_path": meta.geojson_path,
            "tile_order": TILE_ORDER, "aggregation": "mean", "layer": None,
            "source_model": m, "model_dim": spec.dim,
            "precision": precision_label(spec.precision, gpu, m_cfg.tf32),
            "device": "cuda" if gpu else "cpu",
            "weights": ref.source, "weights_identity": ref.identity,
            "weights_sha256": ref.sha256, "random_weights": ref.random,
            "tiling": json.dumps(_used(tiling, meta), sort_keys=True),
            "tiling_hash": tiling.spec_hash(),
            "work_key": task.work_keys[m], "tiles_path": res.files[m].path,
            "code_version": code_version(), "run_id": self.run_id,
            "tiling_started_at": utc_time(meta.started_at),
            "committed_at": None, "extra": json.dumps(e.extra, default=str),
            "cohort": e.cohort,
        }

    def _queue(self, model: str, task: SlideTask, rows: list[dict[str, Any]],
               emb: list[np.ndarray], tiles: TilesFile | None) -> None:
        p = self.pending.setdefault(model, _Pending())
        prev = task.previous.get(model)
        if tiles is not None:
            p.files.append(tiles)
            if prev is not None and prev.tiles_path and prev.tiles_path != tiles.path:
                p.replaced_tiles.append(prev.tiles_path)
        p.rows += rows
        p.embeddings += emb
        p.replace = p.replace or prev is not None
        p.slides.append(task.entry.slide_id)

    def _accept(self, pid: int, tiling: TilingConfig, task: SlideTask, res: SlideResult
                ) -> None:
        for m in task.models:
            values = self._values(tiling, task, res, m)
            self._queue(m, task, [values], [res.means[m]], res.files[m])
            self.tiles_encoded[m] += res.num_tiles
            if m in self.slides_of:
                self._accept_slide_encoder(pid, task, m, values, res.slide_layers.get(m))
        self.uncommitted_timings.append({
            "slide_id": task.entry.slide_id, "num_tiles": res.num_tiles, "models": task.models,
            "tiling_started_at": res.meta.started_at, "last_chunk_at": res.t_last,
            "written_at": time.time(), "tiler_peak_rss_mb": res.rss_mb,
            "tiler_node": res.meta.node, "tiler_pid": res.meta.pid,
            "reader": res.meta.reader, "encoder_nodes": res.encoder_nodes,
        })
        self.done[pid].add(task.entry.slide_id)
        self.pending_slides += 1

    def _accept_slide_encoder(self, pid: int, task: SlideTask, m: str,
                              values: dict[str, Any], layers: Any) -> None:
        s = self.slides_of[m]
        if not isinstance(layers, dict):
            self.errors.append(error_row(
                slide_id=task.entry.slide_id, uri=task.entry.uri, cohort=task.entry.cohort,
                stage="slide_encoder", reason=f"{s.id}: {layers}", row=task.entry.row,
                model=s.id))
            return
        ref = self.plan.weights[s.id]
        gpu = self.use_gpu[s.id]
        spec = get_slide_model(s.id)
        rows = [{**values, "aggregation": aggregation_label(s), "layer": layer,
                 "model_dim": spec.dim, "precision": run_precision(spec.precision, gpu),
                 "weights": ref.source, "weights_identity": ref.identity,
                 "weights_sha256": ref.sha256, "random_weights": ref.random,
                 "work_key": task.work_keys[s.id], "tiles_path": None} for layer in layers]
        self._queue(s.id, task, rows, [layers[r["layer"]] for r in rows], None)

    def _next_txn(self) -> tuple[str, int]:
        self.seq += 1
        return self.app_id, self.seq

    def commit(self) -> None:
        """One Delta transaction per table and model: tiles files first, then slides rows.

        Storage faults are retried inside the Lake within ``storage.retry_budget_s``; past it
        this flush's slides of that model fail with error rows and the job goes on."""
        dtype = self.cfg.sink.embedding_dtype
        started = time.monotonic()
        landed: set[str] = set()  # slides with at least one model committed by this flush
        for model, p in sorted(self.pending.items()):
            if not p.rows:
                continue
            dim = int(p.embeddings[0].shape[-1])
            try:
                self.lake.commit_tiles(model, dim, p.files, p.replaced_tiles)
                stamp = now()
                for r in p.rows:
                    r["committed_at"] = stamp
                rows = slides_table(p.rows, np.stack(p.embeddings), dtype)
                self.lake.commit_slides(model, rows, replace=p.replace, txn=self._next_txn())
            except Exception as err:  # noqa: BLE001 - these slides fail, not the job
                self._commit_failed(model, p, f"{type(err).__name__}: {err}")
                continue
            self.committed[model] += len(set(p.slides))
            landed.update(p.slides)
            log.info("committed %d slides of %s: %s", len(set(p.slides)), model,
                     ", ".join(sorted(set(p.slides))[:8]) + (" ..." if len(p.slides) > 8 else ""))
        for t in self.uncommitted_timings:
            if t["slide_id"] in landed:  # its rows of the other models are error rows
                t["committed_at"] = time.time()
                self.timings.append(t)
        self.uncommitted_timings = []
        self.commits.append({"slides": self.pending_slides,
                             "seconds": round(time.monotonic() - started, 4)})
        self.pending.clear()
        self.pending_slides = 0
        self.last_commit = time.monotonic()

    def _commit_failed(self, model: str, p: _Pending, reason: str) -> None:
        log.error("could not commit %d slides of %s: %s", len(set(p.slides)), model, reason)
        by_id = {t.entry.slide_id: t for _, tasks in self.passes.values() for t in tasks.values()}
        for sid in sorted(set(p.slides)):
            e = by_id[sid].entry
            self.errors.append(error_row(slide_id=sid, uri=e.uri, cohort=e.cohort,
                                         stage="commit", reason=reason, row=e.row, model=model))

    def finish(self, job_error: str | None) -> None:
        """What is written gets committed (also after a failure elsewhere); errors flushed."""
        if self.pending_slides:
            self.commit()
        self.flush_errors()

    def flush_errors(self) -> None:
        """New error rows become a batch with its own transaction number; batches are written
        in order, and one storage refuses stays for the next flush (the same number again)."""
        new = self.errors[self.errors_batched:]
        if new:
            self.unwritten.append((self._next_txn()[1],
                                   [{**e, "run_id": self.run_id} for e in new]))
            self.errors_batched = len(self.errors)
        while self.unwritten:
            version, rows = self.unwritten[0]
            try:
                self.lake.write_errors(rows, txn=(self.app_id, version))
            except Exception as err:  # noqa: BLE001 - kept, written at the next flush
                log.error("could not write %d error rows (kept; tried again at the next "
                          "flush): %s: %s", len(rows), type(err).__name__, err)
                break
            self.unwritten.pop(0)
        self.last_error_flush = time.monotonic()


def _read_values(meta: TilingMeta) -> dict[str, Any]:
    """The slides row's account of how the pixels were read and which tiles were damaged."""
    damaged = list(meta.damaged or [])
    return {"reader": meta.reader, "read_note": meta.read_note,
            "damaged_tiles": len(damaged), "damaged_tile_indices": damaged,
            "damage": meta.damage}


def _used(tiling: TilingConfig, meta: TilingMeta) -> dict[str, Any]:
    """The tiling settings as used for this slide: the reader that read it and whether
    reduced-size decoding made its tiles (the config asks; the reader may decline, e.g. for
    a slide whose check tile halves differently). ``tiling_hash`` stays the config's."""
    used = tiling.model_dump()
    if meta.reader is not None:
        used["reader"] = meta.reader
    if meta.dct_downscale is not None:
        used["dct_downscale"] = meta.dct_downscale
    return used


def utc_time(t: float | None) -> datetime | None:
    return datetime.fromtimestamp(t, timezone.utc) if t else None
