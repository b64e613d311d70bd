"""The pipeline's own ceiling, and passes of several tiling specs at once, on a local
multi-node Ray cluster (head + worker nodes with custom resources standing in for GPU nodes).

    .venv/bin/python bench/cluster.py [--slides 16] [--nodes 2] [--device-ms 4]

1. Ceiling: a job with ``bench-null`` (no network: the encoders cost next to nothing) against
   tiling alone on the same cores (``tile_slide`` in one process per node core, no Ray).
   Target: job / tiling alone >= 0.9.
2. All models at once: three ``bench-null`` models at 224, 256 and 512 px (three tiling
   specs, three passes) against the slowest of them alone. Each encoder forward also waits
   ``--device-ms`` per tile without using a CPU (``WSI_BENCH_DEVICE_MS_PER_TILE``): a GPU
   stand-in, so that the encoders are the bottleneck as on a GPU cluster and the question is
   only whether the three pools work at the same time. Target: all / slowest <= 1.15.

Rates are steady state: tiles after the first batch reached the coordinator over the time
from then to the last commit (Ray start-up and model loading left out). Writes
bench/results/cluster_<host>.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from benchkit import write_results  # noqa: E402
from tiling import machine  # noqa: E402

from pipeline.config import TilingConfig, build_config  # noqa: E402
from pipeline.tiling import tile_slide  # noqa: E402

NULLS = ["bench-null", "bench-null-256", "bench-null-512"]


def make_slides(d: Path, n: int) -> list[Path]:
    from slidegen import write_pyramid_svs

    paths = []
    for i in range(n):
        p = d / f"s{i}.svs"
        write_pyramid_svs(p, width=6000, height=4800, mpp=0.5, levels=(1, 4), seed=500 + i,
                          background=False)
        paths.append(p)
    return paths


def _tile_count(path: str) -> int:
    plan, chunks = tile_slide(path, mpp_override=None, cfg=TilingConfig(mpp=0.5, tile_size=224))
    n = 0
    with chunks:
        for c in chunks:
            n += len(c.tiles)
    assert n == plan.num_tiles
    return n


def tiling_alone(paths: list[Path], procs: int) -> dict[str, float]:
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_tile_count, [str(paths[0])] * procs))  # warm-up: imports, page cache
        started = time.perf_counter()
        n = sum(pool.map(_tile_count, [str(p) for p in paths]))
        wall = time.perf_counter() - started
    return {"tiles": n, "wall_s": wall, "tiles_per_s": n / wall, "processes": procs}


def steady(record: dict[str, Any]) -> dict[str, float]:
    slides = record["slides"]
    total = sum(s["num_tiles"] for s in slides)
    first = record["first_batch"]
    span = max(s["committed_at"] for s in slides) - first["at"]
    return {"tiles": total, "steady_s": span, "tiles_per_s": (total - first["rows"]) / span,
            "job_wall_s": record["wall_s"], "passes": record["passes"]}


def job(manifest: Path, out: Path, models: list[str], tiling: dict[str, Any],
        tiling_cpus: float, address: str, device_ms: float) -> dict[str, Any]:
    import ray

    from pipeline.run import run_job

    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config({
        "manifest": str(manifest), "output": str(out),
        "models": [{"id": m, "weights": "random", "batch_size": 128, "device": "cpu"}
                   for m in models],
        "tiling": tiling,
        "ray": {"tiling_cpus": tiling_cpus, "encoder_cpus": 0.1, "tiler_resource": "tiler",
                "encoder_resource": "encoder"},
        "sink": {"writers": 2},
    })
    ray.init(address=address, log_to_driver=False, runtime_env={
        "env_vars": {"WSI_BENCH_DEVICE_MS_PER_TILE": str(device_ms)}})
    try:
        record = run_job(cfg)
    finally:
        ray.shutdown()
    assert record["status"] == "succeeded", record.get("error")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=2, help="worker nodes of 1 CPU each")
    ap.add_argument("--device-ms", type=float, default=4.0,
                    help="simulated device time per tile in the multi-model part")
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    out: dict[str, Any] = {"machine": machine(), "nodes": args.nodes, "slides": args.slides}
    try:
        paths = make_slides(work, args.slides)
        manifest = work / "manifest.csv"
        with manifest.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", "uri"])
            for p in paths:
                w.writerow([p.stem, str(p)])
        alone = tiling_alone(paths, args.nodes)
        print(f"tiling alone, {args.nodes} processes: {alone['tiles_per_s']:.0f} tiles/s "
              f"({alone['tiles']} tiles)", flush=True)
        # Object stores of 1 GB a node (the default here is 150 MB, which throttles tiling).
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": 500 << 20})
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=1, resources={"tiler": 1, "encoder": 1},
                             object_store_memory=1 << 30)
        cluster.wait_for_nodes()
        try:
            fixed = {"mpp": 0.5, "tile_size": 224}
            ceiling = steady(job(manifest, work / "lake-null", ["bench-null"], fixed, 0.8,
                                 cluster.address, 0.0))
            ratio = ceiling["tiles_per_s"] / alone["tiles_per_s"]
            print(f"job with bench-null: {ceiling['tiles_per_s']:.0f} tiles/s steady; "
                  f"job / tiling alone = {ratio:.2f}", flush=True)
            out.update({"tiling_alone": alone, "ceiling_job": ceiling,
                        "ceiling_vs_tiling_alone": ratio})

            spans = {}
            for models in (["bench-null"], NULLS):
                rec = job(manifest, work / "lake-multi", models, {}, 0.5, cluster.address,
                          args.device_ms)
                spans[",".join(models)] = steady(rec)
                print(f"{'+'.join(models)}: {spans[','.join(models)]['steady_s']:.1f} s steady "
                      f"({spans[','.join(models)]['passes']})", flush=True)
            multi = spans[",".join(NULLS)]["steady_s"] / spans["bench-null"]["steady_s"]
            print(f"3 specs at once / slowest alone = {multi:.2f}")
            out.update({"device_ms_per_tile": args.device_ms, "multi_model": spans,
                        "all_vs_slowest": multi})
        finally:
            cluster.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["machine"]["loadavg_end"] = os.getloadavg()
    dest = write_results("cluster", out)
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
