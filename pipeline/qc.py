"""Per-tile quality values, computed from the tile pixels the tiling stage already holds.

Recorded, not applied: a slide's tile count is fixed before its pixels are decoded (the plan
promises it to the writers), and what counts as too blurry depends on the scanner and the
question, so users filter afterwards (README, "Tile QC"). Cost, measured with
``bench/tiling.py --qc``: see bench/README.md.

- ``qc_background``: fraction of glass pixels (bright and grey), on every 8th pixel per axis.
- ``qc_pen``: fraction of pen-ink pixels (green or blue ink hues, saturated; or near-black
  and grey, as black ink is), on the same pixels. H&E and DAB hues lie outside both ranges.
- ``qc_sharpness`` (``tiling.qc_sharpness``, off by default: it costs ~9-12% of tiling):
  variance of the Laplacian of the grey tile at half resolution (area-averaged, so JPEG noise
  counts less); higher is sharper, out-of-focus tiles fall to a small fraction of a slide's
  median.
"""

from __future__ import annotations

import cv2
import numpy as np

QC_COLUMNS = ("qc_background", "qc_sharpness", "qc_pen")
# Every STRIDE-th pixel per axis for the colour fractions: 784 samples of a 224 px tile
# (fractions within ~2%), at a third of the cost of every 4th pixel (bench/README.md).
STRIDE = 8
# OpenCV "FULL" HSV: hue, saturation and value all 0-255 (hue 0-360 degrees -> 0-255).
GLASS_MIN_VALUE = 215
GLASS_MAX_SATURATION = 30
INK_MIN_SATURATION = 80
GREEN_HUE = (50, 121)   # ~70-170 degrees: green and cyan inks; no stain of H&E or DAB there
BLUE_HUE = (128, 172)   # ~180-243 degrees: blue ink; in the bundled H&E tiles 99.5% of
#                         saturated pixels lie at >= 181 (~255 degrees, haematoxylin and up)
BLACK_MAX_VALUE = 50    # black ink: near-black and grey (nuclei are dark but saturated)
BLACK_MAX_SATURATION = 90


def tile_qc(tiles: np.ndarray, sharpness: bool = False) -> dict[str, np.ndarray]:
    """QC values of uint8 (N, T, T, 3) RGB tiles, as float32 arrays of length N (sharpness
    NaN unless asked for)."""
    n = tiles.shape[0]
    if n == 0:
        return {c: np.zeros(0, np.float32) for c in QC_COLUMNS}
    sub = np.ascontiguousarray(tiles[:, ::STRIDE, ::STRIDE])
    hsv = cv2.cvtColor(sub.reshape(-1, sub.shape[2], 3), cv2.COLOR_RGB2HSV_FULL)
    h, s, v = (hsv[..., i].reshape(n, -1) for i in range(3))
    glass = (v >= GLASS_MIN_VALUE) & (s <= GLASS_MAX_SATURATION)
    inked = s >= INK_MIN_SATURATION
    ink = (inked & (h >= GREEN_HUE[0]) & (h <= GREEN_HUE[1])) | \
          (inked & (h >= BLUE_HUE[0]) & (h <= BLUE_HUE[1])) | \
          ((v <= BLACK_MAX_VALUE) & (s <= BLACK_MAX_SATURATION))
    return {"qc_background": glass.mean(axis=1, dtype=np.float32),
            "qc_sharpness": _sharpness(tiles) if sharpness else np.full(n, np.nan, np.float32),
            "qc_pen": ink.mean(axis=1, dtype=np.float32)}


def _sharpness(tiles: np.ndarray) -> np.ndarray:
    """One resize, one grey image and one Laplacian for the whole chunk (tiles stacked
    vertically); the rows where two tiles meet are left out of each tile's variance."""
    n, t = tiles.shape[0], tiles.shape[1]
    half = t // 2
    small = cv2.resize(tiles.reshape(n * t, t, 3), (half, n * half),
                       interpolation=cv2.INTER_AREA)
    lap = cv2.Laplacian(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), cv2.CV_32F)
    out = np.empty(n, np.float32)
    for i in range(n):
        _, std = cv2.meanStdDev(lap[i * half + 1:(i + 1) * half - 1, 1:-1])
        out[i] = float(std[0, 0]) ** 2
    return out


def slide_summary(values: dict[str, np.ndarray]) -> dict[str, float | None]:
    """One value per column for the slides row: mean fractions, median sharpness (None for
    a value not computed)."""
    out: dict[str, float | None] = {}
    for c, reduce in (("qc_background", np.mean), ("qc_sharpness", np.median),
                      ("qc_pen", np.mean)):
        v = values[c]
        out[c] = None if not len(v) or np.isnan(v).all() else float(reduce(v))
    return out
