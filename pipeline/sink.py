"""Output lake: Parquet layout, schemas, the per-slide commit protocol, and readers for users.

Layout (Hive partitions, low cardinality only)::

    OUT/tiles/model=<model>/cohort=<cohort>/<slide>.parquet    all tiles of one slide, one file
    OUT/slides/model=<model>/cohort=<cohort>/<slide>.parquet   one row: the slide's commit record
    OUT/errors/run_id=<run>/part-<n>.parquet                   failed manifest rows and slides
    OUT/runs/<run_id>.json                                     config, versions, counts, timings

Commit protocol for one (slide, model): write the tiles file atomically, then the slides row
atomically. File names are deterministic, so a re-run after a crash overwrites with identical
rows instead of adding duplicates; a slide's tiles appear all at once or not at all, and the
slides row (the commit record) appears only after them. The refresh logic reads the slides rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.storage import atomic_write_bytes, join, url_to_fs

TILES, SLIDES, ERRORS, RUNS = "tiles", "slides", "errors", "runs"
PARTITIONING = ("model", "cohort")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,150}$")


def safe_name(slide_id: str) -> str:
    """A file name for a slide id; ids that are not already safe get a short hash suffix."""
    if _SAFE.match(slide_id):
        return slide_id
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id).strip("._")[:100] or "slide"
    return f"{cleaned}-{hashlib.sha1(slide_id.encode()).hexdigest()[:10]}"


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)


def tiles_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("slide_id", pa.string()),
        ("tile_index", pa.int32()),       # position in the slide's row-major tiling order
        ("x", pa.int64()),                # level-0 pixels, top-left
        ("y", pa.int64()),
        ("tile_px", pa.int32()),          # tile edge in pixels at `mpp`
        ("tile_l0", pa.float32()),        # tile edge in level-0 pixels
        ("mpp", pa.float32()),            # microns per pixel of the tile as encoded
        ("level", pa.int16()),            # pyramid level the pixels were read from
        ("level_mpp", pa.float32()),      # microns per pixel of that level
        ("tissue", pa.float32()),         # tissue fraction of the tile
        ("embedding", embedding_type(dim)),
    ])


TIMESTAMP = pa.timestamp("us", tz="UTC")


def slides_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("slide_id", pa.string()),
        ("uri", pa.string()),
        ("fingerprint", pa.string()),
        ("size_bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mpp", pa.float64()),
        ("mpp_source", pa.string()),
        ("vendor", pa.string()),
        ("objective_power", pa.float64()),
        ("target_mpp", pa.float64()),
        ("tile_px", pa.int32()),
        ("tile_l0", pa.float64()),
        ("level", pa.int16()),
        ("num_tiles", pa.int64()),
        ("tissue_area_mm2", pa.float64()),
        ("tile_order", pa.string()),
        ("embedding", embedding_type(dim)),
        ("aggregation", pa.string()),     # "mean", or the slide encoder that produced it
        ("layer", pa.int16()),            # slide-encoder layer (null for mean pooling)
        ("source_model", pa.string()),    # the tile model whose embeddings were aggregated
        ("model_dim", pa.int32()),
        ("precision", pa.string()),
        ("device", pa.string()),
        ("weights", pa.string()),
        ("weights_identity", pa.string()),
        ("weights_sha256", pa.string()),
        ("random_weights", pa.bool_()),
        ("tiling", pa.string()),
        ("tiling_hash", pa.string()),
        ("work_key", pa.string()),
        ("code_version", pa.string()),
        ("run_id", pa.string()),
        ("tiling_started_at", TIMESTAMP),
        ("committed_at", TIMESTAMP),
        ("extra", pa.string()),           # the manifest's extra columns, as JSON
    ])


ERRORS_SCHEMA = pa.schema([
    ("slide_id", pa.string()),
    ("uri", pa.string()),
    ("cohort", pa.string()),
    ("model", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("manifest_row", pa.int32()),
    ("at", TIMESTAMP),
])


def now() -> datetime:
    return datetime.now(timezone.utc)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    flat = pa.array(emb.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


@dataclass
class CommittedSlide:
    cohort: str
    work_key: str


class Lake:
    """The output root; all writes of the job go through here."""

    def __init__(self, url: str, storage: StorageConfig):
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url, storage)
        self.fs.invalidate_cache()  # fsspec instances are shared: never plan from a stale listing
        self.storage = storage

    def _path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def part_path(self, table: str, model: str, cohort: str, slide_id: str) -> str:
        return self._path(table, f"model={model}", f"cohort={cohort}",
                          f"{safe_name(slide_id)}.parquet")

    def committed(self) -> dict[tuple[str, str], CommittedSlide]:
        """(slide_id, model) -> where and with which work key it is committed."""
        if not self.fs.exists(self._path(SLIDES)):
            return {}
        table = read_slides(self.url, columns=["slide_id", "cohort", "work_key"],
                            storage=self.storage)
        return {(r["slide_id"], r["model"]): CommittedSlide(r["cohort"], r["work_key"])
                for r in table.to_pylist()}

    def commit_slide(self, model: str, cohort: str, slide_id: str, tiles: pa.Table | None,
                     slide_row: pa.Table, stale_cohort: str | None = None) -> None:
        if tiles is not None:  # slide encoders have no tiles of their own
            atomic_write_bytes(self.fs, self.part_path(TILES, model, cohort, slide_id),
                               _parquet_bytes(tiles))
        atomic_write_bytes(self.fs, self.part_path(SLIDES, model, cohort, slide_id),
                           _parquet_bytes(slide_row))
        if stale_cohort and stale_cohort != cohort:
            # The slide moved cohort: retire the old copy (commit record first).
            for table in (SLIDES, TILES):
                path = self.part_path(table, model, stale_cohort, slide_id)
                if self.fs.exists(path):
                    self.fs.rm_file(path)

    def write_errors(self, run_id: str, part: int, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
        atomic_write_bytes(self.fs, self._path(ERRORS, f"run_id={run_id}",
                                               f"part-{part:05d}.parquet"), _parquet_bytes(table))

    def write_run(self, run_id: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, indent=2, default=str).encode()
        atomic_write_bytes(self.fs, self._path(RUNS, f"{run_id}.json"), data)

    def read_run(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(self._path(RUNS, f"{run_id}.json")))


@dataclass
class SlideBuffer:
    """Embeddings of one slide arriving in any order (and possibly twice, after a retry)."""

    slide_id: str
    num_tiles: int
    dims: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)
    t_first: float = float("inf")
    t_last: float = 0.0
    rss_mb: float = 0.0
    encoder_nodes: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.num_tiles
        self.x = np.zeros(n, np.int64)
        self.y = np.zeros(n, np.int64)
        self.tissue = np.zeros(n, np.float32)
        self.received = np.zeros(n, bool)
        self.emb = {m: np.zeros((n, d), np.float16) for m, d in self.dims.items()}

    def add(self, rows: np.ndarray, batch: dict[str, np.ndarray], columns: dict[str, str]) -> None:
        idx = batch["index"][rows]
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_tiles):
            raise ValueError(f"{self.slide_id}: tile index out of range")
        self.x[idx] = batch["x"][rows]
        self.y[idx] = batch["y"][rows]
        self.tissue[idx] = batch["tissue"][rows]
        for model, col in columns.items():
            self.emb[model][idx] = batch[col][rows]
            nodes = batch.get("node__" + model)
            if nodes is not None:
                self.encoder_nodes.setdefault(model, set()).update(str(n) for n in nodes[rows])
        self.received[idx] = True
        for m in batch["meta"][rows]:
            if m:
                self.meta.update(json.loads(m))
        t = batch["t_chunk"][rows]
        self.t_first = min(self.t_first, float(t.min()))
        self.t_last = max(self.t_last, float(t.max()))
        self.rss_mb = max(self.rss_mb, float(batch["rss_mb"][rows].max()))

    @property
    def complete(self) -> bool:
        return bool(self.received.all())

    def tiles_table(self, model: str) -> pa.Table:
        m = self.meta
        n = self.num_tiles
        dim = self.dims[model]
        return pa.Table.from_arrays([
            pa.array([self.slide_id] * n, pa.string()),
            pa.array(np.arange(n, dtype=np.int32)),
            pa.array(self.x), pa.array(self.y),
            pa.array(np.full(n, m["tile_px"], np.int32)),
            pa.array(np.full(n, m["tile_l0"], np.float32)),
            pa.array(np.full(n, m["read_mpp"], np.float32)),
            pa.array(np.full(n, m["level"], np.int16)),
            pa.array(np.full(n, m["mpp"] * m["level_downsample"], np.float32)),
            pa.array(self.tissue),
            embedding_array(self.emb[model]),
        ], schema=tiles_schema(dim))

    def mean_embedding(self, model: str) -> np.ndarray:
        return self.emb[model].astype(np.float32).mean(axis=0, keepdims=True).astype(np.float16)


def slide_row(dim: int, rows: list[dict[str, Any]], embeddings: np.ndarray) -> pa.Table:
    """The slides-table rows of one (slide, model): usually one; one per layer for encoders."""
    schema = slides_schema(dim)
    cols = []
    for f in schema:
        if f.name == "embedding":
            cols.append(embedding_array(embeddings))
        else:
            cols.append(pa.array([r.get(f.name) for r in rows], f.type))
    return pa.Table.from_arrays(cols, schema=schema)


# ----------------------------------------------------------------------------------------------
# Readers for users: plain pyarrow, no Ray needed.


def _dataset(url: str, table: str, storage: StorageConfig | None = None) -> pads.Dataset:
    fs, root = url_to_fs(url.rstrip("/"), storage or StorageConfig())
    return pads.dataset(join(root, table), filesystem=fs, format="parquet", partitioning="hive")


def _read_per_model(url: str, table: str, model: str | None, columns: Iterable[str] | None,
                    storage: StorageConfig | None) -> pa.Table:
    """Models differ in embedding width, so each model's partition is read as its own dataset."""
    fs, root = url_to_fs(url.rstrip("/"), storage or StorageConfig())
    base = join(root, table)
    models = sorted(p.rsplit("model=", 1)[1] for p in fs.ls(base, detail=False)
                    if p.rstrip("/").rsplit("/", 1)[-1].startswith("model="))
    if model is not None:
        models = [m for m in models if m == model]
    if len(models) > 1 and (columns is None or "embedding" in columns):
        raise ValueError(f"{table} holds several models ({', '.join(models)}) whose embeddings "
                         "differ in width: pass model=... (or columns without 'embedding')")
    parts = []
    for m in models:
        ds = pads.dataset(join(base, f"model={m}"), filesystem=fs, format="parquet",
                          partitioning=pads.partitioning(pa.schema([("cohort", pa.string())]),
                                                         flavor="hive"))
        t = ds.to_table(columns=list(columns) if columns else None)
        parts.append(t.append_column("model", pa.array([m] * t.num_rows, pa.string())))
    if not parts:
        raise FileNotFoundError(f"no {table} under {url} for model {model!r}")
    return pa.concat_tables(parts)


def read_tiles(url: str, model: str | None = None, columns: Iterable[str] | None = None,
               storage: StorageConfig | None = None) -> pa.Table:
    """Tiles of one model (or of all models, when they share an embedding width)."""
    return _read_per_model(url, TILES, model, columns, storage)


def read_slides(url: str, model: str | None = None, columns: Iterable[str] | None = None,
                storage: StorageConfig | None = None) -> pa.Table:
    return _read_per_model(url, SLIDES, model, columns, storage)


def read_errors(url: str, run_id: str | None = None, storage: StorageConfig | None = None
                ) -> pa.Table:
    fs, root = url_to_fs(url.rstrip("/"), storage or StorageConfig())
    if not fs.exists(join(root, ERRORS)):
        return ERRORS_SCHEMA.empty_table()
    ds = _dataset(url, ERRORS, storage)
    return ds.to_table(filter=pads.field("run_id") == run_id if run_id else None)
