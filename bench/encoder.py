"""Encoder stage vs raw model forward, side by side in one run on the same device and batches.

    .venv/bin/python bench/encoder.py [--models kaiko-vits16 uni virchow] [--device auto|cpu|cuda]
        [--batch-sizes 64 128 256 512] [--seconds 3] [--warmup 2] [--repeats 3]
        [--micro-batch N] [--threads N]

(a) stage: what an encoder actor does with each Ray batch, ``TileEncoder.__call__`` on a numpy
    dict (uint8 tiles at the model's native tile size, a ``models`` column) -> float16 numpy
    embeddings: preprocessing, host-to-device transfer, forward and the copy back.
(b) raw: ``registry.embed`` on a tensor already preprocessed and already on the device (fp16
    autocast on CUDA as the pipeline runs it, fp32 on CPU), nothing else.

The gap between the two is what the stage costs beyond the model; on a GPU the target is
stage / raw >= 0.90. Random weights: speed does not depend on values. Each figure is the best
of ``--repeats`` interleaved measurements (the machines are shared and noisy); the batch size
reported is the one where the raw forward is fastest, so it is picked by measurement. On CUDA
also: the GPU's achievable fp16 peak (large matmul), FLOPs per tile (FlopCounterMode) and the
fraction of that peak each side reaches. Writes bench/results/encoder_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import cpu_model  # noqa: E402

from pipeline.config import ModelConfig, StorageConfig  # noqa: E402
from pipeline.encode import (  # noqa: E402
    _AUTOCAST,
    TileEncoder,
    default_micro_batch,
    embedding_column,
)
from pipeline.models import registry  # noqa: E402
from pipeline.models.preprocess import preprocess  # noqa: E402
from pipeline.models.weights import resolve_weights  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_MODELS = {"cpu": ["kaiko-vits16"], "cuda": ["kaiko-vits16", "uni", "virchow"]}
DEFAULT_BATCH_SIZES = {"cpu": [16, 32], "cuda": [64, 128, 256, 512]}
GPU_TARGET_RATIO = 0.90  # stage / raw forward: the stage may cost at most 10% beyond the model


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "device_name": "cpu", "loadavg_start": os.getloadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gb=props.total_memory / 2**30,
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], tiles: int, seconds: float,
            device: torch.device) -> dict[str, float]:
    """Call ``fn`` (one batch of ``tiles``) until ``seconds`` pass; GPU work is waited for.

    The clock starts after a sync and stops after one, so work the CPU queued ahead of the
    GPU is counted in full and nothing queued earlier leaks in.
    """
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    iters = 0
    while True:
        fn()
        iters += 1
        if time.perf_counter() - w0 >= seconds:
            break
    _sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"iters": iters, "wall_s": wall, "cpu_s": cpu, "tiles_per_s": iters * tiles / wall,
            "tiles_per_cpu_s": iters * tiles / max(cpu, 1e-9)}


def peak_fp16_flops(device: torch.device, n: int = 8192, iters: int = 20,
                    repeats: int = 5) -> float:
    """Achievable dense fp16 FLOP/s: the best of timed n x n x n matmuls (not the datasheet)."""
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def h2d_bytes_per_s(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Pinned host -> device copy bandwidth (what the stage's tile transfer can reach)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        _sync(device)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def _autocast(device: torch.device, precision: str) -> Any:
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float16,
                          enabled=device.type == "cuda" and dtype is not None)


def flops_per_tile(spec: registry.TileModelSpec, model: torch.nn.Module, pixels: torch.Tensor,
                   device: torch.device, precision: str) -> float:
    """Model FLOPs per tile; attention through the math kernel so every backend counts it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = pixels[:2]
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), _autocast(device, precision):
        with counter:
            registry.embed(spec, model, x)
    return counter.get_total_flops() / len(x)


def make_batch(spec: registry.TileModelSpec, n: int, tile_px: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands it to the encoder actor."""
    return {
        "tile": rng.integers(0, 256, (n, tile_px, tile_px, 3), dtype=np.uint8),
        "models": np.array([spec.id] * n, dtype=object),
        "slide_id": np.array(["bench"] * n, dtype=object),
        "x": np.arange(n, dtype=np.int64) * tile_px,
        "y": np.zeros(n, dtype=np.int64),
    }


def make_encoder(model_id: str, device: torch.device, micro_batch: int | None,
                 threads: int | None) -> TileEncoder:
    """The pipeline's own actor class, with random weights."""
    cfg = ModelConfig(id=model_id, weights="random", device=device.type)
    ref = resolve_weights(cfg, StorageConfig())
    return TileEncoder(cfg.model_copy(update={"micro_batch": micro_batch}), ref,
                       threads=threads)


def bench_batch(encoder: TileEncoder, bs: int, tile_px: int, device: torch.device,
                args: argparse.Namespace, count_flops: bool) -> dict[str, Any]:
    """One batch size: warm up both sides, then interleaved timed repeats of each."""
    spec = encoder.spec
    col = embedding_column(spec.id)
    batch = make_batch(spec, bs, tile_px, np.random.default_rng(bs))
    with torch.inference_mode():
        pixels = preprocess(torch.from_numpy(batch["tile"]).to(device), spec)
    flops = (flops_per_tile(spec, encoder.model, pixels, device, encoder.precision)
             if count_flops else None)

    def stage() -> None:
        out = encoder(batch)
        assert out[col].dtype == np.float16 and out[col].shape == (bs, spec.dim)

    def raw() -> None:
        with torch.inference_mode(), _autocast(device, encoder.precision):
            registry.embed(spec, encoder.model, pixels)

    for _ in range(args.warmup):
        stage()
        raw()
    runs: dict[str, list[dict[str, float]]] = {"stage": [], "raw": []}
    for r in range(args.repeats):  # alternate the order so drift in load hits both sides
        for side, fn in ((("stage", stage), ("raw", raw)) if r % 2 == 0
                         else (("raw", raw), ("stage", stage))):
            runs[side].append(measure(fn, bs, args.seconds, device))
    return {"runs": runs, "flops_per_tile": flops}


def bench_model(model_id: str, device: torch.device, args: argparse.Namespace,
                peak: float | None) -> dict[str, Any]:
    """Stage and raw forward at each batch size, interleaved, best of ``args.repeats``."""
    spec = registry.get(model_id)
    encoder = make_encoder(model_id, device, args.micro_batch, args.threads)
    tile_px = args.tile_px or spec.native_tile_px
    rows: list[dict[str, Any]] = []
    flops = None
    print(f"\n{model_id} ({spec.params / 1e6:.0f}M params, {tile_px} px tiles -> "
          f"{spec.input_size} px, {encoder.precision}) on {device}", flush=True)
    for bs in args.batch_sizes:
        try:
            done = bench_batch(encoder, bs, tile_px, device, args, count_flops=flops is None)
        except torch.cuda.OutOfMemoryError:
            print(f"  batch {bs}: out of GPU memory, skipped", flush=True)
            rows.append({"batch_size": bs, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        flops = flops or done["flops_per_tile"]
        runs = done["runs"]
        row: dict[str, Any] = {"batch_size": bs}
        if device.type == "cuda":
            row["micro_batch"] = args.micro_batch or default_micro_batch(bs)
        else:
            row["micro_batch"] = args.micro_batch or bs
        for side, rs in runs.items():
            row[side] = {"tiles_per_s": max(r["tiles_per_s"] for r in rs),
                         "tiles_per_cpu_s": max(r["tiles_per_cpu_s"] for r in rs),
                         "repeats": rs}
        row["ratio"] = row["stage"]["tiles_per_s"] / row["raw"]["tiles_per_s"]
        row["ratio_per_cpu_s"] = (row["stage"]["tiles_per_cpu_s"]
                                  / row["raw"]["tiles_per_cpu_s"])
        rows.append(row)
        print(f"  batch {bs:>4} (micro {row['micro_batch']}): raw "
              f"{row['raw']['tiles_per_s']:9.1f} tiles/s, stage "
              f"{row['stage']['tiles_per_s']:9.1f} tiles/s, stage/raw {row['ratio']:.3f}"
              + ("" if device.type == "cuda" else
                 f"  (per CPU-s: raw {row['raw']['tiles_per_cpu_s']:.1f}, stage "
                 f"{row['stage']['tiles_per_cpu_s']:.1f}, {row['ratio_per_cpu_s']:.3f})"),
              flush=True)
    result: dict[str, Any] = {"model": model_id, "params": spec.params, "tile_px": tile_px,
                              "input_px": spec.input_size, "precision": encoder.precision,
                              "flops_per_tile": flops, "results": rows}
    measured = [r for r in rows if "error" not in r]
    if not measured:
        return result
    best = max(measured, key=lambda r: r["raw"]["tiles_per_s"])
    best_stage = max(measured, key=lambda r: r["stage"]["tiles_per_s"])
    result.update(best_raw_batch_size=best["batch_size"],
                  raw_tiles_per_s=best["raw"]["tiles_per_s"],
                  stage_tiles_per_s=best["stage"]["tiles_per_s"], ratio=best["ratio"],
                  best_stage_batch_size=best_stage["batch_size"],
                  best_stage_tiles_per_s=best_stage["stage"]["tiles_per_s"])
    line = (f"  -> best raw batch {best['batch_size']}: raw {best['raw']['tiles_per_s']:.1f}, "
            f"stage {best['stage']['tiles_per_s']:.1f} tiles/s, stage/raw {best['ratio']:.3f}")
    if flops:
        raw_fs = best["raw"]["tiles_per_s"] * flops
        stage_fs = best["stage"]["tiles_per_s"] * flops
        result.update(raw_flops_per_s=raw_fs, stage_flops_per_s=stage_fs)
        line += f"; {flops / 1e9:.1f} GFLOP/tile: raw {raw_fs / 1e12:.3f}, stage " \
                f"{stage_fs / 1e12:.3f} TFLOP/s"
        if peak:
            result.update(raw_fraction_of_peak=raw_fs / peak,
                          stage_fraction_of_peak=stage_fs / peak)
            line += f" = {raw_fs / peak:.1%} / {stage_fs / peak:.1%} of peak"
    if device.type == "cuda":
        result["meets_target"] = best["ratio"] >= GPU_TARGET_RATIO
        line += f"; target stage/raw >= {GPU_TARGET_RATIO}: " + (
            "met" if result["meets_target"] else "MISSED")
    print(line, flush=True)
    return result


def resolve_device(requested: str) -> torch.device:
    """'auto': CUDA when visible, else CPU; 'cuda' without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="registry ids (default: kaiko-vits16 on CPU; + uni virchow on CUDA)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="default: 16 32 on CPU, 64 128 256 512 on CUDA")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (min 1 batch)")
    ap.add_argument("--warmup", type=int, default=2, help="batches per side before timing")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved; best is reported")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="encoder micro-batch (default: the stage's own choice)")
    ap.add_argument("--tile-px", type=int, default=None, help="default: model's native tile")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--note", default="", help="free text stored in the json")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    args.models = args.models or DEFAULT_MODELS[device.type]
    args.batch_sizes = args.batch_sizes or DEFAULT_BATCH_SIZES[device.type]
    info = machine(device)
    out: dict[str, Any] = {"device": device.type, "settings": {
        k: v for k, v in vars(args).items() if k != "out"}, "machine": info}
    peak = None
    if device.type == "cuda":
        peak = peak_fp16_flops(device)
        h2d = h2d_bytes_per_s(device)
        out.update(peak_fp16_flops_per_s=peak, h2d_pinned_bytes_per_s=h2d)
        print(f"{info['device_name']}: fp16 matmul peak {peak / 1e12:.0f} TFLOP/s, "
              f"pinned H2D {h2d / 1e9:.1f} GB/s", flush=True)
    else:
        print(f"{info['cpu']}, {info['cpu_affinity']} cores, torch threads "
              f"{torch.get_num_threads()}, loadavg {info['loadavg_start']}", flush=True)
    out["models"] = [bench_model(m, device, args, peak) for m in args.models]
    info["loadavg_end"] = os.getloadavg()
    info["torch_threads"] = torch.get_num_threads()  # the encoder sets it on CPU

    print(f"\n{'model':<14} {'batch':>5} {'raw tiles/s':>12} {'stage tiles/s':>14} "
          f"{'stage/raw':>9}")
    for m in out["models"]:
        if "ratio" in m:
            print(f"{m['model']:<14} {m['best_raw_batch_size']:>5} {m['raw_tiles_per_s']:>12.1f} "
                  f"{m['stage_tiles_per_s']:>14.1f} {m['ratio']:>9.3f}")
    dest = args.out or RESULTS / f"encoder_{device.type}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
