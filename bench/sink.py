"""Sink capacity: what one writer stores per second, how writers add up, and what commits cost.

    .venv/bin/python bench/sink.py [--slides 40] [--tiles 2000] [--dim 1024] [--repeats 3]
        [--parts write,procs,ray,commit,s3] [--grow-to 64000] [--grow-batch 640]

UNI-sized rows (1024-d); embeddings arrive as random float16 (what encoders emit on a GPU),
in chunks of 64 tiles (``tiling.chunk_tiles``), shaped as ``route_to_writers`` hands them on.

- **write** (one process, side by side, interleaved repeats): ``SlideBuffer.add`` of every
  chunk + ``tiles_table`` + ``Lake.write_tiles`` (``parquet_bytes``, statistics, atomic file
  write with fsync), stored as float32 (the default) and as float16 (opt-in
  ``sink.embedding_dtype``), against the old baseline: the same buffer fill and rows as
  ``fixed_size_list<float16>`` through ``pq.write_table`` with default options (snappy,
  dictionary on, no byte-stream-split, plain file write). MB/s counts embedding bytes as
  stored (tiles x dim x 4 for float32, x 2 for float16); tiles/s is the rate that matters
  for keeping up with encoders.
- **procs**: the float32 write path in 1 and in 2 processes at once (fork, each its own
  slides, started together at a barrier): aggregate tiles/s and the ratio, with each
  process's CPU time over its wall time (1.0 = one core busy the whole time).
- **ray**: ``SinkWriter`` actors on a local ``ray.init(num_cpus=2)``, 1 and 2 of them, fed by
  the driver through ``SinkWriter.add`` (a window of 8 calls in flight per actor), against
  the raw figures of **procs** in the same run.
- **commit**: ``Lake.commit_tiles`` + ``Lake.commit_slides`` for batches of 64 slides, local
  disk, one ``Lake`` throughout (as the coordinator holds it: table handles kept open): on new
  tables, then after the tables have grown to ``--grow-to`` slides (64,000 = 1,000 commits of
  64), then the same with a new ``Lake`` per commit (every table re-read for each commit, as
  before ``Lake`` kept its handles), and re-run commits that replace rows (``replace=True``).
  Growth is fast-forwarded in commits of ``--grow-batch`` slides (same number of tiles files
  in the tiles table; fewer, larger files in the slides table than 1,000 real commits would
  leave); ``--grow-batch 64`` makes it literal (~7 min). The tiles files committed are not
  written: a commit only records them.
- **s3**: the same commits on a moto S3 server on 127.0.0.1 (its own process), with the HTTP
  requests of each tiles and slides transaction counted there, commit by commit on new tables,
  after growing to ``--s3-grow-to`` slides, and with a new ``Lake`` per commit.
- in both, **(**)**: the new-tables series again with a bench-only ``UpdatedLake`` (this file,
  not the pipeline's code): ``update_incremental()`` of the kept tiles handle after each tiles
  transaction. ``DeltaTable.create_write_transaction`` does not advance the handle it is
  called on, so without it each commit rebases over every commit since the handle opened.

Writes bench/results/sink_<host>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import cpu_model, write_results  # noqa: E402
from lakekit import CountingS3, code_state, set_s3_env, slides_rows, versions  # noqa: E402

import pipeline.sink as sink  # noqa: E402
from pipeline.config import StorageConfig  # noqa: E402
from pipeline.handoff import SlidePlan, TilingMeta, embedding_column  # noqa: E402
from pipeline.qc import QC_COLUMNS  # noqa: E402
from pipeline.sink import SLIDES, TILES, Lake, TilesFile, table_files  # noqa: E402
from pipeline.writer import SlideBuffer  # noqa: E402

MODEL = "uni"
KEY = "0123456789abcdef01234567"
CHUNK = 64
# A 40x slide read at 0.5 um/px from level 0, as the tiling stage describes it.
META = TilingMeta(1.7e9, SlidePlan(
    width=100_000, height=80_000, mpp=0.25, mpp_source="file", level=0, level_downsample=1.0,
    tile_px=224, tile_l0=448.0, target_mpp=0.5, num_tiles=0, tissue_area_mm2=0.0, vendor=None,
    objective_power=None, upsampled=False, read_mpp=0.5)).encode()


# ----------------------------------------------------------------------------------------------
# Inputs: chunks of random float16 embeddings, as encoders hand them to writers.


def make_slides(n_slides: int, n_tiles: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    """Per slide, its (tiles, dim) float16 embeddings (distinct random data per slide)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n_tiles, dim), dtype=np.float32).astype(np.float16)
            for _ in range(n_slides)]


def chunks(emb: np.ndarray, size: int = CHUNK) -> list[dict[str, np.ndarray]]:
    """A slide's rows in chunks of ``size`` tiles, shaped as route_to_writers sends them."""
    out = []
    for s in range(0, len(emb), size):
        i = np.arange(s, min(len(emb), s + size))
        out.append({"index": i, "x": (i % 200) * 448, "y": (i // 200) * 448,
                    "tissue": np.full(len(i), 0.8, np.float32),
                    **{c: np.full(len(i), 0.1, np.float32) for c in QC_COLUMNS},
                    embedding_column(MODEL): emb[s:s + size],
                    "meta": np.array([META] + [""] * (len(i) - 1), dtype=object),
                    "t_chunk": np.full(len(i), 1.7e9), "rss_mb": np.full(len(i), 100.0,
                                                                         np.float32)})
    return out


def fill(sid: str, n_tiles: int, parts: list[dict[str, np.ndarray]]) -> SlideBuffer:
    buf = SlideBuffer(sid, n_tiles, (MODEL,))
    for c in parts:
        buf.add(c)
    assert buf.complete
    return buf


# ----------------------------------------------------------------------------------------------
# (a) one writer process


class _Timed:
    """Wraps pipeline.sink.parquet_bytes to time the encoding inside write_tiles."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.inner = sink.parquet_bytes

    def __call__(self, table: pa.Table) -> bytes:
        t = time.perf_counter()
        try:
            return self.inner(table)
        finally:
            self.seconds += time.perf_counter() - t


def write_variant(variant: str, slides: list[np.ndarray], n_tiles: int, dim: int, out: Path,
                  prefix: str = "s") -> dict[str, float]:
    """Fill + table + store every slide with one variant; seconds per phase and sizes."""
    phases = {"fill": 0.0, "table": 0.0, "encode": 0.0, "store": 0.0}
    nbytes = 0
    timed = _Timed()
    dtype = "float16" if variant == "baseline" else variant
    lake = Lake(str(out), StorageConfig(), embedding_dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    sink.parquet_bytes = timed
    cpu0 = time.process_time()
    try:
        started = time.perf_counter()
        for k, emb in enumerate(slides):
            sid = f"{prefix}{k:05d}"
            parts = chunks(emb)
            t0 = time.perf_counter()
            buf = fill(sid, n_tiles, parts)
            t1 = time.perf_counter()
            table = buf.tiles_table(MODEL, KEY, dtype)
            t2 = time.perf_counter()
            if variant == "baseline":
                path = out / f"{sid}.parquet"
                pq.write_table(table, path)
                enc_s, nb = 0.0, path.stat().st_size
            else:
                before = timed.seconds
                f = lake.write_tiles(MODEL, "c0", sid, KEY, table)
                enc_s, nb = timed.seconds - before, f.size
            t3 = time.perf_counter()
            phases["fill"] += t1 - t0
            phases["table"] += t2 - t1
            phases["encode"] += enc_s
            phases["store"] += (t3 - t2) - enc_s
            nbytes += nb
        wall = time.perf_counter() - started
    finally:
        sink.parquet_bytes = timed.inner
    tiles = len(slides) * n_tiles
    itemsize = 2 if dtype == "float16" else 4
    return {"wall_s": wall, "cpu_s": time.process_time() - cpu0, **{f"{k}_s": v for k, v in
                                                                    phases.items()},
            "tiles": tiles, "tiles_per_s": tiles / wall,
            "emb_mb_per_s": tiles * dim * itemsize / wall / 1e6,
            "write_only_tiles_per_s": tiles / (wall - phases["fill"]),
            "file_bytes_per_tile": nbytes / tiles, "raw_emb_bytes_per_tile": dim * itemsize}


def bench_write(slides: list[np.ndarray], n_tiles: int, dim: int, repeats: int,
                scratch: Path) -> dict[str, Any]:
    variants = ("float32", "float16", "baseline")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    # a warm-up slide per variant: first-call costs (zstd contexts, imports) out of the figures
    for v in variants:
        write_variant(v, slides[:1], n_tiles, dim, scratch / "warm")
    shutil.rmtree(scratch / "warm", ignore_errors=True)
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            d = scratch / f"w-{v}"
            runs[v].append(write_variant(v, slides, n_tiles, dim, d))
            shutil.rmtree(d, ignore_errors=True)
    best = {v: max(rs, key=lambda x: x["tiles_per_s"]) for v, rs in runs.items()}
    base = best["baseline"]["tiles_per_s"]
    return {"runs": runs, "best": best,
            "ratio_tiles_per_s_vs_baseline": {v: best[v]["tiles_per_s"] / base
                                              for v in variants}}


# ----------------------------------------------------------------------------------------------
# (b) 1 vs 2 writer processes


def _proc(k: int, slides: list[np.ndarray], n_tiles: int, dim: int, out: str,
          barrier: Any, q: Any) -> None:
    barrier.wait()
    t0 = time.time()
    res = write_variant("float32", slides, n_tiles, dim, Path(out), prefix=f"p{k}-")
    q.put({"start": t0, "end": time.time(), **res})


def run_procs(n: int, slides: list[np.ndarray], n_tiles: int, dim: int, scratch: Path
              ) -> dict[str, Any]:
    ctx = mp.get_context("fork")  # the slides' chunks are shared copy-on-write
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_proc, args=(k, slides, n_tiles, dim,
                                             str(scratch / f"p{n}-{k}"), barrier, q))
             for k in range(n)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    for k in range(n):
        shutil.rmtree(scratch / f"p{n}-{k}", ignore_errors=True)
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    tiles = sum(r["tiles"] for r in res)
    return {"processes": n, "wall_s": wall, "tiles": tiles, "tiles_per_s": tiles / wall,
            "emb_mb_per_s": tiles * dim * 4 / wall / 1e6,
            "cpu_per_wall": [r["cpu_s"] / r["wall_s"] for r in res],
            "per_process_tiles_per_s": [r["tiles_per_s"] for r in res],
            "loadavg_after": os.getloadavg()}


def bench_procs(slides: list[np.ndarray], n_tiles: int, dim: int, repeats: int,
                scratch: Path) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for r in range(repeats):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            runs[n].append(run_procs(n, slides, n_tiles, dim, scratch))
    best = {n: max(rs, key=lambda x: x["tiles_per_s"]) for n, rs in runs.items()}
    return {"runs": runs, "best": best,
            "ratio_2_vs_1": best[2]["tiles_per_s"] / best[1]["tiles_per_s"]}


# ----------------------------------------------------------------------------------------------
# (c) SinkWriter actors on a local Ray


def bench_ray(slides: list[np.ndarray], n_tiles: int, dim: int, scratch: Path,
              sizes: tuple[int, ...] = (64, 512), window: int = 8) -> dict[str, Any]:
    """Tiles/s of 1 and 2 SinkWriter actors fed by the driver, ``size`` tiles a call."""
    import ray

    from pipeline.writer import SinkWriter, WriterTask, unpack, writer_of

    set_s3_env()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=1_500_000_000, log_to_driver=False)
    out: dict[str, Any] = {"ray_init_s": time.perf_counter() - t0, "window_per_actor": window,
                           "runs": {}}
    try:
        for size in sizes:
            for n in (1, 2):
                out["runs"][f"{n}x{size}"] = _ray_run(ray, SinkWriter, WriterTask, unpack,
                                                      writer_of, slides, n_tiles, dim,
                                                      scratch / f"ray-{n}-{size}", n, size,
                                                      window)
    finally:
        ray.shutdown()
    for size in sizes:
        out[f"ratio_2_vs_1_at_{size}"] = (out["runs"][f"2x{size}"]["tiles_per_s"]
                                          / out["runs"][f"1x{size}"]["tiles_per_s"])
    return out


def _ray_run(ray: Any, SinkWriter: Any, WriterTask: Any, unpack: Any, writer_of: Any,
             slides: list[np.ndarray], n_tiles: int, dim: int, lake_dir: Path, n: int,
             size: int, window: int) -> dict[str, Any]:
    ids = [f"r{n}-{size}-{k:05d}" for k in range(len(slides))]
    wsid = f"warm-{n}-{size}"
    shards: list[dict[str, Any]] = [{} for _ in range(n)]
    for sid in [*ids, wsid]:
        shards[writer_of(sid, n)][sid] = WriterTask("c0", (MODEL,), {MODEL: KEY})
    actor = ray.remote(SinkWriter).options(num_cpus=0, max_restarts=0)  # as start_writers
    writers = [actor.remote(str(lake_dir), StorageConfig().model_dump(), "float32", shard)
               for shard in shards]
    # warm-up: actor start and imports happen before the clock starts
    warm = chunks(slides[0][:64])[0]
    for k, w in enumerate(writers):
        ray.get(w.add.remote(wsid, 64, warm) if writer_of(wsid, n) == k
                else w.pending.remote())
    feed = [(sid, chunks(emb, size)) for sid, emb in zip(ids, slides, strict=True)]
    inflight: dict[int, list[Any]] = {k: [] for k in range(n)}
    results = []
    cpu0 = time.process_time()
    started = time.perf_counter()
    for sid, parts in feed:
        k = writer_of(sid, n)
        for c in parts:
            if len(inflight[k]) >= window:
                done, inflight[k] = ray.wait(inflight[k], num_returns=1)
                results += ray.get(done)
            inflight[k].append(writers[k].add.remote(sid, n_tiles, c))
    for refs in inflight.values():
        results += ray.get(refs)
    wall = time.perf_counter() - started
    written = [r for r in (unpack(x) for x in results if x) if r is not None]
    assert len(written) == len(ids), (len(written), len(ids))
    for w in writers:
        ray.kill(w)
    shutil.rmtree(lake_dir, ignore_errors=True)
    tiles = len(ids) * n_tiles
    calls = sum(len(p) for _, p in feed)
    return {"actors": n, "tiles_per_call": size, "wall_s": wall, "tiles": tiles,
            "tiles_per_s": tiles / wall, "emb_mb_per_s": tiles * dim * 4 / wall / 1e6,
            "calls": calls, "ms_per_call": wall / calls * 1e3,
            "driver_cpu_per_wall": (time.process_time() - cpu0) / wall}


# ----------------------------------------------------------------------------------------------
# (d) commit cost


def tiles_files(lake: Lake, ids: list[str], cohorts: list[str], key: str) -> list[TilesFile]:
    stamp = int(time.time() * 1000)
    return [TilesFile(MODEL, c, s, key, lake.tiles_relpath(c, s, key), 3_600_000, 2000,
                      json.dumps({"numRecords": 2000, "minValues": {"slide_id": s,
                                                                    "tile_index": 0},
                                  "maxValues": {"slide_id": s, "tile_index": 1999},
                                  "nullCount": {"slide_id": 0, "tile_index": 0}}), stamp)
            for s, c in zip(ids, cohorts, strict=True)]


class UpdatedLake(Lake):
    """Not the pipeline's code: Lake plus ``update_incremental()`` of the tiles table's kept
    handle after each tiles transaction (``create_write_transaction`` does not advance the
    handle, so without it every commit rebases over all commits since the handle opened)."""

    def commit_tiles(self, model: str, dim: int, files: Any, replaced: Any = ()) -> None:
        super().commit_tiles(model, dim, files, replaced)
        dt = getattr(self, "_open", {}).get((TILES, model))
        if dt is not None:
            dt.update_incremental()


class Committer:
    """Commits batches of slides as Coordinator.commit does (tiles, then slides)."""

    COHORTS = ("TCGA-BRCA", "TCGA-LUAD", "TCGA-COAD", "CPTAC")

    def __init__(self, lake: Lake, dim: int, s3: CountingS3 | None = None):
        self.lake, self.dim, self.next, self.s3 = lake, dim, 0, s3

    def batch(self, n: int) -> tuple[list[str], list[str]]:
        ids = [f"slide-{self.next + i:07d}" for i in range(n)]
        # a manifest in cohort order: a batch is mostly one cohort, sometimes two
        cohorts = [self.COHORTS[((self.next + i) // 2500) % len(self.COHORTS)]
                   for i in range(n)]
        self.next += n
        return ids, cohorts

    def commit(self, ids: list[str], cohorts: list[str], key: str = KEY,
               replace: bool = False, replaced: list[str] | None = None,
               fresh_lake: bool = False) -> dict[str, float]:
        lake = Lake(self.lake.url, self.lake.storage) if fresh_lake else self.lake
        files = tiles_files(lake, ids, cohorts, key)
        rows = slides_rows(ids, cohorts, [key] * len(ids), [f.path for f in files], self.dim)
        out: dict[str, float] = {}
        if self.s3 is not None:
            self.s3.reset()
        t0 = time.perf_counter()
        lake.commit_tiles(MODEL, self.dim, files, replaced or [])
        t1 = time.perf_counter()
        if self.s3 is not None:
            out["tiles_requests"] = self.s3.total()
            self.s3.reset()
            t1 = time.perf_counter()
        lake.commit_slides(MODEL, rows, replace=replace)
        t2 = time.perf_counter()
        if self.s3 is not None:
            out["slides_requests"] = self.s3.total()
            out["requests"] = out["tiles_requests"] + out["slides_requests"]
        return {"tiles_s": t1 - t0, "slides_s": t2 - t1, "total_s": t2 - t1 + (t1 - t0), **out}


def _summary(rows: list[dict[str, float]], extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    out: dict[str, Any] = {"commits": len(rows)}
    for k in ("tiles_s", "slides_s", "total_s"):
        v = sorted(r[k] for r in rows)
        out[f"median_{k}"] = statistics.median(v)
        out[f"p90_{k}"] = v[min(len(v) - 1, int(0.9 * len(v)))]
    if "requests" in rows[0]:
        for k in ("requests", "tiles_requests", "slides_requests"):
            out[f"median_{k}"] = statistics.median(r[k] for r in rows)
        out["tiles_requests_each"] = [r["tiles_requests"] for r in rows]
    return {**out, **(extra or {})}


def commit_series(c: Committer, n: int, batch: int = 64, fresh_lake: bool = False
                  ) -> list[dict[str, float]]:
    return [c.commit(*c.batch(batch), fresh_lake=fresh_lake) for _ in range(n)]


def grow(c: Committer, to: int, step: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    n = 0
    while c.next + step <= to:
        c.commit(*c.batch(step))
        n += 1
    if c.next < to:
        c.commit(*c.batch(to - c.next))
        n += 1
    return {"grown_to_slides": c.next, "grow_commits": n, "grow_s": time.perf_counter() - t0}


def replace_series(c: Committer, n: int) -> list[dict[str, float]]:
    """Re-runs: 64 committed slides get new work keys (new tiles files, old ones removed)."""
    rows = []
    for k in range(n):
        start = 64 * (2 * k + 1)
        ids = [f"slide-{i:07d}" for i in range(start, start + 64)]
        cohorts = [Committer.COHORTS[(i // 2500) % len(Committer.COHORTS)]
                   for i in range(start, start + 64)]
        old = [c.lake.tiles_relpath(co, s, KEY) for s, co in zip(ids, cohorts, strict=True)]
        rows.append(c.commit(ids, cohorts, key=f"{k:08d}" + KEY[8:], replace=True,
                             replaced=old))
    return rows


def bench_commit(dim: int, scratch: Path, first: int, grow_to: int, grow_batch: int,
                 after: int) -> dict[str, Any]:
    url = str(scratch / "commit-lake")
    lake = Lake(url)
    c = Committer(lake, dim)
    new = commit_series(c, first)
    new_updated = commit_series(Committer(UpdatedLake(str(scratch / "commit-lake-2")), dim),
                                first)
    g = grow(c, grow_to, grow_batch)
    grown = commit_series(c, after)
    fresh = commit_series(c, after, fresh_lake=True)
    repl = replace_series(c, max(3, after // 4))
    dt = lake.delta(TILES, MODEL)
    t0 = time.perf_counter()
    sizes = {TILES: len(table_files(dt))}
    files_s = time.perf_counter() - t0
    sizes[SLIDES] = len(table_files(lake.delta(SLIDES, MODEL)))
    t0 = time.perf_counter()
    lake.delta(TILES, MODEL)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    committed = lake.committed()
    committed_s = time.perf_counter() - t0
    out = {"new_tables": _summary(new), "new_tables_updated_handle": _summary(new_updated),
           "grown": _summary(grown, {**g, "table_files": sizes}),
           "grown_fresh_lake": _summary(fresh), "replace_on_grown": _summary(repl),
           "grown_tiles_table_open_s": open_s, "grown_tiles_table_files_s": files_s,
           "lake_committed_s_on_grown": committed_s, "committed_rows": len(committed)}
    out["grown_vs_new_total"] = (out["grown"]["median_total_s"]
                                 / out["new_tables"]["median_total_s"])
    shutil.rmtree(scratch / "commit-lake", ignore_errors=True)
    shutil.rmtree(scratch / "commit-lake-2", ignore_errors=True)
    return out


def bench_s3_commit(dim: int, first: int, grow_to: int, grow_batch: int, after: int
                    ) -> dict[str, Any]:
    s3 = CountingS3()
    try:
        bucket = s3.bucket("bench-sink")
        storage = StorageConfig(endpoint_url=s3.endpoint)
        lake = Lake(f"s3://{bucket}/lake", storage)
        c = Committer(lake, dim, s3)
        new = commit_series(c, first)
        new_updated = commit_series(Committer(UpdatedLake(f"s3://{bucket}/lake2", storage),
                                              dim, s3), first)
        c.s3 = None
        s3.reset()
        g = grow(c, grow_to, grow_batch)
        g["grow_requests"] = s3.total()
        c.s3 = s3
        grown = commit_series(c, after)
        c.s3 = None
        s3.reset()
        c.commit(*c.batch(64))
        one = s3.report()
        c.s3 = s3
        fresh = commit_series(c, after, fresh_lake=True)
        repl = replace_series(c, max(2, after // 4))
        out = {"new_tables": _summary(new), "new_tables_updated_handle": _summary(new_updated),
               "grown": _summary(grown, g),
               "grown_fresh_lake": _summary(fresh), "replace_on_grown": _summary(repl),
               "one_commit_requests": one}
        out["grown_vs_new_total"] = (out["grown"]["median_total_s"]
                                     / out["new_tables"]["median_total_s"])
        return out
    finally:
        s3.stop()


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="write,procs,ray,commit,s3")
    ap.add_argument("--first-commits", type=int, default=30)
    ap.add_argument("--grow-to", type=int, default=64_000)
    ap.add_argument("--grow-batch", type=int, default=640)
    ap.add_argument("--after-commits", type=int, default=12)
    ap.add_argument("--s3-grow-to", type=int, default=12_800)
    ap.add_argument("--scratch", default=None, help="local dir for the lakes (default: tmp)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    scratch = Path(tempfile.mkdtemp(prefix="bench-sink-", dir=args.scratch))
    out: dict[str, Any] = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                       "loadavg_start": os.getloadavg()},
                           "versions": versions(), "code": code_state(),
                           "args": vars(args)}
    started = time.perf_counter()
    try:
        slides = None
        if parts & {"write", "procs", "ray"}:
            t0 = time.perf_counter()
            slides = make_slides(args.slides, args.tiles, args.dim)
            print(f"inputs: {args.slides} slides x {args.tiles} tiles x {args.dim}-d float16 "
                  f"({time.perf_counter() - t0:.1f} s to generate)", flush=True)
        if "write" in parts:
            assert slides is not None
            w = out["write"] = bench_write(slides, args.tiles, args.dim, args.repeats, scratch)
            print("\n(a) one writer process, best of", args.repeats, "interleaved repeats")
            print(f"{'variant':<10} {'tiles/s':>9} {'emb MB/s':>9} {'x base':>7} "
                  f"{'B/tile':>7} {'fill':>6} {'table':>6} {'encode':>7} {'store':>6}")
            for v, b in w["best"].items():
                print(f"{v:<10} {b['tiles_per_s']:>9,.0f} {b['emb_mb_per_s']:>9.1f} "
                      f"{w['ratio_tiles_per_s_vs_baseline'][v]:>7.2f} "
                      f"{b['file_bytes_per_tile']:>7,.0f} {b['fill_s']:>6.2f} "
                      f"{b['table_s']:>6.2f} {b['encode_s']:>7.2f} {b['store_s']:>6.2f}",
                      flush=True)
        if "procs" in parts:
            assert slides is not None
            p = out["procs"] = bench_procs(slides, args.tiles, args.dim,
                                           max(1, args.repeats - 1), scratch)
            print("\n(b) float32 writers in parallel processes (best of interleaved runs)")
            for n, b in p["best"].items():
                print(f"{n} process(es): {b['tiles_per_s']:>9,.0f} tiles/s "
                      f"{b['emb_mb_per_s']:>6.1f} MB/s  cpu/wall per process "
                      f"{', '.join(f'{x:.2f}' for x in b['cpu_per_wall'])}")
            print(f"2 vs 1: {p['ratio_2_vs_1']:.2f}x", flush=True)
        if "ray" in parts:
            assert slides is not None
            r = out["ray"] = bench_ray(slides, args.tiles, args.dim, scratch)
            print(f"\n(c) SinkWriter actors, local Ray num_cpus=2 (init {r['ray_init_s']:.1f} s), "
                  f"fed by the driver, {r['window_per_actor']} calls in flight per actor")
            for b in r["runs"].values():
                raw = out.get("procs", {}).get("best", {}).get(b["actors"])
                vs = f"  {b['tiles_per_s'] / raw['tiles_per_s']:.2f} of raw" if raw else ""
                print(f"{b['actors']} actor(s), {b['tiles_per_call']:>3} tiles/call: "
                      f"{b['tiles_per_s']:>8,.0f} tiles/s {b['emb_mb_per_s']:>6.1f} MB/s "
                      f"{b['ms_per_call']:5.2f} ms/call, driver cpu/wall "
                      f"{b['driver_cpu_per_wall']:.2f}{vs}")
            print("2 vs 1: " + ", ".join(f"{v:.2f}x at {k.rsplit('_', 1)[1]} tiles/call"
                                         for k, v in r.items() if k.startswith("ratio")),
                  flush=True)
        if "commit" in parts:
            c = out["commit_local"] = bench_commit(args.dim, scratch, args.first_commits,
                                                   args.grow_to, args.grow_batch,
                                                   args.after_commits)
            print("\n(d) commit of 64 slides (commit_tiles + commit_slides), local disk")
            _print_commit(c)
            print(f"Lake.committed() on the grown lake ({c['committed_rows']:,} rows): "
                  f"{c['lake_committed_s_on_grown']:.2f} s", flush=True)
        if "s3" in parts:
            c = out["commit_s3"] = bench_s3_commit(args.dim, args.first_commits,
                                                   args.s3_grow_to, args.grow_batch,
                                                   max(4, args.after_commits // 2))
            print("\n(d) commit of 64 slides, moto S3 on 127.0.0.1 (requests counted there)")
            _print_commit(c)
            print("one commit's requests:", json.dumps(c["one_commit_requests"]["by_operation"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out["wall_s"] = time.perf_counter() - started
    out["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\n{out['wall_s']:.0f} s; results: {write_results('sink', out)}")


def _print_commit(c: dict[str, Any]) -> None:
    for name, label in (("new_tables", "new tables"),
                        ("new_tables_updated_handle", "  same, handle updated (**)"),
                        ("grown", f"after {c['grown']['grown_to_slides']:,} slides"),
                        ("grown_fresh_lake", "  same, a new Lake each (*)"),
                        ("replace_on_grown", "re-run (replace) on those")):
        s = c[name]
        req = (f"  {s['median_requests']:.0f} requests (tiles {s['median_tiles_requests']:.0f}"
               f" + slides {s['median_slides_requests']:.0f})" if "median_requests" in s else "")
        print(f"{label:<28} median {s['median_total_s']:.3f} s (tiles {s['median_tiles_s']:.3f}"
              f" + slides {s['median_slides_s']:.3f}), p90 {s['p90_total_s']:.3f} s, "
              f"{s['commits']} commits{req}")
    print(f"grown / new: {c['grown_vs_new_total']:.2f}x; (*) every table's snapshot re-read "
          "for each commit, as before Lake kept its handles open (9a00a9f); (**) bench-only "
          "UpdatedLake: tiles handle update_incremental() after each tiles transaction")
    for name in ("new_tables", "new_tables_updated_handle"):
        if "tiles_requests_each" in c[name]:
            print(f"tiles-commit requests, commit by commit, {name}: "
                  f"{c[name]['tiles_requests_each']}")


if __name__ == "__main__":
    main()
