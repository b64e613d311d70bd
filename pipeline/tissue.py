"""Tissue mask on a thumbnail and the tile grid it selects.

The grid is a pure function of a boolean mask and the slide geometry, so it is tested without
decoding any slide. Tiles are enumerated row by row, left to right: that order is the tile
``index`` recorded in the output and the order chunks travel in.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import openslide
from PIL import Image

from pipeline.readers import Reader, read_resampled

# ---- the tissue mask (tissue_mask). Its thresholds apply to the white-balanced thumbnail:
# each pixel divided by the glass colour around it (glass = 1 in every channel). There,
# chroma = max - min of the three channels (what stain adds: ~0.004 on glass), darkness =
# 1 - their mean, hue in degrees. Figures quoted are from CMU-1-Small-Region's thumbnail.
# Chroma from which a pixel counts as stained (palest tissue ~0.03-0.05, glass 99.9% < 0.02).
MIN_CHROMA = 0.02
# The threshold rises to NOISE_FACTOR x the glass's median chroma where glass is noisy (a
# thumbnail of little-averaged pixels): ~1 level of 255, x3, is below MIN_CHROMA.
NOISE_FACTOR = 3.0
# Pixels from FAINT_SHARE x MIN_CHROMA count too where they touch stained ones (8-connected):
# the pale rims of sections and the membranes of fat...
FAINT_SHARE = 0.75
# ... and so do pixels this much darker than the glass around them whose colour is too weak
# to have a hue (JPEG's 4:2:0 chroma takes the colour of a membrane a pixel wide).
FAINT_DARKNESS = 0.025
# Stained components under MIN_SEED_PX do not seed faint pixels (lone noisy pixels).
MIN_SEED_PX = 4
# Fat at thumbnail scale: a 7x7 window where >= LACE_SHARE of pixels are LACE_DARKNESS
# darker than glass, without a hue (its membranes), is faint tissue.
LACE_DARKNESS = 0.013
LACE_SHARE = 0.2
# The stain arc: haematoxylin (~246), eosin (~305), DAB (10-25) and every mixture of them lie
# between blue-violet and brown, through magenta and red. Chromatic pixels outside it (yellow,
# green, cyan, blue: 35-232) are not stain but ink, marking dye or mounting medium.
STAIN_HUES = (232.0, 35.0)
# Chroma from which hue is trusted enough to call a pixel ink.
INK_CHROMA = 0.03
# Vivid red is red marker: hue in [340, 12] and chroma >= RED_INK_VIVIDNESS x darkness
# (eosin is magenta, DAB browner and duller; CMU-1's tissue reaches ~1.0 only at magenta).
RED_INK_HUES = (340.0, 12.0)
RED_INK_VIVIDNESS = 0.9
# Over tissue, ink is dark and keeps hues dense tissue rarely has: blue-violet [232, 252) and
# red [335, 15] at darkness >= 0.5 (CMU-1's dark tissue: 260-340). Such pixels are ink where
# they touch a stroke.
INK_OVER_TISSUE_DARKNESS = 0.5
INK_OVER_TISSUE_HUES = (232.0, 252.0, 335.0, 15.0)
# Strokes are wide: ink pixels left after a 3x3 opening, in components of >= MIN_INK_PX, are
# strokes (stray pixels and marking dye along tissue edges are not); nothing within
# INK_MARGIN px of a stroke is tissue.
MIN_INK_PX = 8
INK_MARGIN = 1
# Grey is not stain: a pixel with darkness >= GREY_DARKNESS and chroma < MIN_VIVIDNESS x
# darkness is black ink, dust, scanner border or the cover-slip edge (CMU-1's least vivid
# tissue: ~0.17).
MIN_VIVIDNESS = 0.12
GREY_DARKNESS = 0.15
# Brightest channel under which a pixel is black (border, ink): the darkest tissue keeps ~0.22.
# Within BLACK_MARGIN px of a black or dark-grey area of MIN_INK_PX or more (a border, a
# black stroke) nothing is tissue: the edge of the dark blurs and takes colour in JPEG.
MIN_BRIGHTNESS = 0.18
BLACK_MARGIN = 2
# A pixel on the rim of the mask averages tissue and glass; it stays if its chroma is at least
# EDGE_COVERAGE x that of the stained pixels around it (5x5), i.e. if it is mostly tissue.
EDGE_COVERAGE = 0.75
# Closings: CLOSE_RADIUS (mask px) joins stained pixels into tissue; after dust is dropped,
# LACE_RADIUS closes the network of fat (adipocytes of 50-150 µm are 4-10 px at 8 px per tile
# of 224 px at 0.5 µm/px), whose cells are then filled as holes.
CLOSE_RADIUS = 2
LACE_RADIUS = 3
# Debris: a component of the mask under DEBRIS_MAX_PX (4 tiles) whose pixels are at least
# DEBRIS_SHARE dark (>= DEBRIS_DARKNESS) and dull (chroma < DEBRIS_VIVIDNESS x darkness) is
# a crumb of dirt or pigment, not a fragment of tissue.
DEBRIS_MAX_PX = 256
DEBRIS_SHARE = 0.5
DEBRIS_DARKNESS = 0.5
DEBRIS_VIVIDNESS = 0.25
# Components under MIN_COMPONENT_PX (mask px; a tile is 64 at 8 px per tile: 16 could not
# fill a quarter of one alone) are dust; holes up to MAX_HOLE_PX inside tissue (fat cells,
# lumens, gaps between fibres) are filled.
MIN_COMPONENT_PX = 16
MAX_HOLE_PX = 64
# Larger holes, up to FAT_HOLE_PX (64 tiles), are filled too when at least FAT_SHARE of their
# pixels are faintly stained: a fat lobule whose membranes did not all close, not glass.
FAT_HOLE_PX = 4096
FAT_SHARE = 0.1
# White balance (glass_colour, glass_tint): the glass colour is estimated on a sample of at
# most GLASS_SAMPLE_SIDE px; locally, glass is pixels within GLASS_CHROMA of it and not next
# to colour, averaged over GLASS_WINDOW_PX (two tiles), correcting at most MAX_GLASS_TINT.
GLASS_SAMPLE_SIDE = 512
GLASS_CHROMA = 0.015
GLASS_WINDOW_PX = 16
MAX_GLASS_TINT = 0.015
MAX_GLASS_LIGHT = 0.1
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
                   reader: Reader | None = None,
                   pool: Executor | None = None, level: int | None = None) -> np.ndarray:
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
    if level is None:  # pipeline.geometry chose it with the slide's geometry
        level = thumbnail_level(slide, size)
    ds = float(slide.level_downsamples[level])
    gx, gy = fx / ds, fy / ds  # level px per thumbnail px
    bw = max(1, int(THUMBNAIL_BLOCK // gx))
    bh = max(1, int(THUMBNAIL_BLOCK // gy))
    out = np.empty((th, tw, 3), np.uint8)
    source: openslide.OpenSlide | Reader = reader if reader is not None else slide

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


def glass_colour(rgb: np.ndarray) -> np.ndarray:
    """RGB (float32) of the glass: the median of the brightest near-grey pixels."""
    return _glass(rgb)[0]


def _glass(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """(glass colour, median chroma of the glass around it): its colour and its noise.

    Blank white (>= 254 in every channel: outside the scanned area) is ignored. If what is
    found is not near-grey (a slide covered in tissue), a neutral white of its brightness is
    used instead, so that pale tissue still reads as coloured.
    """
    step = max(1, math.ceil(max(rgb.shape[:2]) / GLASS_SAMPLE_SIDE))
    f = rgb[::step, ::step].reshape(-1, 3)
    r, g, b = f[:, 0], f[:, 1], f[:, 2]
    vmax = np.maximum(np.maximum(r, g), b).astype(np.int16)
    vmin = np.minimum(np.minimum(r, g), b).astype(np.int16)
    grey = (vmin < 254) & (vmax >= 100) & (25 * (vmax - vmin) <= 2 * vmax)  # sat <= 0.08
    if grey.sum() < 16:
        white = 255.0 if (vmin >= 254).any() else max(float(vmax.max()), 100.0)
        return np.full(3, white, np.float32), 0.0
    bright = grey & (vmax >= np.percentile(vmax[grey], 95) - 12)
    bg = np.array([np.median(c[bright]) for c in (r, g, b)], np.float32)
    if bg.max() - bg.min() > 0.05 * bg.max():
        bg = np.full(3, bg.max(), np.float32)
    t = f[bright].astype(np.float32) / bg
    noise = float(np.median(t.max(axis=1) - t.min(axis=1)))
    return bg, noise


def glass_tint(rgb: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, int]:
    """Local glass colour relative to ``bg`` on a grid of ``step`` px: (factor, step).

    Glass is not one colour across a slide (vignetting, past the cover slip, under mounting
    medium, from field to field of the scanner). Near-grey bright pixels that are not next to
    colour are averaged over windows of ~GLASS_WINDOW_PX; their tint (each channel over the
    mean of the three) is bounded to +-MAX_GLASS_TINT, so that no tissue, however pale and
    wide, is balanced away, and their brightness to +-MAX_GLASS_LIGHT. Where there is no glass
    nearby the factor is 1.
    """
    h, w = rgb.shape[:2]
    step = max(1, math.ceil(max(h, w) / 256))
    small = cv2.resize(rgb, (max(1, w // step), max(1, h // step)),
                       interpolation=cv2.INTER_AREA).astype(np.float32) / bg
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    mean = (r + g + b) * (1.0 / 3.0)
    coloured = (chroma >= GLASS_CHROMA).astype(np.uint8)
    glassy = ((cv2.dilate(coloured, np.ones((3, 3), np.uint8)) == 0)
              & (mean > 0.85)).astype(np.float32)
    k = 2 * max(1, round(GLASS_WINDOW_PX / step)) + 1
    weight = cv2.blur(glassy, (k, k)) + 0.05  # the prior, neutral, weighs 5% of a window
    local = (cv2.blur(small * glassy[..., None], (k, k)) + 0.05) / weight[..., None]
    light = local.sum(axis=-1, keepdims=True) * (1.0 / 3.0)
    tint = np.clip(local / light, 1 - MAX_GLASS_TINT, 1 + MAX_GLASS_TINT)
    light = np.clip(light, 1 - MAX_GLASS_LIGHT, 1 + MAX_GLASS_LIGHT)
    return (tint * light).astype(np.float32), step


def _hue_lut() -> np.ndarray:
    """Flags of each OpenCV HSV_FULL hue byte (360° in 256): 1 stain arc, 2 red ink, 4 inky."""
    deg = np.arange(256) * 360.0 / 256.0
    lut = np.where((deg >= STAIN_HUES[0]) | (deg <= STAIN_HUES[1]), 1, 0)
    lut |= np.where((deg >= RED_INK_HUES[0]) | (deg <= RED_INK_HUES[1]), 2, 0)
    lut |= np.where(((deg >= INK_OVER_TISSUE_HUES[0]) & (deg < INK_OVER_TISSUE_HUES[1]))
                    | (deg >= INK_OVER_TISSUE_HUES[2]) | (deg <= INK_OVER_TISSUE_HUES[3]), 4, 0)
    return lut.astype(np.uint8)


_HUE_FLAGS = {"stains": _hue_lut(), "any": np.ones(256, np.uint8)}


def _classify(wb: np.ndarray, min_chroma: float,
              hue_flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of a white-balanced uint8 RGB block (glass = 255): (stained, flags, chroma).

    ``stained``: 2 stained, 1 faintly stained, 0 not. ``flags``: 1 ink (off the stain arc, or
    vivid red); 2 dark with the hues of ink over tissue; 4 dark and dull (debris-like).
    ``chroma`` x 255 (uint8). Only pixels with some colour are examined: on most thumbnails
    they are a minority.
    """
    r, g, b = wb[..., 0], wb[..., 1], wb[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    stained = np.zeros(chroma.shape, np.uint8)
    flags = np.zeros(chroma.shape, np.uint8)
    faint = min(math.ceil(FAINT_SHARE * min_chroma * 255.0 - 1e-6), 255)
    # examined: some colour, or a little darker than glass
    light = (r.astype(np.int16) + g + b) <= round((1 - LACE_DARKNESS) * 765)
    idx = np.flatnonzero((chroma >= faint) | light)
    if idx.size:
        px = wb.reshape(-1, 3)[idx]
        c = chroma.reshape(-1)[idx].astype(np.int32)
        hue = hue_flags[cv2.cvtColor(px[:, None, :], cv2.COLOR_RGB2HSV_FULL)[:, 0, 0]]
        # element-wise over the three channels: a reduction over an axis of length 3 is ~25x
        # slower
        pr, pg, pb = px[:, 0], px[:, 1], px[:, 2]
        dark3 = 765 - (pr.astype(np.int32) + pg + pb)  # 3 x 255 x darkness
        vmax = np.maximum(np.maximum(pr, pg), pb)
        red = ((hue & 2) > 0) & (3 * c >= RED_INK_VIVIDNESS * dark3)
        arc = (hue & 1) > 0
        grey = (dark3 >= GREY_DARKNESS * 765) & (3 * c < MIN_VIVIDNESS * dark3)
        like = ~red & ~grey & (vmax >= MIN_BRIGHTNESS * 255)
        strong = like & arc & (c >= min_chroma * 255.0 - 1e-6)
        # faint: a little colour on the arc, or a little darker than glass with too little
        # colour for a hue (fat's membranes lose their colour in JPEG's 4:2:0 chroma)
        faint_px = like & (arc & (c >= faint) | (c < INK_CHROMA * 255.0 - 1e-6)
                           & (dark3 >= FAINT_DARKNESS * 765))
        stained.reshape(-1)[idx] = np.where(strong, 2, faint_px)
        ink = (c >= INK_CHROMA * 255.0 - 1e-6) & (~arc | red)
        inky = ((hue & 4) > 0) & (dark3 >= INK_OVER_TISSUE_DARKNESS * 765)
        dull = (dark3 >= DEBRIS_DARKNESS * 765) & (3 * c < DEBRIS_VIVIDNESS * dark3)
        lace = like & (dark3 >= LACE_DARKNESS * 765) & (c < INK_CHROMA * 255.0 - 1e-6)
        black = (grey & (dark3 >= DEBRIS_DARKNESS * 765)) | (vmax < MIN_BRIGHTNESS * 255)
        flags.reshape(-1)[idx] = ink + 2 * inky + 4 * dull + 8 * lace + 16 * black
    return stained, flags, chroma


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _keep_touching(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """8-connected components of ``candidates`` (uint8 0/1) that contain a ``seeds`` pixel."""
    n, labels = cv2.connectedComponents(candidates, connectivity=8)
    hit = np.zeros(n, np.uint8)
    hit[labels[seeds.astype(bool)]] = 1
    hit[0] = 0
    return hit[labels]


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` (uint8 0/1) without its 8-connected components smaller than ``min_px``."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = (stats[:, cv2.CC_STAT_AREA] >= min_px).astype(np.uint8)
    keep[0] = 0
    return keep[labels]



def _drop_debris(mask: np.ndarray, dull: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without components under ``min_px`` (dust) nor small mostly dull ones.

    A component under DEBRIS_MAX_PX whose pixels are at least DEBRIS_SHARE dark and dull is a
    crumb of debris; stained tissue that small is rarely that dull throughout.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA]
    keep = area >= max(min_px, 1)
    small = keep & (area < DEBRIS_MAX_PX)
    small[0] = False
    if small.any() and dull.any():
        dull_px = np.bincount(labels[dull.astype(bool)], minlength=n)
        keep &= ~(small & (dull_px >= DEBRIS_SHARE * area))
    keep[0] = False
    return keep.astype(np.uint8)[labels]


def _fill_holes(mask: np.ndarray, faint: np.ndarray, max_px: int) -> np.ndarray:
    """``mask`` with its holes filled: those up to ``max_px``, and those up to FAT_HOLE_PX
    that are not clean glass (at least FAT_SHARE of their pixels faintly stained: fat)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(1 - mask, connectivity=4)
    area = stats[:, cv2.CC_STAT_AREA]
    fill = area <= max_px
    big = (area > max_px) & (area <= FAT_HOLE_PX)
    if big.any() and faint.any():
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        inside = np.ones(n, bool)
        inside[edge] = False  # background that reaches the border is not a hole
        share = np.bincount(labels[faint.astype(bool)], minlength=n) / np.maximum(area, 1)
        fill |= big & inside & (share >= FAT_SHARE)
    fill[0] = False  # label 0: the mask itself
    return mask | fill.astype(np.uint8)[labels]


def tissue_mask(rgb: np.ndarray, *, min_chroma: float = MIN_CHROMA,
                colours: Literal["stains", "any"] = "stains",
                min_component_px: int = MIN_COMPONENT_PX,
                max_hole_px: int = MAX_HOLE_PX) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB uint8 thumbnail, and the chroma threshold it used.

    1. White balance: each pixel is divided by the glass colour (:func:`glass_colour`, and
       :func:`glass_tint` locally), so that glass is neutral white whatever the scanner and
       what stains add is colour. Chroma (max - min channel) is blind to brightness
       (vignetting, stitching, black) and measures any stain, H&E or IHC.
    2. A pixel is stained when its chroma reaches ``min_chroma`` (raised above the glass's own
       noise), its hue lies on the stain arc and it is neither grey for its darkness (black
       ink, dust, borders, the cover-slip edge) nor black. Faint pixels (3/4 of the chroma, or
       a little darker than glass without a hue, or in a window dense with those: fat) count
       where they touch stained ones. Rim pixels that are mostly glass (chroma under
       EDGE_COVERAGE of their neighbours') drop.
    3. Marker ink: chromatic pixels off the stain arc, and vivid red, in wide strokes, grown
       into the dark ink-coloured pixels they touch (ink over tissue), are never tissue, nor
       is a pixel beside them, nor anything within BLACK_MARGIN of a black or dark-grey area
       (borders, black marker). ``colours="any"`` (special stains with blue or green
       components: trichrome, alcian blue; red chromogens) takes every hue as stain and
       recognises no ink.
    4. Closing, dropping components under ``min_component_px`` (dust) and small dull crumbs
       (debris), closing the network of fat, filling holes up to ``max_hole_px`` (and larger
       ones that are faintly stained: fat lobules).

    The thresholds are the module's constants above; bench/tissue.py measures the mask
    against ground truth, and its cost: ~25 ms for 448x320 px, ~0.2 s for 1792x1280 (the
    thumbnail of a 100k x 80k px 40x slide) on one core.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if colours not in _HUE_FLAGS:
        raise ValueError(f"colours must be one of {sorted(_HUE_FLAGS)}, got {colours!r}")
    hue_flags = _HUE_FLAGS[colours]
    h, w = rgb.shape[:2]
    bg, noise = _glass(rgb)
    # on a noisy thumbnail (little averaging, JPEG) glass itself has chroma: stay above it
    min_chroma = max(min_chroma, NOISE_FACTOR * noise)
    tint, step = glass_tint(rgb, bg)
    stained = np.empty((h, w), np.uint8)
    flags = np.empty((h, w), np.uint8)
    chroma = np.empty((h, w), np.uint8)
    # glass -> 255: one lookup table per channel, or a per-pixel scale where the glass colour
    # varies by more than a rounding step
    flat = float(np.abs(tint - 1).max()) * 255 < 0.5
    lut = np.clip(np.rint(np.arange(256, dtype=np.float32)[:, None] * (255.0 / bg)), 0, 255)
    lut = lut.astype(np.uint8).reshape(256, 1, 3)
    for y in range(0, h, 256):  # float temporaries for one block of rows at a time
        if flat:
            wb = cv2.LUT(rgb[y:y + 256], lut)
        else:
            rows = np.minimum(np.arange(y, min(h, y + 256)) // step, tint.shape[0] - 1)
            scale = cv2.resize(255.0 / (bg * tint[rows]), (w, len(rows)),
                               interpolation=cv2.INTER_NEAREST)
            wb = cv2.multiply(rgb[y:y + 256], scale, dtype=cv2.CV_8U)  # rounds, saturates
        out = _classify(wb, min_chroma, hue_flags)
        stained[y:y + 256], flags[y:y + 256], chroma[y:y + 256] = out
    # seeds: stained components of a few pixels (a lone pixel is noise), grown into the faint
    strong = _drop_small((stained == 2).astype(np.uint8), MIN_SEED_PX)
    faint = (stained > 0).astype(np.uint8)
    # fat: where a share of pixels is a little darker than glass (membranes), away from
    # stained tissue (whose rim this would widen), all of it is faint tissue
    lace = cv2.blur(((flags >> 3) & 1) * np.uint8(255), (7, 7)) >= round(LACE_SHARE * 255)
    faint |= (lace & (cv2.dilate(strong, _disc(2)) == 0)).astype(np.uint8)
    mask = _keep_touching(faint, strong) if strong.any() else strong
    if mask.any():
        # rim pixels (the only ones looked at: uint8 maps, no float copy of the thumbnail)
        rim = np.flatnonzero(mask & (cv2.erode(mask, np.ones((3, 3), np.uint8)) == 0))
        area = cv2.blur(mask * np.uint8(255), (5, 5)).reshape(-1)[rim].astype(np.float32)
        total = cv2.blur(chroma * mask, (5, 5)).reshape(-1)[rim].astype(np.float32)
        mean = total * 255.0 / np.maximum(area, 1)  # of the stained pixels around
        mask.reshape(-1)[rim[chroma.reshape(-1)[rim] < EDGE_COVERAGE * mean]] = 0
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(CLOSE_RADIUS))
    inked = flags & np.uint8(1)
    if mask.any() and inked.any():
        strokes = _drop_small(cv2.morphologyEx(inked, cv2.MORPH_OPEN, _disc(1)), MIN_INK_PX)
        if strokes.any():
            over = _keep_touching(strokes | (flags >> 1) & np.uint8(1), strokes)
            mask &= 1 - cv2.dilate(over, _disc(INK_MARGIN))
    if mask.any():
        # borders and black strokes: their blurred, JPEG-coloured edges are not tissue
        black = _drop_small((flags >> 4) & np.uint8(1), MIN_INK_PX)
        if black.any():
            mask &= 1 - cv2.dilate(black, _disc(BLACK_MARGIN))
        mask = _drop_debris(mask, (flags >> 2) & np.uint8(1), min_component_px)
    if mask.any():
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(LACE_RADIUS))
        if max_hole_px > 0:
            mask = _fill_holes(mask, (stained > 0).astype(np.uint8), max_hole_px)
    return mask.astype(bool), float(min_chroma)


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
