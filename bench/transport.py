"""What bounds the pipeline's ceiling: the same tiling as plain Ray tasks vs as a Ray Data stage.

    .venv/bin/python bench/transport.py [--slides 8] [--copies 4]

Both run ``pipeline.tiling.tiling_stage`` on an embedded local Ray with 2 CPUs over the same
generated slides (full tissue, 0.5 um/px, 224 px tiles, 64-tile chunks). Plain tasks count the
tiles inside the task (nothing leaves it); the Ray Data stage hands every chunk on as a block,
as the job does, to a stage that drops the pixels at once. The ratio is the cost of Ray Data's
block handling of uint8 tiles, with no encoder and no sink. The CPU seconds of the whole
machine (/proc/stat: Ray's workers, raylet and object store) and of the driver are recorded
for each run, so what the Ray Data path costs beyond the tiling itself shows as CPU, not only
as a rate. Writes bench/results/transport_<host>.json.
"""

from __future__ import annotations

import argparse
import os
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

from benchkit import write_results  # noqa: E402
from cluster import make_slides  # noqa: E402
from tiling import machine  # noqa: E402

from pipeline.config import StorageConfig, TilingConfig  # noqa: E402
from pipeline.tiling import tiling_stage  # noqa: E402

TILING = TilingConfig(mpp=0.5, tile_size=224)
TILE_BYTES = TILING.tile_size ** 2 * 3
STORAGE = StorageConfig()


def _batch(path: str) -> dict[str, np.ndarray]:
    return {"slide_id": np.array(["s"], object), "uri": np.array([path], object),
            "mpp": np.array([np.nan]), "models": np.array(["m"], object)}


def machine_cpu_s() -> float:
    """CPU seconds (user + nice + system) of every process on this machine so far: Ray's
    workers, raylet and object store included (/proc/stat, Linux)."""
    with open("/proc/stat") as f:
        user, nice, system = (int(v) for v in f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def costed(fn: Any) -> dict[str, float]:
    """``fn()``'s result with the machine's and this driver's CPU seconds while it ran."""
    m0, d0 = machine_cpu_s(), time.process_time()
    out = fn()
    out["machine_cpu_s"] = machine_cpu_s() - m0
    out["driver_cpu_s"] = time.process_time() - d0
    out["machine_cpu_s_per_gb"] = out["machine_cpu_s"] / (out["tiles"] * TILE_BYTES / 1e9)
    return out


def plain_tasks(paths: list[str]) -> dict[str, float]:
    import ray

    @ray.remote(num_cpus=1)
    def run(path: str) -> int:
        return sum(len(out["tile"]) for out in tiling_stage(_batch(path), tiling=TILING,
                                                              storage=STORAGE))

    started = time.perf_counter()
    n = sum(ray.get([run.remote(p) for p in paths]))
    wall = time.perf_counter() - started
    return {"tiles": n, "wall_s": wall, "tiles_per_s": n / wall}


def _drop(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"n": np.array([len(batch["tile"])])}


def ray_data_stage(paths: list[str]) -> dict[str, float]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = 16 << 20  # as build_dataset sets it
    items = [{"slide_id": f"s{i}", "uri": p, "mpp": float("nan"), "models": "m"}
             for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(tiling_stage, batch_size=1, batch_format="numpy",
                        fn_kwargs={"tiling": TILING, "storage": STORAGE}, num_cpus=1,
                        memory=512 << 20)
    ds = ds.map_batches(_drop, batch_size=None, batch_format="numpy", num_cpus=0.1)
    started = time.perf_counter()
    n = sum(int(b["n"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    wall = time.perf_counter() - started
    return {"tiles": n, "wall_s": wall, "tiles_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--copies", type=int, default=4, help="manifest rows per slide")
    args = ap.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    out: dict[str, Any] = {"machine": machine(), "slides": args.slides, "copies": args.copies}
    try:
        paths = [str(p) for p in make_slides(work, args.slides)] * args.copies
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs: dict[str, list[dict[str, float]]] = {"plain_tasks": [], "ray_data_stage": []}
        for _ in range(2):  # the first of each warms workers up; the better one counts
            runs["plain_tasks"].append(costed(lambda: plain_tasks(paths)))
            runs["ray_data_stage"].append(costed(lambda: ray_data_stage(paths)))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: max(r["tiles_per_s"] for r in v) for k, v in runs.items()}
    ratio = best["ray_data_stage"] / best["plain_tasks"]
    cpu = {k: min(r["machine_cpu_s"] for r in v) for k, v in runs.items()}
    for k, v in best.items():
        print(f"{k}: {v:.0f} tiles/s, machine CPU {cpu[k]:.1f} s (least of the runs)")
    print(f"Ray Data stage / plain tasks = {ratio:.2f}; machine CPU for the same tiles "
          f"{cpu['ray_data_stage'] / cpu['plain_tasks']:.2f}x")
    out.update({"runs": runs, "best_tiles_per_s": best, "ray_data_vs_plain": ratio,
                "machine_cpu_s_least": cpu,
                "ray_data_cpu_over_plain": cpu["ray_data_stage"] / cpu["plain_tasks"]})
    dest = write_results("transport", out)
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
