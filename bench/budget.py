"""Where a tile's CPU goes, step by step, in one process: the ceiling's budget (issue 11).

    .venv/bin/python bench/budget.py [--slides 2]

The ceiling benchmark (bench/cluster.py) compares a whole ``bench-null`` job with tiling alone
on the same cores; its target is 0.9. On shared cores that ratio is at most
tiling / (tiling + everything after it), whatever Ray does. This measures each step's CPU
time per tile (``time.process_time``, one thread) on the same generated slides, 64-tile chunks
as the job hands them on:

- tiling: ``tile_slide`` over the slides (decode, tissue, grid);
- block: Ray Data's conversion of a chunk (numpy columns) to its Arrow block;
- object store: ``ray.put`` of that block and ``ray.get`` of it downstream;
- encoder: ``encode_batch`` with ``bench-null`` (pooled pixels times a fixed projection);
- writer: a slide's 1024-d float32 embeddings to its Parquet file bytes (``parquet_bytes``).

Ray Data's per-block scheduling, the streaming generator and the coordinator come on top.
Writes bench/results/budget_<host>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from benchkit import write_results  # noqa: E402
from cluster import make_slides  # noqa: E402
from tiling import machine  # noqa: E402

from pipeline.config import TilingConfig  # noqa: E402
from pipeline.tiling import tile_slide  # noqa: E402

TILING = TilingConfig(mpp=0.5, tile_size=224)


def cpu_ms_per(fn: Any, items: int, repeats: int = 5) -> float:
    """Least CPU milliseconds per item of ``repeats`` calls of ``fn`` (one call: ``items``)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best / items * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=2)
    args = ap.parse_args()
    import pyarrow as pa
    import ray
    from ray.data.block import BlockAccessor

    from pipeline.config import ModelConfig, StorageConfig
    from pipeline.encode import encode_batch
    from pipeline.handoff import MODELS_COLUMN, TILE_COLUMN
    from pipeline.models import registry
    from pipeline.models.weights import load_model, resolve_weights
    from pipeline.sink import embedding_array, parquet_bytes

    work = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    try:
        paths = [str(p) for p in make_slides(work, args.slides)]
        chunks: list[Any] = []

        def tile_all() -> int:
            chunks.clear()
            n = 0
            for p in paths:
                _, cs = tile_slide(p, mpp_override=None, cfg=TILING)
                with cs:
                    for c in cs:
                        n += len(c.tiles)
                        if len(chunks) < 8:
                            chunks.append(c)
            return n

        tiles = tile_all()
        steps: dict[str, float] = {"tiling": cpu_ms_per(tile_all, tiles, repeats=2)}
        batches = [{TILE_COLUMN: c.tiles, "x": c.x, "y": c.y, "tissue": c.tissue,
                    "slide_id": np.array(["s"] * len(c.tiles), object),
                    MODELS_COLUMN: np.array(["bench-null"] * len(c.tiles), object)}
                   for c in chunks]
        n = sum(len(b[TILE_COLUMN]) for b in batches)
        blocks = [BlockAccessor.batch_to_block(b) for b in batches]
        steps["block"] = cpu_ms_per(lambda: [BlockAccessor.batch_to_block(b) for b in batches],
                                    n)
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            def put_get() -> None:
                for b in blocks:
                    got = ray.get(ray.put(b))
                    BlockAccessor.for_block(got).to_batch_format("numpy")

            steps["object_store"] = cpu_ms_per(put_get, n)
        finally:
            ray.shutdown()
        spec = registry.get("bench-null")
        import torch

        torch.set_num_threads(1)
        model = load_model(spec, resolve_weights(ModelConfig(id="bench-null", weights="random"),
                                                 StorageConfig(), spec=spec), StorageConfig(),
                           torch.device("cpu"))
        emb = encode_batch(batches[0], spec, model, torch.device("cpu"), "fp32")
        steps["encoder"] = cpu_ms_per(
            lambda: [encode_batch(b, spec, model, torch.device("cpu"), "fp32") for b in batches],
            n)
        col = next(k for k in emb if k.startswith("emb"))
        rows = np.concatenate([emb[col]] * len(batches)).astype(np.float32)
        table = pa.table({"slide_id": pa.array(["s"] * len(rows)),
                          "tile_index": pa.array(np.arange(len(rows), dtype=np.int32)),
                          "embedding": embedding_array(rows)})
        steps["writer"] = cpu_ms_per(lambda: parquet_bytes(table), len(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = sum(v for k, v in steps.items() if k != "tiling")
    bound = steps["tiling"] / (steps["tiling"] + after)
    for k, v in steps.items():
        print(f"{k:>13}: {v:.3f} CPU-ms per tile")
    print(f"after tiling: {after:.3f} CPU-ms per tile = {after / steps['tiling']:.2f}x tiling; "
          f"on shared cores job / tiling alone <= {bound:.2f} before any Ray Data overhead")
    dest = write_results("budget", {"machine": machine(), "tiles": tiles,
                                    "cpu_ms_per_tile": steps, "after_tiling_ms": after,
                                    "bound_job_vs_tiling_alone": bound})
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
