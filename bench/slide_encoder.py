"""Benchmark the Prov-GigaPath slide encoder: wall time and peak memory vs number of tiles.

Shows that time and memory grow about linearly with the tile count (dilated attention never
builds an L x L matrix). Random weights and inputs: speed and memory do not depend on values.

    python bench/slide_encoder.py --tiles 10000 50000 100000 [--device cpu|cuda] [--layers 12]

Each size runs in a fresh subprocess so that peak RSS (CPU; ru_maxrss) is that size's own;
on CUDA peak memory is torch.cuda.max_memory_allocated. Results go to
bench/results/slide_encoder_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchkit import RESULTS, ROOT, cpu_model


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(tiles: int, device: str, layers: int, dtype: str, impl: str) -> dict[str, float]:
    """One measurement in this process: build, warm up on a small input, then time `tiles`."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.models.gigapath_slide import GigaPathSlideEncoder

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = GigaPathSlideEncoder(layers, attn_impl=impl).eval().to(device=device, dtype=dt)
    cols = int(np.ceil(np.sqrt(tiles * 1.3)))  # roughly square tissue area with holes
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(cols * cols, tiles, replace=False))
    ys, xs = np.divmod(cells, cols)
    coords = torch.from_numpy(np.stack([xs, ys], 1) * 256.0).to(device)
    x = torch.randn(tiles, 1536).to(device=device, dtype=dt)
    with torch.inference_mode():
        model(x[:2048], coords[:2048], 256.0)  # warm-up (allocator, kernels)
        base_rss = _rss_mb()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model(x, coords, 256.0)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    assert torch.isfinite(out.float()).all()
    res = {"tiles": tiles, "seconds": seconds, "peak_rss_mb": _rss_mb(),
           "rss_before_mb": base_rss}
    if device == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def machine(device: str) -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "cpu": cpu_model(), "cpu_cores_visible": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--attn-impl", default="auto")
    ap.add_argument("--note", default="", help="free text stored in the json")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._one is not None:
        print(json.dumps(run_one(args._one, args.device, args.layers, args.dtype,
                                 args.attn_impl)))
        return 0

    rows = []
    for tiles in args.tiles:
        cmd = [sys.executable, __file__, "--_one", str(tiles), "--device", args.device,
               "--layers", str(args.layers), "--dtype", args.dtype, "--attn-impl", args.attn_impl]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{tiles:>8} tiles: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
              flush=True)

    mem_key = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    first = rows[0]
    print(f"\n{'tiles':>8} {'seconds':>9} {'ms/tile':>8} {'time x':>7} {'tiles x':>7} "
          f"{'peak MB':>8} {'KB/tile':>8}")
    for r in rows:
        r["ms_per_tile"] = 1000 * r["seconds"] / r["tiles"]
        r["kb_per_tile"] = 1024 * r[mem_key] / r["tiles"]
        r["time_ratio"] = r["seconds"] / first["seconds"]
        r["tiles_ratio"] = r["tiles"] / first["tiles"]
        print(f"{r['tiles']:>8} {r['seconds']:>9.1f} {r['ms_per_tile']:>8.2f} "
              f"{r['time_ratio']:>7.2f} {r['tiles_ratio']:>7.1f} {r[mem_key]:>8.0f} "
              f"{r['kb_per_tile']:>8.1f}")
    if len(rows) > 1:  # marginal memory per extra tile: excludes the fixed process baseline
        a, b = rows[0], rows[-1]
        slope = 1024 * (b[mem_key] - a[mem_key]) / (b["tiles"] - a["tiles"])
        print(f"marginal memory: {slope:.1f} KB per extra tile")

    out = args.out or RESULTS / f"slide_encoder_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": "gigapath_slide_enc12l768d (random weights)", "layers": args.layers,
        "dtype": args.dtype, "attn_impl": args.attn_impl, "device": args.device,
        "memory_metric": mem_key, "note": args.note, "machine": machine(args.device),
        "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
