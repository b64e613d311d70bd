"""Writers on the cluster: tile embeddings go from the encoders to these, never to the driver.

    last encoder actor of a pass -> route_to_writers (called in that actor) -> SinkWriter
    actor owning the slide (by hash of its id) -> one tiles file per (slide, model) ->
    SlideResult (metadata, file paths, statistics, the slide's pooled embedding) -> the
    coordinator, which commits

Writers buffer a slide until all its tiles have arrived (in any order, possibly twice after a
retried task), then write it. Capacity grows with the number of writers (``sink.writers``).
"""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import StorageConfig
from pipeline.handoff import (
    ERROR,
    ERROR_STAGE,
    INDEX,
    META,
    NUM_TILES,
    RSS_MB,
    SLIDE_ID,
    T_CHUNK,
    TISSUE,
    WRITER_COLUMNS,
    TilingMeta,
    X,
    Y,
    embedding_column,
    is_encoder_column,
    node_column,
)
from pipeline.qc import QC_COLUMNS, slide_summary
from pipeline.sink import Lake, TilesFile, embedding_array, tiles_schema


@dataclass(frozen=True)
class WriterTask:
    """What a writer must know of a slide to name and fill its files."""

    cohort: str
    models: tuple[str, ...]
    work_keys: dict[str, str]
    slide_encoder: dict[str, bool] = field(default_factory=dict)  # tile model -> has one


@dataclass
class SlideResult:
    """A written slide, as the coordinator sees it: metadata only, plus pooled embeddings."""

    slide_id: str
    num_tiles: int
    meta: TilingMeta
    files: dict[str, TilesFile]
    means: dict[str, np.ndarray]                 # model -> (D,) float32 mean of its tiles
    slide_layers: dict[str, dict[int, np.ndarray] | str] = field(default_factory=dict)
    t_first: float = 0.0
    t_last: float = 0.0
    rss_mb: float = 0.0
    encoder_nodes: dict[str, list[str]] = field(default_factory=dict)
    qc: dict[str, float | None] = field(default_factory=dict)  # pipeline.qc.slide_summary
    error: str = ""  # the slide could not be written (storage kept failing): its error row


class SlideBuffer:
    """Embeddings of one slide arriving in any order (and possibly twice, after a retry)."""

    def __init__(self, slide_id: str, num_tiles: int, models: tuple[str, ...]):
        self.slide_id, self.num_tiles, self.models = slide_id, num_tiles, models
        n = num_tiles
        self.x = np.zeros(n, np.int64)
        self.y = np.zeros(n, np.int64)
        self.tissue = np.zeros(n, np.float32)
        self.qc = {c: np.full(n, np.nan, np.float32) for c in QC_COLUMNS}
        self.received = np.zeros(n, bool)
        self.emb: dict[str, np.ndarray] = {}
        self.meta: TilingMeta | None = None  # from the row that carries it (its last chunk)
        self.t_first, self.t_last, self.rss_mb = float("inf"), 0.0, 0.0
        self.encoder_nodes: dict[str, set[str]] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        idx = batch[INDEX]
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_tiles):
            raise ValueError(f"{self.slide_id}: tile index out of range")
        self.x[idx] = batch[X]
        self.y[idx] = batch[Y]
        self.tissue[idx] = batch[TISSUE]
        for c in QC_COLUMNS:
            self.qc[c][idx] = batch[c]
        for m in self.models:
            values = batch[embedding_column(m)]
            if m not in self.emb:  # the encoder's own dtype (fp16 on GPU): cast only on write
                self.emb[m] = np.zeros((self.num_tiles, values.shape[1]), values.dtype)
            self.emb[m][idx] = values
            nodes = batch.get(node_column(m))
            if nodes is not None:
                self.encoder_nodes.setdefault(m, set()).update(str(n) for n in nodes)
        self.received[idx] = True
        for meta in batch[META]:
            if meta:
                self.meta = TilingMeta.decode(meta)
        t = batch[T_CHUNK]
        self.t_first = min(self.t_first, float(t.min()))
        self.t_last = max(self.t_last, float(t.max()))
        self.rss_mb = max(self.rss_mb, float(batch[RSS_MB].max()))

    @property
    def complete(self) -> bool:
        return bool(self.received.all()) and self.meta is not None

    @property
    def tiling(self) -> TilingMeta:
        if self.meta is None:
            raise ValueError(f"{self.slide_id}: no tiling meta among the slide's rows")
        return self.meta

    def tiles_table(self, model: str, work_key: str, dtype: str) -> pa.Table:
        plan, n = self.tiling.plan, self.num_tiles
        if plan is None:
            raise ValueError(f"{self.slide_id}: tiles without a plan")
        emb = self.emb[model]
        return pa.Table.from_arrays([
            pa.array([self.slide_id] * n, pa.string()),
            pa.array(np.arange(n, dtype=np.int32)),
            pa.array(self.x), pa.array(self.y),
            pa.array(np.full(n, plan.tile_px, np.int32)),
            pa.array(np.full(n, plan.tile_l0, np.float32)),
            pa.array(np.full(n, plan.read_mpp, np.float32)),
            pa.array(np.full(n, plan.level, np.int16)),
            pa.array(np.full(n, plan.level_mpp, np.float32)),
            pa.array(self.tissue),
            # NaN (tiling.qc off) is stored as null: a filter on it then keeps no guess
            *(pa.array(self.qc[c], from_pandas=True) for c in QC_COLUMNS),
            pa.array([work_key] * n, pa.string()),
            embedding_array(emb, dtype),
        ], schema=tiles_schema(emb.shape[1], dtype))

    def qc_summary(self) -> dict[str, float | None]:
        return slide_summary(self.qc)

    def mean_embedding(self, model: str) -> np.ndarray:
        return self.emb[model].astype(np.float32).mean(axis=0)


class SinkWriter:
    """A Ray actor: buffers the slides it owns and writes each one's tiles once complete."""

    def __init__(self, output: str, storage: StorageConfig, embedding_dtype: str,
                 tasks: dict[str, WriterTask], slide_actors: dict[str, Any] | None = None):
        self.lake = Lake(output, storage, embedding_dtype)
        self.tasks = tasks
        self.slide_actors = slide_actors or {}
        self.buffers: dict[str, SlideBuffer] = {}
        self.done: set[str] = set()

    def add(self, slide_id: str, num_tiles: int, batch: dict[str, np.ndarray]) -> bytes | None:
        """Returns the pickled SlideResult when this batch completes the slide, else None."""
        if slide_id in self.done:
            return None  # a retried task re-delivered rows of a slide already written
        task = self.tasks[slide_id]
        buf = self.buffers.get(slide_id)
        if buf is None:
            buf = self.buffers[slide_id] = SlideBuffer(slide_id, num_tiles, task.models)
        buf.add(batch)
        if not buf.complete:
            return None
        del self.buffers[slide_id]
        self.done.add(slide_id)
        return pickle.dumps(self._write(slide_id, task, buf))

    def _write(self, slide_id: str, task: WriterTask, buf: SlideBuffer) -> SlideResult:
        files, means, layers = {}, {}, {}
        for m in task.models:
            try:
                files[m] = self.lake.write_tiles(
                    m, task.cohort, slide_id, task.work_keys[m],
                    buf.tiles_table(m, task.work_keys[m], self.lake.embedding_dtype))
            except Exception as err:  # noqa: BLE001 - this slide fails, not the job
                return SlideResult(slide_id, buf.num_tiles, buf.tiling, {}, {},
                                   error=f"{type(err).__name__}: {err}")
            means[m] = buf.mean_embedding(m)
            actor = self.slide_actors.get(m)
            if actor is not None:
                import ray

                # Tiling order is the buffer's index order; coordinates are level-0 px.
                coords = np.stack([buf.x, buf.y], axis=1)
                try:
                    layers[m] = ray.get(actor.__call__.remote(buf.emb[m], coords,
                                                              buf.tiling.plan.tile_l0))
                except Exception as err:  # noqa: BLE001 - this slide's failure, not the job's
                    layers[m] = f"{type(err).__name__}: {err}"
        return SlideResult(slide_id, buf.num_tiles, buf.tiling, files, means, layers,
                           buf.t_first, buf.t_last, buf.rss_mb,
                           {m: sorted(n) for m, n in buf.encoder_nodes.items()},
                           buf.qc_summary())

    def pending(self) -> list[str]:
        return sorted(self.buffers)


RESULT = "result"  # the pickled SlideResult of a written slide, in the coordinator's rows


def writer_of(slide_id: str, n: int) -> int:
    return zlib.crc32(slide_id.encode()) % n


def route_to_writers(batch: dict[str, np.ndarray], *, writers: list[Any]) -> dict[str, np.ndarray]:
    """Send each slide's rows to the writer that owns it; emit one metadata row per slide."""
    import ray

    ids = batch[SLIDE_ID]
    out_ids, errors, stages, metas, futures = [], [], [], [], []
    emb_cols = [c for c in batch if is_encoder_column(c)]
    for sid in np.unique(ids):
        sid = str(sid)
        rows = np.nonzero(ids == sid)[0]
        # A slide that failed mid-way has tile rows and then its error row: the error wins.
        failed = [r for r in rows if batch[ERROR][r]]
        first = failed[0] if failed else rows[0]
        err = str(batch[ERROR][first])
        out_ids.append(sid)
        errors.append(err)
        stages.append(str(batch[ERROR_STAGE][first]))
        metas.append(str(batch[META][first]))  # an error row's own: it names its preview
        if err:
            futures.append(None)
            continue
        sub = {c: batch[c][rows] for c in (*WRITER_COLUMNS, *emb_cols)}
        w = writers[writer_of(sid, len(writers))]
        futures.append(w.add.remote(sid, int(batch[NUM_TILES][rows[0]]), sub))
    refs = [f for f in futures if f is not None]
    got = iter(ray.get(refs)) if refs else iter(())
    results = [next(got) if f is not None else None for f in futures]
    return {
        SLIDE_ID: np.array(out_ids, dtype=object),
        ERROR: np.array(errors, dtype=object),
        ERROR_STAGE: np.array(stages, dtype=object),
        META: np.array(metas, dtype=object),
        RESULT: np.array([r if r is not None else b"" for r in results], dtype=object),
    }


def unpack(result: bytes) -> SlideResult | None:
    return pickle.loads(result) if result else None
