"""A fractional box of a level resampled to a tile grid: the one resampling rule of tiling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import openslide
from PIL import Image

from pipeline.readers.base import Box, Reader
from pipeline.readers.openslide_reader import OpenSlideReader


def integer_factor(box: tuple[float, float, float, float], size: tuple[int, int]) -> int | None:
    """k when ``box`` has integer corners and is exactly k times ``size``; else None."""
    x0, y0, x1, y1 = box
    if any(v != int(v) for v in box):
        return None
    k = (x1 - x0) / size[0]
    if k != int(k) or k < 1 or (y1 - y0) != k * size[1]:
        return None
    return int(k)


def read_resampled(slide: openslide.AbstractSlide | Reader, level: int,
                   box: tuple[float, float, float, float], size: tuple[int, int],
                   resample: Image.Resampling, *, path: str = "",
                   need: Sequence[Box] | None = None, scratch: bool = False) -> np.ndarray:
    """RGB pixels of a fractional ``box`` (x0, y0, x1, y1 in level pixels) resampled to ``size``.

    An integer box exactly k times the output is area-averaged by k (``Image.reduce``: a box
    filter, as pyramid levels are made, ~9x cheaper than a filtered resize and needing no
    margin, so a region decodes only its own pixels). Any other scale gets one ``resample``
    resize from the exact fractional box, which keeps tiles on the physical grid (0.499 ->
    0.5, non-integer pyramid downsamples); a margin around the box feeds the filter real
    neighbours instead of clamped edges, so neighbouring regions agree along their seams.
    ``need`` (level-pixel boxes that matter) lets a reader skip decoding the rest.
    ``scratch``: the result may be a view of the reader's per-thread buffer, overwritten by
    the thread's next scratch read (see :meth:`Reader.read_reduced`).
    """
    # A bare OpenSlide handle has nobody to report damaged tiles to: it raises instead.
    reader: Reader = (OpenSlideReader(slide, path, recover=False)
                            if isinstance(slide, openslide.AbstractSlide) else slide)
    x0, y0, x1, y1 = box
    out_w, out_h = size
    k = integer_factor(box, size)
    if k is not None:
        ix, iy, iw, ih = int(x0), int(y0), int(x1 - x0), int(y1 - y0)
        if reader.can_reduce(level, ix, iy, iw, ih, k):
            return reader.read_reduced(level, ix, iy, iw, ih, k, need, scratch=scratch)
        src = reader.read_rgb(level, ix, iy, iw, ih, need)
        if k == 1:
            return src
        return np.asarray(Image.fromarray(src).reduce(k))
    lw, lh = reader.level_dimensions[level]
    margin = int(math.ceil(max((x1 - x0) / out_w, (y1 - y0) / out_h, 1.0))) + 1
    # Wanted integer box (may poke out of the level by a pixel when the pyramid's downsample
    # is not an integer) and the part of it that exists; the rest is edge-replicated, as a
    # filter would clamp at the border, rather than blended with white.
    wx0, wy0 = int(math.floor(x0)) - margin, int(math.floor(y0)) - margin
    wx1, wy1 = int(math.ceil(x1)) + margin, int(math.ceil(y1)) + margin
    ix0, iy0, ix1, iy1 = max(0, wx0), max(0, wy0), min(lw, wx1), min(lh, wy1)
    if ix1 <= ix0 or iy1 <= iy0:  # entirely outside the level: glass
        return np.full((out_h, out_w, 3), 255, np.uint8)
    wide = None
    if need is not None:
        wide = [(a - margin, b - margin, c + margin, d + margin) for a, b, c, d in need]
    src = reader.read_rgb(level, ix0, iy0, ix1 - ix0, iy1 - iy0, wide)
    pad = ((iy0 - wy0, wy1 - iy1), (ix0 - wx0, wx1 - ix1), (0, 0))
    if any(a or b for a, b in pad):
        src = np.pad(src, pad, mode="edge")
    rel = (x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0)
    img = Image.fromarray(src).resize((out_w, out_h), resample, box=rel)
    return np.asarray(img)
