"""End-to-end throughput against the slowest stage alone, side by side in one run.

    .venv/bin/python bench/end_to_end.py [--model kaiko-vits16] [--slides 6] [--batch-size 64]

Stages alone, in this process without Ray, on the same machine:

- tiling: ``tile_slide`` over one bench slide (40x 20k x 16k, 0.25 -> 0.5 um/px, 224 px), as
  many threads as the job's tiling task gets;
- encoding: ``TileEncoder`` (the actor class the job runs) on tiles of that slide held in
  memory, batches of ``--batch-size``, as many threads as the job's encoder actor.

Then the whole job (``run_job``: manifest -> tiling tasks -> encoder actor pool -> lake) on an
embedded local Ray with every core, over ``--slides`` copies of the slide. Its rate is the
steady state: the tiles after the first encoded batch reached the driver over the time from
then to the last commit, which leaves out Ray start-up, model loading and the pipeline's fill
(the whole-job rate is recorded too). The encoder is measured alone before and after the
job; the better of the two is the reference, so noise cannot flatter the ratio. Weights are
random (none can be downloaded here); the work per tile is the real architecture's.

Writes bench/results/end_to_end_<host>.json.
"""

from __future__ import annotations

import argparse
import csv
import math
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
from generate import ensure  # noqa: E402
from tiling import machine  # noqa: E402

from pipeline.config import ModelConfig, StorageConfig, TilingConfig, build_config  # noqa: E402
from pipeline.tiling import tile_slide  # noqa: E402


def tiling_alone(path: Path, cfg: TilingConfig, limit: int) -> tuple[dict[str, float],
                                                                      np.ndarray]:
    """Tiles/s of the tiling stage over the whole slide; the first ``limit`` tiles kept."""
    kept: list[np.ndarray] = []
    n = 0
    started = time.perf_counter()
    plan, chunks = tile_slide(str(path), mpp_override=None, cfg=cfg)
    with chunks:
        for c in chunks:
            n += len(c.tiles)
            if sum(len(k) for k in kept) < limit:
                kept.append(c.tiles)
    wall = time.perf_counter() - started
    assert n == plan.num_tiles
    return {"tiles": n, "wall_s": wall, "tiles_per_s": n / wall}, np.concatenate(kept)[:limit]


def encoder_alone(model: str, tiles: np.ndarray, batch_size: int, threads: int,
                  seconds: float) -> dict[str, float]:
    """Tiles/s of ``TileEncoder`` on in-memory batches shaped as Ray Data hands them over."""
    from pipeline.encode import TileEncoder
    from pipeline.models.weights import resolve_weights

    storage = StorageConfig()
    ref = resolve_weights(ModelConfig(id=model, weights="random"), storage)
    enc = TileEncoder(ModelConfig(id=model, weights="random", device="cpu"), ref, storage,
                      drop_tiles=True, threads=threads)
    batches = [tiles[i:i + batch_size] for i in range(0, len(tiles) - batch_size + 1,
                                                       batch_size)]

    def call(b: np.ndarray) -> None:
        out = enc({"tile": b, "slide_id": np.full(len(b), "s", object),
                   "models": np.full(len(b), model, object)})
        assert out[f"emb__{model}"].shape[0] == len(b)

    call(batches[0])  # warm-up: first-call allocations, thread pool start
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for b in batches:
            call(b)
            n += len(b)
    wall = time.perf_counter() - started
    return {"tiles": n, "wall_s": wall, "tiles_per_s": n / wall}


def pipeline_job(path: Path, copies: int, model: str, batch_size: int, cores: int,
                 tiling_cpus: float, work: Path) -> dict[str, Any]:
    """The real job over ``copies`` manifest rows of the slide, embedded local Ray."""
    import ray

    from pipeline.run import run_job

    manifest = work / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "uri"])
        for i in range(copies):
            w.writerow([f"copy{i:02d}", str(path)])
    cfg = build_config({
        "manifest": str(manifest), "output": str(work / "lake"),
        "models": [{"id": model, "weights": "random", "batch_size": batch_size,
                    "device": "cpu"}],
        "tiling": {"mpp": 0.5, "tile_size": 224},
        "ray": {"num_cpus": cores, "tiling_cpus": tiling_cpus,
                "encoder_cpus": cores - tiling_cpus},
    })
    started = time.time()
    try:
        record = run_job(cfg)
    finally:
        ray.shutdown()
    wall = time.time() - started
    slides = sorted(record["slides"], key=lambda s: s["committed_at"])
    assert record["status"] == "succeeded" and len(slides) == copies, record.get("error")
    total = sum(s["num_tiles"] for s in slides)
    first = record["first_batch"]  # the first encoded rows at the driver
    steady_tiles = total - first["rows"]
    steady_s = slides[-1]["committed_at"] - first["at"]
    return {"slides": copies, "tiles": total, "job_wall_s": wall,
            "job_tiles_per_s": total / wall, "steady_tiles": steady_tiles,
            "steady_s": steady_s, "tiles_per_s": steady_tiles / steady_s,
            "commits_at_s": [round(s["committed_at"] - started, 2) for s in slides],
            "encoder_threads": math.ceil(cores - tiling_cpus)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="kaiko-vits16")
    ap.add_argument("--slide", default="40x_20k")
    ap.add_argument("--slides", type=int, default=6, help="copies of the slide in the job")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tiling-cpus", type=float, default=0.5,
                    help="ray.tiling_cpus of the job; the encoder actor gets the rest")
    ap.add_argument("--encoder-seconds", type=float, default=40.0)
    ap.add_argument("--kind", default="end_to_end",
                    help="result file name: bench/results/<kind>_<host>.json")
    args = ap.parse_args()
    path = ensure(args.slide)
    threads = math.ceil(args.cores - args.tiling_cpus)
    tcfg = TilingConfig(mpp=0.5, tile_size=224, threads=max(1, int(args.tiling_cpus)))
    out: dict[str, Any] = {"machine": machine(), "model": args.model,
                           "batch_size": args.batch_size, "cores": args.cores}
    tiling, tiles = tiling_alone(path, tcfg, limit=4 * args.batch_size)
    print(f"tiling alone: {tiling['tiles_per_s']:.0f} tiles/s ({tiling['tiles']} tiles)",
          flush=True)
    enc = [encoder_alone(args.model, tiles, args.batch_size, threads, args.encoder_seconds)]
    print(f"encoder alone ({threads} threads): {enc[0]['tiles_per_s']:.1f} tiles/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        job = pipeline_job(path, args.slides, args.model, args.batch_size, args.cores,
                           args.tiling_cpus, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"pipeline: {job['tiles_per_s']:.1f} tiles/s steady ({job['steady_tiles']} tiles in "
          f"{job['steady_s']:.0f} s), {job['job_tiles_per_s']:.1f} tiles/s for the whole job "
          f"({job['job_wall_s']:.0f} s incl. Ray start-up)", flush=True)
    enc.append(encoder_alone(args.model, tiles, args.batch_size, threads,
                             args.encoder_seconds))
    print(f"encoder alone again: {enc[1]['tiles_per_s']:.1f} tiles/s", flush=True)
    stages = {"tiling": tiling["tiles_per_s"],
              "encoding": max(e["tiles_per_s"] for e in enc)}
    slowest = min(stages, key=lambda k: stages[k])
    ratio = job["tiles_per_s"] / stages[slowest]
    out.update({"tiling_alone": tiling, "encoder_alone": enc, "pipeline": job,
                "slowest_stage": slowest, "pipeline_vs_slowest": ratio})
    out["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\nslowest stage alone: {slowest} {stages[slowest]:.1f} tiles/s; "
          f"pipeline / slowest = {ratio:.2f}")
    dest = write_results(args.kind, out)
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
