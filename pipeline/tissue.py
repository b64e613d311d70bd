"""Tissue mask on a thumbnail and the tile grid it selects.

The grid is a pure function of a boolean mask and the slide geometry, so it is tested without
decoding any slide. Tiles are enumerated row by row, left to right: that order is the tile
``index`` recorded in the output and the order chunks travel in.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image

from pipeline.slides import RegionReader, read_resampled

# Saturation (0-1) below which a pixel is never tissue: glass, dust and JPEG noise sit well
# below, the palest eosin above. Without it Otsu would split pure noise on an empty slide.
SATURATION_FLOOR = 0.08
# Ceiling on the Otsu threshold: on a slide that is nearly all tissue Otsu separates pale from
# dark tissue instead of tissue from glass; pale H&E stays above this.
SATURATION_CEILING = 0.15
# Pixels darker than this value (0-1) are scanner borders, pen or debris, not tissue.
MIN_VALUE = 0.1
# Long-side cap of the mask thumbnail; bounds its memory on very large slides.
MAX_THUMBNAIL_SIDE = 4096
# Level pixels per side of one block read while building the thumbnail (bounds memory: one
# 12 MB block per thread).
THUMBNAIL_BLOCK = 1024


@dataclass
class TileGrid:
    """Kept tiles of a slide in row-major order, plus the grid they come from."""

    x: np.ndarray  # int64, level-0 left edge (rounded from col * tile_l0)
    y: np.ndarray  # int64, level-0 top edge
    tissue: np.ndarray  # float32, tissue fraction of the tile in the mask
    row: np.ndarray  # int32 grid row
    col: np.ndarray  # int32 grid column
    tile_l0: float  # tile edge in level-0 pixels (may be fractional)
    rows: int  # grid rows that fit entirely inside the slide
    cols: int
    tissue_area_mm2: float  # mask area of the whole slide

    @property
    def num_tiles(self) -> int:
        return int(self.x.shape[0])

    @property
    def grid_tiles(self) -> int:
        """Tiles in the full grid before the tissue filter."""
        return self.rows * self.cols


def thumbnail_size(width: int, height: int, tile_l0: float, px_per_tile: int,
                   max_side: int = MAX_THUMBNAIL_SIDE) -> tuple[int, int]:
    """Mask size giving each tile about ``px_per_tile`` mask pixels per edge, capped."""
    scale = px_per_tile / tile_l0  # mask px per level-0 px
    scale = min(scale, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail_level(slide: openslide.OpenSlide, size: tuple[int, int]) -> int:
    """Pyramid level :func:`read_thumbnail` reads for a thumbnail of ``size`` (w, h)."""
    w0, h0 = slide.dimensions
    return int(slide.get_best_level_for_downsample(min(w0 / size[0], h0 / size[1])))


def read_thumbnail(slide: openslide.OpenSlide, size: tuple[int, int], *, path: str = "",
                   reader: RegionReader | None = None,
                   pool: Executor | None = None) -> np.ndarray:
    """RGB thumbnail of the whole slide at exactly ``size`` (w, h), in bounded memory.

    Unlike ``OpenSlide.get_thumbnail`` (which reads a whole level at once: gigabytes for a
    single-level slide) it reads the best level in blocks and area-averages each (BOX filter:
    the mask wants the mean colour of each patch, not sharpness). ``reader`` (one that has
    :func:`thumbnail_level`) replaces OpenSlide; ``pool`` reads blocks in parallel, since
    planning is serial work in front of every slide's tiles.
    """
    w0, h0 = slide.dimensions
    tw, th = size
    fx, fy = w0 / tw, h0 / th  # level-0 px per thumbnail px
    level = thumbnail_level(slide, size)
    ds = float(slide.level_downsamples[level])
    gx, gy = fx / ds, fy / ds  # level px per thumbnail px
    bw = max(1, int(THUMBNAIL_BLOCK // gx))
    bh = max(1, int(THUMBNAIL_BLOCK // gy))
    out = np.empty((th, tw, 3), np.uint8)
    source: openslide.OpenSlide | RegionReader = reader if reader is not None else slide

    def block(corner: tuple[int, int]) -> None:
        tx, ty = corner
        tx1, ty1 = min(tw, tx + bw), min(th, ty + bh)
        out[ty:ty1, tx:tx1] = read_resampled(
            source, level, (tx * gx, ty * gy, tx1 * gx, ty1 * gy), (tx1 - tx, ty1 - ty),
            Image.Resampling.BOX, path=path,
        )

    corners = [(tx, ty) for ty in range(0, th, bh) for tx in range(0, tw, bw)]
    for _ in (pool.map(block, corners) if pool is not None else map(block, corners)):
        pass
    return out


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises between-class variance)."""
    if values.size == 0:
        return 1.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return _otsu(hist.astype(np.float64), edges)


def _otsu(hist: np.ndarray, edges: np.ndarray) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    k = int(np.argmax(between))
    return float(edges[k + 1])


def _shift_reduce(mask: np.ndarray, radius: int, op: str) -> np.ndarray:
    """Dilation (op="or") or erosion (op="and") with a (2r+1)^2 square; border replicated."""
    padded = np.pad(mask, radius, mode="edge")
    h, w = mask.shape
    out = padded[radius:radius + h, radius:radius + w].copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            view = padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
            if op == "or":
                out |= view
            else:
                out &= view
    return out


def close_open(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary closing then opening: fills pinholes in tissue, then drops isolated specks."""
    closed = _shift_reduce(_shift_reduce(mask, radius, "or"), radius, "and")
    return _shift_reduce(_shift_reduce(closed, radius, "and"), radius, "or")


def tissue_mask(rgb: np.ndarray, *, floor: float = SATURATION_FLOOR,
                ceiling: float = SATURATION_CEILING, min_value: float = MIN_VALUE,
                radius: int = 1) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB thumbnail and the saturation threshold used.

    Stained tissue is coloured, glass is grey-white: HSV saturation separates them across
    stains and scanners better than brightness, and Otsu adapts to each slide's staining.
    """
    # Saturation is kept as uint8 and computed in row blocks: float copies of a 4096-px
    # thumbnail would be the largest allocation of the whole tiling worker.
    sat = np.empty(rgb.shape[:2], np.uint8)
    bright = np.empty(rgb.shape[:2], bool)
    for y in range(0, rgb.shape[0], 256):
        part = rgb[y:y + 256]
        r, g, b = part[..., 0], part[..., 1], part[..., 2]
        # element-wise over the three channels: ~25x faster than max(axis=-1), a reduction
        # over an axis of length 3 (a serial step in front of every slide)
        vmax = np.maximum(np.maximum(r, g), b).astype(np.float32)
        vmin = np.minimum(np.minimum(r, g), b).astype(np.float32)
        s = np.divide(vmax - vmin, vmax, out=np.zeros_like(vmax), where=vmax > 0)
        sat[y:y + 256] = np.rint(s * 255.0)
        bright[y:y + 256] = vmax >= min_value * 255.0
    hist = np.bincount(sat[bright], minlength=256).astype(np.float64)
    # Bin k holds saturations that round to k/255: its upper edge is (k + 0.5)/255.
    edges = np.concatenate([[0.0], (np.arange(256) + 0.5) / 255.0])
    otsu = _otsu(hist, edges) if hist.sum() else 1.0
    threshold = min(max(otsu, floor), ceiling)
    mask = bright & (sat >= np.ceil(threshold * 255.0 - 0.5))
    if radius > 0:
        mask = close_open(mask, radius)
    return mask, threshold


def _cover_ranges(n_tiles: int, tile_l0: float, px: float, n_mask: int) -> np.ndarray:
    """Mask index range [start, stop) of each tile along one axis.

    A mask pixel belongs to the tile containing its centre; a tile smaller than a mask pixel
    takes the pixel under its own centre, so every tile sees at least one.
    """
    edges = np.arange(n_tiles + 1, dtype=np.float64) * tile_l0 / px - 0.5
    bounds = np.clip(np.ceil(edges).astype(np.int64), 0, n_mask)
    start, stop = bounds[:-1], bounds[1:]
    empty = stop <= start
    if empty.any():
        centre = np.clip(((np.arange(n_tiles) + 0.5) * tile_l0 / px).astype(np.int64), 0,
                         n_mask - 1)
        start = np.where(empty, centre, start)
        stop = np.where(empty, centre + 1, stop)
    return np.stack([start, stop], axis=1)


def plan_grid(mask: np.ndarray, width: int, height: int, tile_l0: float, min_tissue: float,
              mpp0: float) -> TileGrid:
    """Full tiles inside the slide whose tissue fraction reaches ``min_tissue``, row-major.

    ``mask`` covers the whole level-0 image (``width`` x ``height``) at any resolution; each
    axis gets its own exact scale so rounding of the thumbnail size does not shift tiles.
    """
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    if tile_l0 <= 0:
        raise ValueError(f"tile_l0 must be positive, got {tile_l0}")
    mh, mw = mask.shape
    px_x, px_y = width / mw, height / mh  # level-0 px per mask px
    # Tiny epsilon: 2220 / 222.0 must give 10 columns, not 9 through float error.
    cols = max(0, int(math.floor(width / tile_l0 + 1e-9)))
    rows = max(0, int(math.floor(height / tile_l0 + 1e-9)))
    area_mm2 = float(mask.sum()) * px_x * px_y * mpp0 * mpp0 / 1e6
    if rows == 0 or cols == 0:
        empty = np.zeros(0, np.int64)
        return TileGrid(empty, empty.copy(), np.zeros(0, np.float32), np.zeros(0, np.int32),
                        np.zeros(0, np.int32), float(tile_l0), rows, cols, area_mm2)
    xr = _cover_ranges(cols, tile_l0, px_x, mw)
    yr = _cover_ranges(rows, tile_l0, px_y, mh)
    # Mask pixels per tile, one tile row at a time: a whole-mask integral image would be
    # int64 (8 bytes per mask pixel, ~100 MB on a 4096 px mask), the planning peak.
    inside = np.empty((rows, cols), np.int64)
    prefix = np.zeros(mw + 1, np.int64)
    for r, (y0, y1) in enumerate(yr.tolist()):
        np.cumsum(mask[y0:y1].sum(axis=0, dtype=np.int64), out=prefix[1:])
        inside[r] = prefix[xr[:, 1]] - prefix[xr[:, 0]]
    area = (yr[:, 1] - yr[:, 0])[:, None] * (xr[:, 1] - xr[:, 0])[None, :]
    fraction = (inside / area).astype(np.float32)  # (rows, cols)
    keep_r, keep_c = np.nonzero(fraction >= np.float32(min_tissue))  # row-major order
    xs = np.floor(keep_c * tile_l0 + 0.5).astype(np.int64)
    ys = np.floor(keep_r * tile_l0 + 0.5).astype(np.int64)
    return TileGrid(
        x=xs, y=ys, tissue=fraction[keep_r, keep_c],
        row=keep_r.astype(np.int32), col=keep_c.astype(np.int32),
        tile_l0=float(tile_l0), rows=rows, cols=cols, tissue_area_mm2=area_mm2,
    )
