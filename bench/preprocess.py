"""Device preprocessing vs the model cards' PIL transform: pixel error per model, worst case.

For every tile model, every real tile in ``shared/data/tiles`` (at its own size: 128, 224,
256, 512 px, so up-, no- and downsampling) plus each 512-px tile centre-cropped to the model's
native tile size (what the pipeline delivers) is preprocessed three ways:

* ``pil``: ``reference_preprocess_pil`` (torchvision transforms on a PIL image, as the cards);
* ``device``: ``pipeline.models.preprocess.preprocess`` (PIL's integer arithmetic);
* ``one_pass``: the former device path, one float resize and one clamp at the end.

Errors are in 0-255 pixel units after undoing the normalisation. With ``--embed`` the small
models also run on random weights and the embeddings' relative error vs ``pil`` is recorded.
The CPU cost of each exact kernel (and of the former one-pass resize) is timed at the two
resizes the zoo does most (512 -> 448, 256 -> 224).

    python bench/preprocess.py [--tiles DIR] [--embed conch kaiko-vits16]

Result: bench/results/preprocess_<host>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from benchkit import ROOT, cpu_model, write_results
from PIL import Image

sys.path.insert(0, str(ROOT))

from pipeline.models import registry  # noqa: E402
from pipeline.models.preprocess import (  # noqa: E402
    _norm,
    _resized_hw,
    denormalise,
    preprocess,
    reference_preprocess_pil,
    resize_like_pil,
)

SHARED_TILES = ROOT.parent / "shared" / "data" / "tiles"


def one_pass(tiles: torch.Tensor, spec: registry.TileModelSpec) -> torch.Tensor:
    """The device path before per-pass rounding (kept here only to measure the change)."""
    x = tiles.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    size = spec.input_size
    target = _resized_hw(h, w, spec.resize_size) if spec.crop else (size, size)
    if (h, w) != target:
        down = target[0] < h or target[1] < w
        x = F.interpolate(x, size=target, mode=spec.interpolation, align_corners=False,
                          antialias=down or spec.interpolation == "bicubic")
        if spec.interpolation == "bicubic":
            x = x.clamp_(0.0, 255.0)
    if spec.crop:
        h, w = x.shape[-2:]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    mean, std = _norm(spec, x.dtype, x.device)
    return (x / 255.0 - mean) / std


def images(folder: Path, native: int) -> dict[str, Image.Image]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.suffix not in {".png", ".tif"}:
            continue
        img = Image.open(p).convert("RGB")
        out[f"{p.name}@{img.size[0]}"] = img
        if img.size[0] >= 512 and native != img.size[0]:
            left = (img.size[0] - native) // 2
            out[f"{p.name}@crop{native}"] = img.crop((left, left, left + native, left + native))
    return out


def pixel_errors(spec: registry.TileModelSpec, imgs: dict[str, Image.Image]
                 ) -> dict[str, Any]:
    rows = []
    for name, img in imgs.items():
        t = torch.from_numpy(np.asarray(img).copy())[None]
        ref = denormalise(reference_preprocess_pil(img, spec), spec) * 255
        for how, fn in (("device", preprocess), ("one_pass", one_pass)):
            got = denormalise(fn(t, spec)[0], spec) * 255
            d = (got - ref).abs()
            rows.append({"tile": name, "how": how, "mean": d.mean().item(),
                         "max": d.max().item(),
                         "frac_off": (d > 0.5).float().mean().item()})
    summary = {}
    for how in ("device", "one_pass"):
        mine = [r for r in rows if r["how"] == how]
        summary[how] = {"worst_mean": max(r["mean"] for r in mine),
                        "worst_max": max(r["max"] for r in mine),
                        "worst_frac_off": max(r["frac_off"] for r in mine),
                        "worst_tile": max(mine, key=lambda r: r["mean"])["tile"]}
    return {"summary": summary, "rows": rows}


def embedding_errors(spec: registry.TileModelSpec, imgs: dict[str, Image.Image]
                     ) -> dict[str, float]:
    torch.manual_seed(0)
    model = registry.build(spec, device="cpu").eval()
    out: dict[str, float] = {}
    with torch.inference_mode():
        ref_in = torch.stack([reference_preprocess_pil(im, spec) for im in imgs.values()])
        ref = registry.embed(spec, model, ref_in)
        for how, fn in (("device", preprocess), ("one_pass", one_pass)):
            got = torch.cat([registry.embed(spec, model, fn(
                torch.from_numpy(np.asarray(im).copy())[None], spec)) for im in imgs.values()])
            rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
            out[f"{how}_worst_rel"] = rel.max().item()
            out[f"{how}_mean_rel"] = rel.mean().item()
    return out


def _resize(x: torch.Tensor, size: int, mode: str, how: str) -> torch.Tensor:
    if how == "one_pass":
        return F.interpolate(x.float(), size=(size, size), mode=mode, antialias=True)
    return resize_like_pil(x, (size, size), mode, how)


def timings(n: int = 16) -> dict[str, float]:
    """ms per tile on this CPU: exact kernels vs the former float resize."""
    out = {}
    for n_in, n_out in ((512, 448), (256, 224)):
        x = torch.randint(0, 256, (n, 3, n_in, n_in), dtype=torch.uint8)
        for mode in ("bilinear", "bicubic"):
            for how in ("gemm", "taps", "one_pass"):
                _resize(x, n_out, mode, how)
                t0 = time.perf_counter()
                _resize(x, n_out, mode, how)
                out[f"{n_in}->{n_out} {mode} {how}"] = 1000 * (time.perf_counter() - t0) / n
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=Path, default=SHARED_TILES)
    ap.add_argument("--embed", nargs="*", default=[],
                    help="models whose embeddings (random weights) are compared too")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, Any] = {}
    print(f"{'model':16s} {'device mean/max':>17s} {'one-pass mean/max':>19s}  worst tile")
    for spec in registry.MODELS.values():
        if spec.preprocess_on == "model":
            continue
        imgs = images(args.tiles, spec.native_tile_px)
        res = pixel_errors(spec, imgs)
        dev, old = res["summary"]["device"], res["summary"]["one_pass"]
        print(f"{spec.id:16s} {dev['worst_mean']:8.4f} {dev['worst_max']:7.2f}  "
              f"{old['worst_mean']:9.4f} {old['worst_max']:7.2f}   {dev['worst_tile']}",
              flush=True)
        if spec.id in args.embed:
            t0 = time.perf_counter()
            res["embedding"] = embedding_errors(spec, imgs)
            print(f"{'':16s} embedding rel. error: {res['embedding']} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results[spec.id] = res
    cost = timings()
    for k, v in cost.items():
        print(f"{k:32s} {v:7.1f} ms/tile (CPU, {torch.get_num_threads()} threads)")
    dest = write_results("preprocess", {
        "cpu_ms_per_tile": cost,
        "what": "per-model pixel error (0-255 units) of the device preprocessing vs the model "
                "cards' PIL transform, over the tiles in " + str(args.tiles),
        "machine": {"cpu": cpu_model(), "torch": torch.__version__,
                    "pillow": Image.__version__},
        "models": results})
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
