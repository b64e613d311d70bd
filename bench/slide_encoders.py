"""Benchmark TITAN, PRISM, CHIEF and MADELEINE: time and peak memory of one slide vs tiles.

Random weights and inputs (speed and memory do not depend on values), the released sizes,
fp32 on CPU (``--device cuda``: each spec's autocast precision, peak from torch.cuda). Each
(encoder, tile count) runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its
own; ``input_mb`` is the slide's float32 tile embeddings, which the stage holds anyway.
Tiles lie on a roughly square grid with holes, in row-major order.

TITAN's attention is quadratic in tiles (every tile attends to every other, with an ALiBi
bias): 100k tiles are ~3e13 FLOP per layer, hours on a 2-core CPU. With ``--titan-blocks K``
a run at that size computes the first K query blocks of each layer only: peak memory is
reached in the first block (every N-sized tensor exists by then), and the time is
extrapolated linearly to all blocks (recorded as ``partial`` with the factor used).

    python bench/slide_encoders.py --tiles 10000 100000 [--models titan prism chief madeleine]
        [--titan-layers 1] [--titan-blocks 4]

Results go to bench/results/slide_encoders_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit import RESULTS, ROOT, cpu_model

MODELS = ("titan", "prism", "chief", "madeleine")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(model_id: str, tiles: int, titan_layers: int | None,
            titan_blocks: int | None, device: str = "cpu") -> dict[str, Any]:
    import contextlib

    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.models import registry, specs, titan

    spec = specs.get_slide_model(model_id)
    torch.manual_seed(0)
    partial: dict[str, Any] = {}
    if model_id == "titan":
        model = titan.TitanSlideEncoder(titan_layers or titan.DEPTH).eval()
        if titan_layers and titan_layers != titan.DEPTH:
            partial["layers"] = f"{titan_layers} of {titan.DEPTH}"
    else:
        model = registry.build_slide(spec, "cpu").eval()
    model = model.to(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.precision)
    autocast = (torch.autocast("cuda", dtype=dtype) if device == "cuda" and dtype
                else contextlib.nullcontext())
    cols = int(np.ceil(np.sqrt(tiles * 1.3)))
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(cols * cols, tiles, replace=False))
    ys, xs = np.divmod(cells, cols)
    tile_l0 = 1024.0  # a 40x scan at the encoder's tile spec
    coords = torch.from_numpy(np.stack([xs, ys], 1) * tile_l0).to(device)
    x = torch.randn(tiles, spec.input_dim).to(device)
    inputs = registry.SlideInputs(embeddings=x, coords=coords, positions=None,
                                  tile_l0=tile_l0)
    n_blocks = -(-(tiles + 1) // titan.Q_BLOCK)
    if model_id == "titan" and titan_blocks and titan_blocks < n_blocks:
        for block in model.blocks.modules_list:  # the rest of each layer's output stays 0
            block.attn.query_rows = titan_blocks * titan.Q_BLOCK
        partial["query_blocks"] = f"{titan_blocks} of {n_blocks}"
        partial["time_factor"] = n_blocks / titan_blocks  # on the whole run: an upper bound
    with torch.inference_mode(), autocast:
        small = registry.SlideInputs(embeddings=x[:512], coords=coords[:512], positions=None,
                                     tile_l0=tile_l0)
        registry.slide_family(spec).run(spec, model, small)  # warm-up
        base_rss = _rss_mb()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = registry.slide_family(spec).run(spec, model, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    assert all(torch.isfinite(v).all() for v in out.values())
    res: dict[str, Any] = {"model": model_id, "tiles": tiles, "seconds": seconds,
                           "peak_rss_mb": _rss_mb(), "rss_before_mb": base_rss,
                           "input_mb": x.numel() * 4 / 2**20, "threads": torch.get_num_threads(),
                           "device": device,
                           "precision": spec.precision if device == "cuda" else "fp32"}
    if device == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if partial:
        res["partial"] = partial
        factor = partial.get("time_factor", 1.0)
        if "layers" in partial:
            factor *= titan.DEPTH / (titan_layers or titan.DEPTH)
        res["seconds_extrapolated"] = seconds * factor
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--titan-layers", type=int, default=None,
                    help="TITAN layers at the largest tile count (time scales with depth)")
    ap.add_argument("--titan-blocks", type=int, default=None,
                    help="TITAN query blocks per layer at the largest tile count")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the spec's autocast precision, peak memory from torch.cuda")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/slide_encoders_<device>.json")
    ap.add_argument("--_one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._one is not None:
        model_id, tiles = args._one[0], int(args._one[1])
        big = tiles == max(args.tiles)
        print(json.dumps(run_one(model_id, tiles, args.titan_layers if big else None,
                                 args.titan_blocks if big else None, args.device)))
        return 0

    rows = []
    for model_id in args.models:
        for tiles in args.tiles:
            cmd = [sys.executable, __file__, "--_one", model_id, str(tiles), "--tiles",
                   *map(str, args.tiles), "--device", args.device]
            if args.titan_layers:
                cmd += ["--titan-layers", str(args.titan_layers)]
            if args.titan_blocks:
                cmd += ["--titan-blocks", str(args.titan_blocks)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            extra = (f" (partial {r['partial']}: {r['seconds_extrapolated']:.0f} s "
                     f"extrapolated)" if "partial" in r else "")
            cuda = f", peak CUDA {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""
            print(f"{model_id:10s} {tiles:>7} tiles: {r['seconds']:8.1f} s{extra}, peak RSS "
                  f"{r['peak_rss_mb']:6.0f} MB (input {r['input_mb']:.0f} MB){cuda}", flush=True)
    out = args.out or RESULTS / f"slide_encoders_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": "one slide through each slide encoder (random weights, released sizes, fp32)",
        "note": args.note, "machine": {"cpu": cpu_model(), "python": sys.version.split()[0]},
        "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
