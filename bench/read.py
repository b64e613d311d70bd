"""Reading every slide embedding of one model from a 10,000-slide lake (local disk).

    .venv/bin/python bench/read.py [--slides 10000] [--dim 1024] [--batch 64] [--repeats 5]
        [--tiles-per-slide 4]

Set-up: a lake written as a job leaves it, one model (``uni``, 1024-d float32), 4 cohorts in
manifest order: per commit of ``--batch`` slides, ``Lake.commit_tiles`` (tiny real tiles files
of ``--tiles-per-slide`` rows each, so ``duckdb_connect`` finds its tiles too) then
``Lake.commit_slides``. "compaction off" is that lake as it is (about one slides data file per
commit); "compaction on" is a copy of it after ``Lake.compact()``.

Each reader ends with the slide ids and an (N, dim) float32 numpy matrix of the embeddings:

- ``read_slides``: ``pipeline.sink.read_slides(url, model, columns=[slide_id, embedding])``,
  and with every column;
- ``duckdb_connect``: ``pipeline.sink.duckdb_connect(url, [model])`` and
  ``SELECT slide_id, embedding FROM slides_<model>`` (the connection set-up included: it reads
  the slides table and registers the tiles dataset);
- ``duckdb read_parquet``: DuckDB over the Delta snapshot's file list
  (``DeltaTable(...).file_uris()``, snapshot load included), ``hive_partitioning``;
- ``polars read_delta``: ``pl.read_delta(table, columns=[...])``;
- ``deltalake``: ``DeltaTable(...).to_pyarrow_table(columns=[...])``, for reference.

Repeats are interleaved, after one untimed warm-up call of each reader (imports, first-call
set-up); the files were just written, so the page cache is warm (best and median of
``--repeats``, and the first timed repeat). Writes bench/results/read_<host>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import cpu_model, write_results  # noqa: E402
from lakekit import code_state, slides_rows, versions  # noqa: E402

from pipeline.sink import (  # noqa: E402
    SLIDES,
    TILES,
    Lake,
    TilesFile,
    duckdb_connect,
    embedding_array,
    file_stats,
    parquet_bytes,
    read_slides,
    table_files,
    tiles_schema,
)

MODEL = "uni"
KEY = "0123456789abcdef01234567"
COHORTS = ("TCGA-BRCA", "TCGA-LUAD", "TCGA-COAD", "CPTAC-UCEC")


def tiles_file(lake: Lake, sid: str, cohort: str, n: int, dim: int, key: str = KEY
               ) -> TilesFile:
    """A real (tiny) tiles file, written without fsync: this is set-up, not the writer."""
    emb = np.zeros((n, dim), np.float32)
    i = np.arange(n)
    t = pa.Table.from_arrays([
        pa.array([sid] * n), pa.array(i.astype(np.int32)), pa.array(i * 224),
        pa.array(i * 224), pa.array(np.full(n, 224, np.int32)),
        pa.array(np.full(n, 448.0, np.float32)), pa.array(np.full(n, 0.5, np.float32)),
        pa.array(np.zeros(n, np.int16)), pa.array(np.full(n, 0.25, np.float32)),
        pa.array(np.ones(n, np.float32)), pa.array([key] * n), embedding_array(emb)],
        schema=tiles_schema(dim))
    rel = lake.tiles_relpath(cohort, sid, key)
    path = Path(lake.table_path(TILES, MODEL)) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = parquet_bytes(t)
    path.write_bytes(data)
    return TilesFile(MODEL, cohort, sid, key, rel, len(data), n, file_stats(t),
                     int(time.time() * 1000))


def build(url: str, n: int, dim: int, batch: int, tiles_per_slide: int) -> dict[str, Any]:
    lake = Lake(url)
    t0 = time.perf_counter()
    per = -(-n // len(COHORTS))
    for s in range(0, n, batch):
        ids = [f"slide-{i:06d}" for i in range(s, min(n, s + batch))]
        cohorts = [COHORTS[i // per] for i in range(s, min(n, s + batch))]
        files = [tiles_file(lake, i, c, tiles_per_slide, dim)
                 for i, c in zip(ids, cohorts, strict=True)]
        lake.commit_tiles(MODEL, dim, files)
        lake.commit_slides(MODEL, slides_rows(ids, cohorts, [KEY] * len(ids),
                                              [f.path for f in files], dim, seed=s),
                           replace=False)
    return {"seconds": time.perf_counter() - t0, "commits": -(-n // batch)}


def replace_commit(url: str, n: int, dim: int, tiles_per_slide: int) -> dict[str, Any]:
    """A re-run's commit: 64 committed slides of one cohort get new rows (replace=True)."""
    lake = Lake(url)
    per = -(-n // len(COHORTS))
    start = min(1000, max(0, n - 64))
    ids = [f"slide-{i:06d}" for i in range(start, start + 64)]
    cohorts = [COHORTS[i // per] for i in range(start, start + 64)]
    key = "f" * 24
    files = [tiles_file(lake, i, c, tiles_per_slide, dim, key)
             for i, c in zip(ids, cohorts, strict=True)]
    old = [lake.tiles_relpath(c, i, KEY) for i, c in zip(ids, cohorts, strict=True)]

    def sizes() -> dict[str, int]:
        adds = pa.table(lake.delta(SLIDES, MODEL).get_add_actions(flatten=True))
        return dict(zip(adds["path"].to_pylist(), adds["size_bytes"].to_pylist(), strict=True))

    before = sizes()
    t0 = time.perf_counter()
    lake.commit_tiles(MODEL, dim, files, old)
    t1 = time.perf_counter()
    lake.commit_slides(MODEL, slides_rows(ids, cohorts, [key] * 64, [f.path for f in files],
                                          dim, seed=1), replace=True)
    t2 = time.perf_counter()
    after = sizes()
    return {"tiles_s": t1 - t0, "slides_s": t2 - t1,
            "slides_bytes_rewritten": sum(v for k, v in before.items() if k not in after),
            "slides_bytes_added": sum(v for k, v in after.items() if k not in before)}


def matrix(table: pa.Table, dim: int) -> tuple[list[str], np.ndarray]:
    """Slide ids and the (N, dim) float32 matrix, whatever list type the reader returned."""
    col = table["embedding"].combine_chunks()
    values = col.flatten() if hasattr(col, "flatten") else col.values
    emb = np.asarray(values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
    return table["slide_id"].to_pylist(), emb


def readers(url: str, dim: int) -> dict[str, Callable[[], tuple[list[str], np.ndarray]]]:
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    table = Lake(url).table_url(SLIDES, MODEL)
    cols = ["slide_id", "embedding"]

    def via_read_slides() -> tuple[list[str], np.ndarray]:
        return matrix(read_slides(url, MODEL, columns=cols), dim)

    def via_read_slides_all() -> tuple[list[str], np.ndarray]:
        return matrix(read_slides(url, MODEL), dim)

    def via_duckdb_connect() -> tuple[list[str], np.ndarray]:
        con = duckdb_connect(url, [MODEL])
        try:
            return matrix(_arrow(con.sql(f'SELECT slide_id, embedding FROM "slides_{MODEL}"')),
                          dim)
        finally:
            con.close()

    def via_duckdb_parquet() -> tuple[list[str], np.ndarray]:
        files = DeltaTable(table).file_uris()
        con = duckdb.connect()
        try:
            rel = con.sql("SELECT slide_id, embedding FROM read_parquet($files, "
                          "hive_partitioning = true)", params={"files": files})
            return matrix(_arrow(rel), dim)
        finally:
            con.close()

    def via_polars() -> tuple[list[str], np.ndarray]:
        df = pl.read_delta(table, columns=cols)
        ids = df["slide_id"].to_list()
        emb = df["embedding"].list.to_array(dim).to_numpy().astype(np.float32, copy=False)
        return ids, emb

    def via_deltalake() -> tuple[list[str], np.ndarray]:
        return matrix(DeltaTable(table).to_pyarrow_table(columns=cols), dim)

    return {"read_slides (2 columns)": via_read_slides, "read_slides (all columns)":
            via_read_slides_all, "duckdb_connect": via_duckdb_connect,
            "duckdb read_parquet(file_uris)": via_duckdb_parquet,
            "polars read_delta": via_polars, "deltalake to_pyarrow_table": via_deltalake}


def _arrow(rel: Any) -> pa.Table:
    got = rel.arrow()
    return got.read_all() if hasattr(got, "read_all") else got


def measure(lakes: dict[str, str], dim: int, n: int, repeats: int) -> dict[str, Any]:
    fns = {(lake, name): fn for lake, url in lakes.items()
           for name, fn in readers(url, dim).items()}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    errors: dict[tuple[str, str], str] = {}
    for (lake, _name), fn in fns.items():  # warm-up: imports and first-call set-up
        if lake == list(lakes)[-1]:
            try:
                fn()
            except Exception:  # noqa: BLE001, S110 - reported by the timed runs
                pass
    for r in range(repeats):
        keys = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in keys:
            if k in errors:
                continue
            t0 = time.perf_counter()
            try:
                ids, emb = fns[k]()
            except Exception as err:  # noqa: BLE001 - a reader that fails is reported
                errors[k] = f"{type(err).__name__}: {err}"[:300]
                continue
            times[k].append(time.perf_counter() - t0)
            assert len(ids) == n and emb.shape == (n, dim), (k, len(ids), emb.shape)
            assert len(set(ids)) == n
    out: dict[str, Any] = {}
    for (lake, name), ts in times.items():
        row = {"error": errors[(lake, name)]} if (lake, name) in errors else {
            "best_s": min(ts), "median_s": statistics.median(ts), "first_s": ts[0],
            "runs_s": ts}
        out.setdefault(lake, {})[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiles-per-slide", type=int, default=4)
    ap.add_argument("--scratch", default=None)
    args = ap.parse_args()
    out: dict[str, Any] = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                       "loadavg_start": os.getloadavg()},
                           "versions": versions(), "code": code_state(), "args": vars(args)}
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench-read-", dir=args.scratch))
    try:
        off, on = str(scratch / "lake"), str(scratch / "lake-compacted")
        out["build"] = build(off, args.slides, args.dim, args.batch, args.tiles_per_slide)
        shutil.copytree(off, on)
        t0 = time.perf_counter()
        out["compaction"] = {"report": Lake(on).compact(), "seconds": time.perf_counter() - t0}
        files = {}
        for name, url in (("compaction off", off), ("compaction on", on)):
            lake = Lake(url)
            dt = lake.delta(SLIDES, MODEL)
            files[name] = {"slides_data_files": len(table_files(dt)),
                           "slides_log_versions": dt.version() + 1,
                           "slides_bytes": sum(f.stat().st_size for f in
                                               Path(lake.table_path(SLIDES, MODEL)).rglob(
                                                   "*.parquet")
                                               if "_delta_log" not in f.parts)}
        out["lakes"] = files
        print(f"lake: {args.slides:,} slides x {args.dim}-d, {out['build']['commits']} commits "
              f"({out['build']['seconds']:.0f} s); slides data files: "
              + ", ".join(f"{k} {v['slides_data_files']}" for k, v in files.items()),
              flush=True)
        res = out["results"] = measure({"compaction off": off, "compaction on": on},
                                       args.dim, args.slides, args.repeats)
        out["replace_commit"] = {name: replace_commit(url, args.slides, args.dim,
                                                      args.tiles_per_slide)
                                 for name, url in (("compaction off", off),
                                                   ("compaction on", on))}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mb = args.slides * args.dim * 4 / 1e6
    print(f"\nall {args.slides:,} slide embeddings -> (N, {args.dim}) float32 ({mb:.0f} MB), "
          f"seconds, best / median of {args.repeats} (first timed)")
    names = list(next(iter(res.values())))
    print(f"{'reader':<32} " + " ".join(f"{k:>24}" for k in res))
    for name in names:
        cells = []
        for lake in res:
            r = res[lake][name]
            cells.append(f"{'error':>24}" if "error" in r else
                         f"{r['best_s']:>7.3f} / {r['median_s']:.3f} ({r['first_s']:.2f})"
                         .rjust(24))
        print(f"{name:<32} " + " ".join(cells))
    for lake, rows in res.items():
        for name, r in rows.items():
            if "error" in r:
                print(f"{lake} / {name}: {r['error']}")
    print("\nre-run commit of 64 slides (replace=True) on each lake:")
    for name, r in out["replace_commit"].items():
        print(f"  {name:<16} tiles {r['tiles_s']:.3f} s + slides {r['slides_s']:.3f} s; slides "
              f"bytes rewritten {r['slides_bytes_rewritten'] / 1e6:.1f} MB, written "
              f"{r['slides_bytes_added'] / 1e6:.1f} MB")
    out["wall_s"] = time.perf_counter() - started
    out["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\n{out['wall_s']:.0f} s; results: {write_results('read', out)}")


if __name__ == "__main__":
    main()
