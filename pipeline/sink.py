"""Output lake: Delta Lake tables, their schemas, the commit protocol, and readers for users.

Layout (Delta tables of Hive-partitioned Parquet; one table per dataset and model, so each
model's rows read as one schema whatever its embedding width)::

    OUT/tiles/<model>/           Delta table, partitioned by cohort; one data file per slide
    OUT/slides/<model>/          Delta table, partitioned by cohort; one row per slide (per layer)
    OUT/errors/                  Delta table: failed manifest rows and slides, with a reason
    OUT/runs/<run_id>.json       config, versions, counts, timings of each run
    OUT/previews/<tiling_hash>/cohort=<c>/<slide>.jpg|.geojson  what was tiled (pipeline.preview)
    OUT/_lease.json              the running job's claim on the lake (pipeline.lease)

Commit protocol for one (slide, model). Writers on the cluster write the slide's tiles as one
Parquet file at a deterministic path (slide, work key) under its table; nothing references it
yet. The coordinator then commits, in this order, two Delta transactions per flush of slides:
the tiles table adds those files (and removes the files of rows they replace), then the slides
table adds the slides rows (replacing earlier rows of the same slides in the same transaction).
The slides row is the commit record: it names its tiles file (`tiles_path`) and both carry the
work key, so readers that start from slides rows (``read_tiles``, the documented joins) see a
slide's tiles only once its row is there, all of them, once. A kill between the two
transactions leaves a tiles file no slides row names; the re-run writes the same path again
(same rows, so adding it again is a no-op in Delta), and ``compact`` drops files no row names.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.storage import (
    RetryPolicy,
    atomic_write_bytes,
    join,
    protocol_of,
    url_to_fs,
    with_retries,
)

TILES, SLIDES, ERRORS, RUNS = "tiles", "slides", "errors", "runs"
PREVIEWS = "previews"
PARTITION = "cohort"  # the one partition column inside each table; the model is the table
EMBEDDING = "embedding"
EMBEDDING_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,150}$")


def safe_name(slide_id: str) -> str:
    """A file name for a slide id; ids that are not already safe get a short hash suffix."""
    if _SAFE.match(slide_id):
        return slide_id
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id).strip("._")[:100] or "slide"
    return f"{cleaned}-{hashlib.sha1(slide_id.encode()).hexdigest()[:10]}"


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    return pa.list_(EMBEDDING_TYPES[dtype], dim)


def tiles_schema(dim: int, dtype: str = "float32") -> pa.Schema:
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
        ("qc_background", pa.float32()),  # pipeline.qc: glass fraction,
        ("qc_sharpness", pa.float32()),   # variance of the Laplacian,
        ("qc_pen", pa.float32()),         # pen-ink fraction (null: tiling.qc off)
        ("work_key", pa.string()),        # the slides row these tiles belong to
        (EMBEDDING, embedding_type(dim, dtype)),
    ])


TIMESTAMP = pa.timestamp("us", tz="UTC")


def slides_schema(dim: int, dtype: str = "float32") -> pa.Schema:
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
        ("upsampled", pa.bool_()),        # level 0 is coarser than target_mpp: interpolated
        ("num_tiles", pa.int64()),
        ("tissue_area_mm2", pa.float64()),
        ("qc_background", pa.float64()),  # mean of the tiles' values
        ("qc_sharpness", pa.float64()),   # median of the tiles' values
        ("qc_pen", pa.float64()),         # mean of the tiles' values
        ("reader", pa.string()),          # "tiff" (direct JPEG decode) or "openslide"
        ("read_note", pa.string()),       # why not a faster way (fallbacks), else null
        ("damaged_tiles", pa.int64()),    # tiles on damaged JPEG tiles, delivered white
        ("damaged_tile_indices", pa.list_(pa.int32())),  # their tile_index values
        ("damage", pa.string()),          # the decoders' complaints, null when none
        ("tile_order", pa.string()),
        (EMBEDDING, embedding_type(dim, dtype)),
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
        ("tiles_path", pa.string()),      # the slide's tiles file, relative to its tiles table
        ("preview_path", pa.string()),    # JPEG of the thumbnail, mask and tiles (lake-relative)
        ("geojson_path", pa.string()),    # the same shapes for QuPath (lake-relative)
        ("code_version", pa.string()),
        ("run_id", pa.string()),
        ("tiling_started_at", TIMESTAMP),
        ("committed_at", TIMESTAMP),
        ("extra", pa.string()),           # the manifest's extra columns, as JSON
        (PARTITION, pa.string()),
    ])


def slides_table(rows: Sequence[Mapping[str, Any]], embeddings: np.ndarray,
                 dtype: str = "float32") -> pa.Table:
    """Slides rows (column -> value; a column left out is null) with their (N, D) embeddings,
    in the slides schema. A value under a name the schema lacks is an error, not dropped."""
    schema = slides_schema(int(embeddings.shape[1]), dtype)
    unknown = {k for r in rows for k in r} - set(schema.names)
    if unknown:
        raise ValueError(f"not columns of the slides table: {sorted(unknown)}")
    cols = [embedding_array(embeddings, dtype) if f.name == EMBEDDING
            else pa.array([r.get(f.name) for r in rows], f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


ERRORS_SCHEMA = pa.schema([
    ("slide_id", pa.string()),
    ("uri", pa.string()),
    ("cohort", pa.string()),
    ("model", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("manifest_row", pa.int32()),
    ("failed_at", TIMESTAMP),
    ("run_id", pa.string()),
    ("preview_path", pa.string()),        # when the slide got as far as its thumbnail
    ("geojson_path", pa.string()),
])


def now() -> datetime:
    return datetime.now(timezone.utc)


def embedding_array(emb: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.dtype(dtype))
    flat = pa.array(emb.reshape(-1), type=EMBEDDING_TYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


def parquet_bytes(table: pa.Table) -> bytes:
    """Embeddings: no dictionary (never repeats, 2x the cost to try), byte-stream-split floats.

    Plain zstd over byte-stream-split float columns is the cheapest encoding that still
    compresses embeddings, and every client reads it."""
    buf = io.BytesIO()
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    pq.write_table(table, buf, compression="zstd", compression_level=1,
                   use_dictionary=[c for c in ("slide_id", "work_key") if c in table.schema.names],
                   use_byte_stream_split=floats + [f"{EMBEDDING}.list.element"]
                   if EMBEDDING in table.schema.names else floats,
                   row_group_size=1 << 20, write_statistics=["slide_id", "tile_index", "x", "y"])
    return buf.getvalue()


def file_stats(table: pa.Table) -> str:
    """Delta's per-file statistics (row count, min/max/null counts of the key columns)."""
    mins, maxs, nulls = {}, {}, {}
    for name in ("slide_id", "tile_index", "x", "y"):
        if name not in table.schema.names or table.num_rows == 0:
            continue
        mm = pc.min_max(table[name])
        mins[name], maxs[name] = mm["min"].as_py(), mm["max"].as_py()
        nulls[name] = table[name].null_count
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs,
                       "nullCount": nulls})


@dataclass(frozen=True)
class TilesFile:
    """A slide's tiles written by a writer on the cluster, not yet part of the table."""

    model: str
    cohort: str
    slide_id: str
    work_key: str
    path: str          # relative to the model's tiles table
    size: int
    num_rows: int
    stats: str
    written_at_ms: int


@dataclass(frozen=True)
class CommittedSlide:
    cohort: str
    work_key: str
    tiles_path: str | None


def delta_storage_options(url: str, storage: StorageConfig) -> dict[str, str] | None:
    """delta-rs (object_store) options equivalent to the job's fsspec options."""
    if protocol_of(url) not in {"s3", "s3a"}:
        return None
    opts: dict[str, str] = {}
    if storage.endpoint_url:
        opts["AWS_ENDPOINT_URL"] = storage.endpoint_url
        if storage.endpoint_url.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if storage.region:
        opts["AWS_REGION"] = storage.region
    if storage.profile:
        opts["AWS_PROFILE"] = storage.profile
    if storage.anon:
        opts["AWS_SKIP_SIGNATURE"] = "true"
    # object_store retries reads itself within this budget; writes and commits are retried by
    # the Lake (with_retries), where a retry is known to be safe.
    opts["max_retries"] = str(storage.retries)
    opts["retry_timeout"] = f"{max(1, round(storage.retry_budget_s))}s"
    # Whole seconds, at least one: with sub-second backoff the fault-injection test made
    # delta-rs panic ("TokioMultiThreadExecutor has crashed", as in delta-rs #4085), and
    # after that panic no delta-rs call of the process worked again.
    opts["backoff_config.max_backoff"] = f"{max(1, round(storage.retry_max_backoff_s))}s"
    return opts


def _table_uri(url: str) -> str:
    """delta-rs wants a plain path for local tables and s3:// (not s3a) for S3."""
    proto = protocol_of(url)
    if proto in {"file", "local"}:
        return url.split("://", 1)[-1]
    return "s3://" + url.split("://", 1)[1] if proto == "s3a" else url


class Lake:
    """The output root. Writers on the cluster use ``write_tiles``; the coordinator commits."""

    def __init__(self, url: str, storage: StorageConfig | None = None,
                 embedding_dtype: str = "float32"):
        self.url = url.rstrip("/")
        self.storage = storage or StorageConfig()
        self.fs, self.root = url_to_fs(self.url, self.storage)
        self.fs.invalidate_cache()  # fsspec instances are shared: never plan from a stale listing
        self.embedding_dtype = embedding_dtype
        self.options = delta_storage_options(self.url, self.storage)
        self.retry = RetryPolicy.of(self.storage)
        self._open: dict[tuple[str, str | None], Any] = {}  # tables this process commits to

    # -- where things are --------------------------------------------------------------------

    def table_url(self, table: str, model: str | None = None) -> str:
        parts = [table] + ([model] if model is not None else [])
        return _table_uri(join(self.url, *parts))

    def table_path(self, table: str, model: str | None = None) -> str:
        """The same location as a path of ``self.fs``."""
        return join(self.root, table, *([model] if model is not None else []))

    def models(self, table: str) -> list[str]:
        """Models with a table under ``table/`` (one LIST, no per-slide requests)."""
        base = join(self.root, table)
        try:
            entries = with_retries(lambda: self.fs.ls(base, detail=False), self.retry,
                                   what=f"list {base}")
        except FileNotFoundError:
            return []
        # A folder per model; no "model=" in its name: Delta readers (Polars) take every
        # key=value folder above a table's files for a partition the table does not have.
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in entries]
        return sorted(n for n in names if n and n[0] not in "._" and "=" not in n)

    def delta(self, table: str, model: str | None = None) -> Any | None:
        """The Delta table, or None where it does not exist yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        def load() -> Any:
            try:
                return DeltaTable(self.table_url(table, model), storage_options=self.options)
            except TableNotFoundError:
                return None

        return with_retries(load, self.retry, what=f"read {table}/{model or ''} snapshot")

    # -- planning ----------------------------------------------------------------------------

    def committed(self) -> dict[tuple[str, str], CommittedSlide]:
        """(slide_id, model) -> its committed row, from each slides table's snapshot."""
        out: dict[tuple[str, str], CommittedSlide] = {}
        for model in self.models(SLIDES):
            dt = self.delta(SLIDES, model)
            if dt is None:
                continue
            t = dt.to_pyarrow_dataset().to_table(
                columns=["slide_id", PARTITION, "work_key", "tiles_path"])
            for sid, cohort, key, path in zip(*(t[c].to_pylist() for c in t.column_names),
                                              strict=True):
                out[(sid, model)] = CommittedSlide(cohort, key, path)
        return out

    # -- writers (on the cluster) ------------------------------------------------------------

    def tiles_relpath(self, cohort: str, slide_id: str, work_key: str) -> str:
        return f"{PARTITION}={cohort}/{safe_name(slide_id)}-{work_key[:16]}.parquet"

    def write_tiles(self, model: str, cohort: str, slide_id: str, work_key: str,
                    table: pa.Table) -> TilesFile:
        """One slide's tiles as one file; idempotent (same inputs, same path and rows)."""
        rel = self.tiles_relpath(cohort, slide_id, work_key)
        data = parquet_bytes(table)
        path = join(self.table_path(TILES, model), rel)
        with_retries(lambda: atomic_write_bytes(self.fs, path, data), self.retry,
                     what=f"write tiles of {slide_id} ({model})")
        return TilesFile(model, cohort, slide_id, work_key, rel, len(data), table.num_rows,
                         file_stats(table), int(time.time() * 1000))

    def preview_relpaths(self, tiling_hash: str, cohort: str, slide_id: str) -> tuple[str, str]:
        base = f"{PREVIEWS}/{tiling_hash}/{PARTITION}={cohort}/{safe_name(slide_id)}"
        return base + ".jpg", base + ".geojson"

    def write_preview(self, tiling_hash: str, cohort: str, slide_id: str, jpeg: bytes,
                      geojson: bytes) -> tuple[str, str]:
        """A slide's preview files (one per tiling spec; a re-run overwrites them); their
        paths relative to the lake root, as recorded in slides and errors rows."""
        rels = self.preview_relpaths(tiling_hash, cohort, slide_id)
        for rel, data in zip(rels, (jpeg, geojson), strict=True):
            path = join(self.root, rel)
            with_retries(lambda path=path, data=data: atomic_write_bytes(self.fs, path, data),
                         self.retry, what=f"write preview of {slide_id}")
        return rels

    # -- commits (the coordinator) -----------------------------------------------------------

    def _ensure(self, table: str, model: str | None, schema: pa.Schema,
                partition_by: list[str] | None) -> Any:
        """The table to commit to, created on first use; kept open between commits (delta-rs
        rebases a commit onto newer versions, so a handle need not be re-read each time)."""
        from deltalake import DeltaTable

        key = (table, model)
        dt = self._open.get(key)
        if dt is not None:
            return dt
        dt = self.delta(table, model)
        if dt is None:
            try:
                dt = DeltaTable.create(self.table_url(table, model), schema=schema,
                                       partition_by=partition_by, mode="ignore",
                                       storage_options=self.options)
            except Exception:  # noqa: BLE001 - a concurrent creator won: use its table
                dt = self.delta(table, model)
                if dt is None:
                    raise
        self._open[key] = dt
        return dt

    def commit_tiles(self, model: str, dim: int, files: Sequence[TilesFile],
                     replaced: Iterable[str] = ()) -> None:
        """Add written tiles files (and drop the files of rows they replace): one transaction."""
        from deltalake.transaction import AddAction, RemoveAction

        if not files:
            return
        schema = tiles_schema(dim, self.embedding_dtype).append(pa.field(PARTITION, pa.string()))
        adds: list[Any] = [AddAction(f.path, f.size, {PARTITION: f.cohort}, f.written_at_ms,
                                     True, f.stats) for f in files]
        gone = set(replaced) - {f.path for f in files}
        tries = 0

        def attempt() -> None:
            # Safe to repeat: adding a path the table has already is a no-op in Delta (the
            # later add of a path replaces the earlier), and removals only name present files.
            nonlocal tries
            tries += 1
            dt = self._ensure(TILES, model, schema, [PARTITION])
            _add_missing_columns(dt, schema)
            actions = list(adds)
            if gone or tries > 1:
                dt.update_incremental()
            if gone:  # only files still in the table can leave it
                stamp = int(time.time() * 1000)
                actions += [RemoveAction(p, True, stamp, partition_values=_partition_of(p))
                            for p in sorted(gone & table_files(dt))]
            dt.create_write_transaction(actions, "append", schema, partition_by=[PARTITION])
            # The handle does not follow its own commit: catch it up now (one new log entry),
            # or every later commit replays all commits since it was opened.
            dt.update_incremental()

        with_retries(attempt, self.retry, what=f"commit {len(files)} tiles files of {model}")

    def _append_once(self, table: str, model: str | None, rows: pa.Table,
                     partition_by: list[str] | None, txn: tuple[str, int] | None,
                     predicate: str | None, what: str) -> None:
        """Append (or replace-where) ``rows`` in one transaction, retried on storage faults.

        A write whose reply was lost may have landed; repeating it would add the rows twice.
        ``txn`` (an application id and a number that grows with each of its commits) goes into
        the transaction, and every attempt first asks the table whether that number is in (a
        batch may come back after an earlier call gave up, or from ``pipeline.unsaved``)."""
        from deltalake import CommitProperties, Transaction, write_deltalake

        def attempt() -> None:
            dt = self._ensure(table, model, rows.schema, partition_by)
            if txn is not None or predicate:
                # a replace-where must see every row committed so far; a txn check the latest
                dt.update_incremental()
            if txn is not None and (dt.transaction_version(txn[0]) or -1) >= txn[1]:
                return  # this batch landed already (its reply was lost)
            props = (CommitProperties(app_transactions=[Transaction(txn[0], txn[1])])
                     if txn is not None else None)
            # merge: tables written before a column was added (previews, QC) gain it
            write_deltalake(dt, rows, mode="overwrite" if predicate else "append",
                            predicate=predicate, partition_by=partition_by,
                            schema_mode="merge", commit_properties=props)

        with_retries(attempt, self.retry, what=what)

    def commit_slides(self, model: str, rows: pa.Table, replace: bool,
                      txn: tuple[str, int] | None = None) -> None:
        """Append slides rows; ``replace`` drops earlier rows of the same slides in the same
        transaction (Delta's replace-where), so a reader never sees a slide twice."""
        if rows.num_rows == 0:
            return
        predicate = None
        if replace:
            ids = ", ".join("'" + s.replace("'", "''") + "'"
                            for s in sorted(set(rows["slide_id"].to_pylist())))
            predicate = f"slide_id IN ({ids})"
        self._append_once(SLIDES, model, rows, [PARTITION], txn, predicate,
                          f"commit {rows.num_rows} slides rows of {model}")

    def write_errors(self, rows: list[dict[str, Any]], txn: tuple[str, int] | None = None
                     ) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
        self._append_once(ERRORS, None, table, None, txn, None, f"write {len(rows)} error rows")

    def compact(self, target_mb: int = 128) -> dict[str, Any]:
        """Few files per slides/errors table; tiles files no slides row names leave the table;
        a checkpoint per table.

        Tiles files stay one per slide (a MIL loader reads a slide's bag as one object). Each
        step is retried on storage faults: repeating one after a lost reply is harmless (a
        second compaction finds nothing to do, removals name only files still present)."""
        report: dict[str, Any] = {}

        def retried(what: str, fn: Any) -> Any:
            return with_retries(fn, self.retry, what=f"compact: {what}")

        def compact_table(table: str, model: str | None) -> None:
            def step() -> Any:
                dt = self.delta(table, model)
                if dt is None or len(table_files(dt)) <= 1:
                    return None
                return _metrics(dt.optimize.compact(target_size=target_mb << 20))

            got = retried(f"{table}/{model or ''}", step)
            if got is not None:
                report[table if model is None else f"{table}/{model}"] = got

        for model in self.models(SLIDES):
            compact_table(SLIDES, model)
        compact_table(ERRORS, None)
        named = {(m, c.tiles_path) for (_, m), c in self.committed().items() if c.tiles_path}
        for model in self.models(TILES):
            def drop_orphans(model: str = model) -> int:
                from deltalake.transaction import RemoveAction

                dt = self.delta(TILES, model)
                if dt is None:
                    return 0
                orphans = sorted(p for p in table_files(dt) if (model, p) not in named)
                if orphans:
                    stamp = int(time.time() * 1000)
                    dt.create_write_transaction(
                        [RemoveAction(p, True, stamp, partition_values=_partition_of(p))
                         for p in orphans], "append", dt.schema(), partition_by=[PARTITION])
                return len(orphans)

            removed = retried(f"orphans of tiles/{model}", drop_orphans)
            if removed:
                report[f"tiles/{model}"] = {"orphans_removed": removed}
        # A checkpoint per table: the next snapshot read (the next plan) is one Parquet file,
        # not a replay of every commit's JSON since the last one.
        tables = [(t, m) for t in (TILES, SLIDES) for m in self.models(t)] + [(ERRORS, None)]
        for table, model in tables:
            def checkpoint(table: str = table, model: str | None = model) -> None:
                dt = self.delta(table, model)
                if dt is not None:
                    dt.create_checkpoint()

            retried(f"checkpoint {table}/{model or ''}", checkpoint)
        return report

    def vacuum(self, retention_hours: float) -> dict[str, int]:
        """Delete files that left each table more than ``retention_hours`` ago."""
        out = {}
        for table in (TILES, SLIDES):
            for model in self.models(table):
                dt = self.delta(table, model)
                if dt is not None:
                    out[f"{table}/{model}"] = len(dt.vacuum(
                        retention_hours=int(retention_hours), dry_run=False,
                        enforce_retention_duration=False))
        errors = self.delta(ERRORS)
        if errors is not None:
            out[ERRORS] = len(errors.vacuum(retention_hours=int(retention_hours), dry_run=False,
                                            enforce_retention_duration=False))
        return out

    # -- run records ---------------------------------------------------------------------------

    def run_path(self, run_id: str) -> str:
        return join(self.root, RUNS, f"{run_id}.json")

    def write_run(self, run_id: str, record: dict[str, Any],
                  retry: RetryPolicy | None = None) -> None:
        data = json.dumps(record, indent=2, default=str).encode()
        with_retries(lambda: atomic_write_bytes(self.fs, self.run_path(run_id), data),
                     retry or self.retry, what=f"write run record {run_id}")

    def run_records(self) -> list[dict[str, Any]]:
        """Every run record's listing entry (name, mtime), newest last."""
        base = join(self.root, RUNS)
        self.fs.invalidate_cache(base)
        try:
            entries = with_retries(lambda: self.fs.ls(base, detail=True), self.retry,
                                   what=f"list {base}")
        except FileNotFoundError:
            return []

        def stamp(e: dict[str, Any]) -> float:
            t = e.get("mtime") or e.get("LastModified") or e.get("last_modified") or 0
            return float(t.timestamp() if hasattr(t, "timestamp") else t)

        runs = [e for e in entries if str(e["name"]).endswith(".json")]
        return sorted(runs, key=stamp)

    def read_run(self, run_id: str) -> dict[str, Any]:
        return json.loads(with_retries(lambda: self.fs.cat_file(self.run_path(run_id)),
                                       self.retry, what=f"read run record {run_id}"))

    def has_run(self, run_id: str) -> bool:
        self.fs.invalidate_cache(join(self.root, RUNS))
        return bool(with_retries(lambda: self.fs.exists(self.run_path(run_id)), self.retry,
                                 what=f"look for run record {run_id}"))


def _add_missing_columns(dt: Any, schema: pa.Schema) -> None:
    """A table created before a column existed (the QC columns) gains it, as nullable, before
    files that have it are added: an add action does not change the table's schema, and
    readers would not see the column. Harmless to repeat (a retry finds it there)."""
    from deltalake import Schema

    have = {f.name for f in dt.schema().fields}
    missing = [f for f in schema if f.name not in have]
    if missing:
        dt.alter.add_columns(Schema.from_arrow(pa.schema(missing)).fields)
        dt.update_incremental()


def table_files(dt: Any) -> set[str]:
    """Paths (relative to the table) of the data files in the table's current snapshot."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    return set(adds["path"].to_pylist()) if adds.num_rows else set()


def _partition_of(relpath: str) -> dict[str, str]:
    first = relpath.split("/", 1)[0]
    key, _, value = first.partition("=")
    return {key: value} if key == PARTITION else {}


def _metrics(m: Any) -> dict[str, Any]:
    return {k: m.get(k) for k in ("numFilesAdded", "numFilesRemoved")} if isinstance(m, dict) \
        else {"result": str(m)}


# ----------------------------------------------------------------------------------------------
# Readers for users: no Ray needed. Each starts from a Delta snapshot, so it sees committed
# rows only; tiles are found from the slides rows that name them (no listing).


def _with_fixed_embedding(table: pa.Table, model: str) -> pa.Table:
    """Delta has no fixed-size list type: give readers ``fixed_size_list<float, D>`` back."""
    if EMBEDDING not in table.schema.names:
        return table
    col = table[EMBEDDING]
    if pa.types.is_fixed_size_list(col.type) or table.num_rows == 0:
        return table
    lengths = pc.list_value_length(col)
    dim = pc.min_max(lengths)["max"].as_py()
    fixed = col.cast(pa.list_(col.type.value_type, dim))
    return table.set_column(table.schema.get_field_index(EMBEDDING), EMBEDDING, fixed)


def _models(lake: Lake, table: str, model: str | None, columns: Iterable[str] | None
            ) -> list[str]:
    models = lake.models(table)
    if model is not None:
        models = [m for m in models if m == model]
    if not models:
        raise FileNotFoundError(f"no {table} under {lake.url} for model {model!r}")
    if len(models) > 1 and (columns is None or EMBEDDING in columns):
        dims = {m: _dim(lake, table, m) for m in models}
        if len(set(dims.values())) > 1:
            raise ValueError(f"{table} holds several models ({', '.join(models)}) whose "
                             "embeddings differ in width: pass model=... (or columns without "
                             "'embedding')")
    return models


def _dim(lake: Lake, table: str, model: str) -> int | None:
    dt = lake.delta(table, model)
    if dt is None:
        return None
    t = dt.to_pyarrow_dataset().head(1, columns=[EMBEDDING])
    return len(t[EMBEDDING][0]) if t.num_rows else None


def _slides_of(lake: Lake, model: str, columns: list[str] | None) -> pa.Table | None:
    dt = lake.delta(SLIDES, model)
    if dt is None:
        return None
    t = dt.to_pyarrow_dataset().to_table(columns=columns)
    t = _with_fixed_embedding(t, model)
    return t.append_column("model", pa.array([model] * t.num_rows, pa.string()))


def read_slides(url: str, model: str | None = None, columns: Iterable[str] | None = None,
                storage: StorageConfig | None = None) -> pa.Table:
    """Committed slides rows of one model (or of all, where their embeddings share a width)."""
    lake = Lake(url, storage)
    cols = list(columns) if columns else None
    parts = [t for m in _models(lake, SLIDES, model, cols)
             if (t := _slides_of(lake, m, cols)) is not None]
    return pa.concat_tables(parts) if parts else slides_schema(1).empty_table()


def _tile_urls(lake: Lake, model: str, slides: pa.Table | None,
               slide_ids: Iterable[str] | None) -> dict[str, str]:
    if slides is None:
        return {}
    wanted = set(slide_ids) if slide_ids is not None else None
    base = join(lake.url, TILES, model)
    return {s: join(base, p) for s, p in zip(slides["slide_id"].to_pylist(),
                                             slides["tiles_path"].to_pylist(), strict=True)
            if p and (wanted is None or s in wanted)}


def tile_files(url: str, model: str, storage: StorageConfig | None = None,
               slide_ids: Iterable[str] | None = None) -> dict[str, str]:
    """slide_id -> URL of its tiles file (one object per slide), from the slides table alone:
    what a MIL data loader needs to fetch one slide's bag without listing the lake."""
    lake = Lake(url, storage)
    return _tile_urls(lake, model, _slides_of(lake, model, ["slide_id", "tiles_path"]),
                      slide_ids)


def _tiles_dataset(lake: Lake, model: str, files: dict[str, str]) -> pads.Dataset:
    base = lake.table_path(TILES, model)
    prefix = join(lake.url, TILES, model) + "/"
    paths = [join(base, p[len(prefix):]) for p in files.values()]
    kw: dict[str, Any] = {
        "filesystem": lake.fs, "format": "parquet", "partition_base_dir": base,
        "partitioning": pads.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")}
    ds = pads.dataset(paths, **kw)
    # The schema comes from the first file; one written before a column existed (QC) would
    # hide it in every file: columns it lacks are added, as nulls where a file has none.
    missing = [f for f in tiles_schema(1) if f.name not in ds.schema.names]
    return pads.dataset(paths, schema=pa.schema([*ds.schema, *missing]), **kw) if missing \
        else ds


def tiles_dataset(url: str, model: str, storage: StorageConfig | None = None,
                  slide_ids: Iterable[str] | None = None) -> pads.Dataset:
    """A pyarrow dataset over the tiles files of committed slides (cohort from the paths)."""
    lake = Lake(url, storage)
    return _tiles_dataset(lake, model, tile_files(url, model, storage, slide_ids))


def read_tiles(url: str, model: str | None = None, columns: Iterable[str] | None = None,
               storage: StorageConfig | None = None) -> pa.Table:
    """Tiles of committed slides of one model (or of all, where widths agree)."""
    lake = Lake(url, storage)
    cols = list(columns) if columns else None
    parts = []
    for m in _models(lake, TILES, model, cols):
        if lake.delta(SLIDES, m) is None:
            continue
        t = tiles_dataset(url, m, storage).to_table(columns=cols)
        parts.append(t.append_column("model", pa.array([m] * t.num_rows, pa.string())))
    if not parts:
        raise FileNotFoundError(f"no committed tiles under {url} for model {model!r}")
    return pa.concat_tables(parts)


def read_errors(url: str, run_id: str | None = None, storage: StorageConfig | None = None,
                current: bool = False) -> pa.Table:
    """The errors table: every failure of every run (its history), or one run's.

    ``current=True``: the status now, one row per (slide, model) that is failing: its latest
    failure, unless a later run committed that slide for that model. A row without a model
    (a bad manifest row) stands for every model of the slide."""
    lake = Lake(url, storage)
    dt = lake.delta(ERRORS)
    if dt is None:
        return ERRORS_SCHEMA.empty_table()
    ds = dt.to_pyarrow_dataset()
    history = ds.to_table(filter=pads.field("run_id") == run_id if run_id else None)
    return _current_errors(lake, history) if current else history


def _current_errors(lake: Lake, history: pa.Table) -> pa.Table:
    committed: dict[tuple[str, str], datetime] = {}  # (slide, model) -> last committed_at
    latest_commit: dict[str, datetime] = {}  # slide -> last commit of any model
    for m in lake.models(SLIDES):
        rows = _slides_of(lake, m, ["slide_id", "committed_at"])
        if rows is None:
            continue
        for sid, at in zip(rows["slide_id"].to_pylist(), rows["committed_at"].to_pylist(),
                           strict=True):
            committed[(sid, m)] = max(at, committed.get((sid, m), at))
            latest_commit[sid] = max(at, latest_commit.get(sid, at))
    newest: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for row in history.to_pylist():
        key = (row["slide_id"], row["model"])
        if key not in newest or row["failed_at"] >= newest[key]["failed_at"]:
            newest[key] = row
    still = []
    for (sid, model), row in sorted(newest.items(), key=lambda kv: (str(kv[0][0]),
                                                                     str(kv[0][1]))):
        done = committed.get((sid, model)) if model else latest_commit.get(sid)
        if done is None or done < row["failed_at"]:
            still.append(row)
    return pa.Table.from_pylist(still, schema=ERRORS_SCHEMA)


def duckdb_connect(url: str, models: Sequence[str] | None = None,
                   storage: StorageConfig | None = None, con: Any = None) -> Any:
    """A DuckDB connection with views ``"tiles_<model>"`` and ``"slides_<model>"`` over the
    committed rows, embeddings as ``FLOAT[D]`` (so ``array_cosine_similarity`` needs no cast),
    and ``errors`` (every failure) and ``errors_now`` (``read_errors(current=True)``).

    Tiles are scanned lazily from their files; nothing is read until a query runs."""
    import duckdb

    con = con or duckdb.connect()
    lake = Lake(url, storage)
    with_tiles = set(lake.models(TILES))
    for m in models or lake.models(SLIDES):
        slides = _slides_of(lake, m, None)  # read once: the view and the tiles files' list
        if slides is None:
            continue
        con.register(f"slides_{m}", slides)
        if m in with_tiles:
            con.register(f"tiles_{m}", _tiles_dataset(lake, m, _tile_urls(lake, m, slides, None)))
    history = read_errors(url, storage=storage)
    con.register("errors", history)  # every failure of every run
    con.register("errors_now", _current_errors(lake, history))  # what is failing now
    return con


__all__ = [
    "CommittedSlide", "ERRORS_SCHEMA", "Lake", "TilesFile", "duckdb_connect", "embedding_array",
    "embedding_type", "read_errors", "read_slides", "read_tiles", "safe_name", "slides_schema",
    "slides_table", "tile_files", "tiles_dataset", "tiles_schema",
]
