"""Tissue detection against ground truth: our mask vs an HSV mask vs Otsu on saturation.

    .venv/bin/python bench/tissue.py [--seeds 4] [--size 448x320]
        # -> results/tissue.json and results/tissue.md (~1 min on 2 cores)

Scenes (``tests/tissuegen.py``): thumbnails at 8 px per tile (14 µm/px: 224 px tiles at
0.5 µm/px) of real H&E from CMU-1-Small-Region on glass, stored on the way as a JPEG level at
twice the thumbnail's resolution as a scanner would, with their truth: per pixel, the
fraction of its area that is tissue and the fraction that is pen, dust, cover-slip edge or
scanner border. Conditions: ``clean``, ``faint`` (pale pieces), ``fat`` (adipose: pale
membranes, counts as tissue), ``pen``, ``dust``, ``coverslip``, ``border``, and ``all`` of
them at once; each on H&E and on an IHC-like recolouring (haematoxylin + DAB), ``--seeds``
scenes each.

Every method's mask goes through the pipeline's own grid rule (``tissue.plan_grid``,
``min_tissue`` 0.25); a tile is truly tissue when its truth fraction is >= 0.25. Reported per
method and condition, over all tiles of its scenes:

- **recall**: truth tiles kept / truth tiles;
- **precision**: kept tiles that are truth tiles / kept tiles;
- **on artefact**: the share of kept tiles that are artefact tiles (truth < 0.25 and >= 10% of
  the tile pen, dust, cover-slip or border); **artefact kept**: artefact tiles kept / artefact
  tiles;
- **ms**: median time of the mask per thumbnail (448x320), and once on a 1792x1280 one.

Methods:

- **ours**: ``pipeline.tissue.tissue_mask`` as tiling calls it;
- **hsv**: the CLAM / hs2p recipe: HSV saturation (OpenCV, 0-255) median-blurred over 7x7,
  > 8, closed with a 4x4 kernel, components smaller than a tile dropped;
- **otsu**: Otsu's threshold on the HSV saturation (3x3 Gaussian blur first), nothing else;
- **before**: our mask before this benchmark (Otsu on saturation clamped to [0.08, 0.15],
  pixels darker than 0.1 dropped, 3x3 close-open).

It also checks the real slide the issue names: CMU-1-Small-Region.svs (tests/data), planned
as ``tile_slide`` plans it (224 px at 0.5 µm/px), against the truth its full resolution gives
(``tissuegen.source_truth_full``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import openslide  # noqa: E402
import tissuegen as tg  # noqa: E402
from benchkit import RESULTS, cpu_model  # noqa: E402
from slidegen import CMU_SMALL  # noqa: E402

from pipeline.tissue import (  # noqa: E402
    _otsu,
    close_open,
    plan_grid,
    read_thumbnail,
    thumbnail_size,
    tissue_mask,
)

Mask = Callable[[np.ndarray], np.ndarray]
HEADER = "Written by `.venv/bin/python bench/tissue.py` (see bench/README.md).\n\n"


# ---------------------------------------------------------------- the methods


def ours(rgb: np.ndarray) -> np.ndarray:
    return tissue_mask(rgb)[0]


def hsv_mask(rgb: np.ndarray) -> np.ndarray:
    """CLAM / hs2p style: median-blurred HSV saturation > 8 (of 255), closing, area filter."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.medianBlur(sat, 7)
    mask = (sat > 8).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((4, 4), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= tg.PX_PER_TILE ** 2
    keep[0] = False
    return keep[labels]


def otsu_mask(rgb: np.ndarray) -> np.ndarray:
    """Otsu's threshold on HSV saturation (OpenCV, 0-255), lightly blurred."""
    sat = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1], (3, 3), 0)
    _, mask = cv2.threshold(sat, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(bool)


def before(rgb: np.ndarray) -> np.ndarray:
    """Our mask before this benchmark (TILING_ALGORITHM_VERSION 2), as it was."""
    sat = np.empty(rgb.shape[:2], np.uint8)
    bright = np.empty(rgb.shape[:2], bool)
    for y in range(0, rgb.shape[0], 256):
        part = rgb[y:y + 256]
        r, g, b = part[..., 0], part[..., 1], part[..., 2]
        vmax = np.maximum(np.maximum(r, g), b).astype(np.float32)
        vmin = np.minimum(np.minimum(r, g), b).astype(np.float32)
        s = np.divide(vmax - vmin, vmax, out=np.zeros_like(vmax), where=vmax > 0)
        sat[y:y + 256] = np.rint(s * 255.0)
        bright[y:y + 256] = vmax >= 0.1 * 255.0
    hist = np.bincount(sat[bright], minlength=256).astype(np.float64)
    edges = np.concatenate([[0.0], (np.arange(256) + 0.5) / 255.0])
    otsu = _otsu(hist, edges) if hist.sum() else 1.0
    threshold = min(max(otsu, 0.08), 0.15)
    return close_open(bright & (sat >= np.ceil(threshold * 255.0 - 0.5)), 1)


METHODS: dict[str, Mask] = {"ours": ours, "hsv": hsv_mask, "otsu": otsu_mask, "before": before}


# ---------------------------------------------------------------- scoring

MIN_TISSUE, ARTEFACT_TILE = tg.MIN_TISSUE, tg.ARTEFACT_TILE
kept_tiles, counts, rates = tg.kept_tiles, tg.counts, tg.rates


def add(total: dict[str, int], c: dict[str, int]) -> None:
    for k, v in c.items():
        total[k] = total.get(k, 0) + v


def real_slide(path: Path) -> dict[str, Any]:
    """Each method on a real slide planned as tile_slide plans it, against its full-res truth."""
    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.dimensions
        mpp0 = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        tile_l0 = 224 * 0.5 / mpp0
        thumb = read_thumbnail(slide, thumbnail_size(w, h, tile_l0, tg.PX_PER_TILE))
        rgba = np.asarray(slide.read_region((0, 0), 0, (w, h)))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    truth_full, _ = tg.source_truth_full(rgb)
    truth_grid = plan_grid(truth_full, w, h, tile_l0, 0.0, mpp0)
    tissue = np.zeros((truth_grid.rows, truth_grid.cols))
    tissue[truth_grid.row, truth_grid.col] = truth_grid.tissue
    out: dict[str, Any] = {"slide": path.name, "grid_tiles": int(tissue.size),
                           "truth_tiles": int((tissue >= MIN_TISSUE).sum())}
    for name, fn in METHODS.items():
        mask = fn(thumb)
        g = plan_grid(mask, w, h, tile_l0, MIN_TISSUE, mpp0)
        kept = np.zeros_like(tissue, bool)
        kept[g.row, g.col] = True
        c = counts(kept, tissue, np.zeros_like(tissue))
        out[name] = {"kept": g.num_tiles, **{k: v for k, v in rates(c).items()
                                             if k in ("recall", "precision")}}
    return out


# ---------------------------------------------------------------- report


def fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def markdown(res: dict[str, Any]) -> str:
    """Tables of ``res``: per condition, each method's recall / precision / on artefact."""
    methods = res["methods"]
    lines = ["Each cell: tile recall / precision / share of kept tiles on artefact "
             "(pen, dust, cover slip, border).", "",
             "| stain | condition | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for row in res["table"]:
        art = row["condition"] in (*tg.ARTEFACTS, "all", "total")
        cells = [f"{fmt(row[m]['recall'])} / {fmt(row[m]['precision'])} / "
                 + (fmt(row[m]["on_artefact"], pct=True) if art else "-") for m in methods]
        name = f"**{row['condition']}**" if row["condition"] == "total" else row["condition"]
        lines.append(f"| {row['stain']} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "| mask time per thumbnail (ms, one core) | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for size, t in res["ms"].items():
        lines.append(f"| {size} | " + " | ".join(f"{t[m]:.1f}" for m in methods) + " |")
    real = res["real"]
    lines += ["", f"Real slide {real['slide']} (224 px tiles at 0.5 µm/px): "
              f"{real['truth_tiles']} of {real['grid_tiles']} tiles are >= 25% tissue at full "
              "resolution.", "", "| method | tiles kept | recall | precision |",
              "|---|---|---|---|"]
    for m in methods:
        r = real[m]
        lines.append(f"| {m} | {r['kept']} | {fmt(r['recall'])} | {fmt(r['precision'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="scenes per condition and stain")
    ap.add_argument("--size", default="448x320", help="thumbnail size WxH (multiples of 8)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite results/tissue.md from results/tissue.json")
    args = ap.parse_args()
    if args.render:
        res = json.loads((RESULTS / "tissue.json").read_text())
        (RESULTS / "tissue.md").write_text(HEADER + markdown(res))
        print(markdown(res))
        return
    tw, th = (int(v) for v in args.size.split("x"))
    methods = {m: METHODS[m] for m in args.methods}

    t0 = time.perf_counter()
    totals: dict[tuple[str, str, str], dict[str, int]] = {}
    times: dict[str, list[float]] = {m: [] for m in methods}
    per_scene = []
    big = None
    for stain in tg.STAINS:
        for cond in tg.CONDITIONS:
            for seed in range(args.seeds):
                scene = tg.make_scene(cond, stain, seed, size=(tw, th))
                tissue, artefact = scene.tile_fractions()
                if big is None and cond == "all":
                    big = cv2.resize(scene.rgb, (tw * 4, th * 4),
                                     interpolation=cv2.INTER_LINEAR)
                for name, fn in methods.items():
                    t1 = time.perf_counter()
                    mask = fn(scene.rgb)
                    times[name].append(time.perf_counter() - t1)
                    c = counts(kept_tiles(mask), tissue, artefact)
                    per_scene.append({"stain": stain, "condition": cond, "seed": seed,
                                      "method": name, **c})
                    for key in ((stain, cond, name), (stain, "total", name)):
                        add(totals.setdefault(key, {}), c)
    gen_s = time.perf_counter() - t0

    ms = {f"{tw}x{th}": {m: 1e3 * statistics.median(v) for m, v in times.items()}}
    assert big is not None
    big_ms = {}
    for name, fn in methods.items():
        fn(big)
        best = min(_timed(fn, big) for _ in range(3))
        big_ms[name] = 1e3 * best
    ms[f"{big.shape[1]}x{big.shape[0]}"] = big_ms

    table = []
    for stain in tg.STAINS:
        for cond in (*tg.CONDITIONS, "total"):
            row: dict[str, Any] = {"stain": stain, "condition": cond}
            for name in methods:
                c = totals[(stain, cond, name)]
                row[name] = {**rates(c), **c}
            table.append(row)
    res: dict[str, Any] = {
        "methods": list(methods), "seeds": args.seeds, "size": [tw, th],
        "min_tissue": MIN_TISSUE, "artefact_tile": ARTEFACT_TILE, "table": table, "ms": ms,
        "real": real_slide(CMU_SMALL), "scenes": per_scene, "seconds": time.perf_counter() - t0,
        "scene_seconds": gen_s, "cpu": cpu_model(),
    }
    md = markdown(res)
    print(md)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "tissue.json").write_text(json.dumps(res, indent=1) + "\n")
        (RESULTS / "tissue.md").write_text(HEADER + md)
        print(f"wrote {RESULTS / 'tissue.json'} and tissue.md")


def _timed(fn: Mask, rgb: np.ndarray) -> float:
    t = time.perf_counter()
    fn(rgb)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
