"""Direct reader of plain-JPEG tiled TIFF pyramids (Aperio SVS, generic tiled TIFF).

Why: OpenSlide decodes every region through its tile cache and hands back premultiplied RGBA
that we convert again; reading the JPEG tiles ourselves (byte ranges from the TIFF directory,
libjpeg-turbo through imagecodecs) skips that work, decodes only the file tiles that hold
kept tissue tiles, and lets several threads decode at once (the decoder releases the GIL).

OpenSlide stays the reader of record: :func:`open_tiff_reader` only returns a reader when
every fact it relies on holds (vendor, one tiled JPEG page per pyramid level with OpenSlide's
geometry, 8-bit RGB/YCbCr, contiguous samples) and when one tile per level decodes to the
pixels OpenSlide returns for it; otherwise it returns the reason and the caller falls back.

Colour: Aperio writes photometric RGB with JPEG streams that carry no JFIF marker and store
RGB components (no colour transform); generic TIFF writers (tifffile, libtiff) store YCbCr
JPEG under photometric YCbCr. Decoding an RGB stream as YCbCr (the libjpeg default without
markers) shifts colours by ~48 levels, hence the explicit colour space and the check.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import imagecodecs
import numpy as np
import openslide
import tifffile
from PIL import Image

log = logging.getLogger(__name__)

VENDORS = frozenset({"aperio", "generic-tiff"})
JPEG = 7  # TIFF compression tag value of "new-style" JPEG (tables + abbreviated tile streams)
# Self-check tolerance against OpenSlide: both sides run libjpeg(-turbo) with the same DCT,
# so pixels are normally identical; allow a different library build's IDCT rounding only.
CHECK_MEAN = 0.5
CHECK_MAX = 8
# Decoded file tiles on region/band seams, kept for the neighbour that needs them next: a row
# of 240 px tiles halved across a 100k px slide is ~18 MB. Oldest first out beyond this.
SEAM_CACHE_BYTES = 24 << 20

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in level pixels


class TiffReadError(Exception):
    """A tile that does not decode (corrupt or truncated file)."""


@dataclass(frozen=True)
class _Level:
    """Tile geometry and byte ranges of the TIFF page holding one pyramid level."""

    page: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    across: int  # tiles per row
    offsets: np.ndarray  # int64 per tile, row-major
    counts: np.ndarray
    tables: bytes | None  # JPEGTables shared by abbreviated tile streams
    colorspace: str | None  # JPEG colour space to decode from; None: the stream's markers


def _level_of(page: tifffile.TiffPage, index: int) -> tuple[_Level | None, str]:
    """The page as a level, or None and why it is not a plain-JPEG tiled RGB page."""
    if not page.is_tiled:
        return None, f"page {index} is not tiled"
    if page.compression != JPEG:
        return None, f"page {index} compression {int(page.compression)} is not JPEG (7)"
    if page.photometric not in (2, 6):
        return None, f"page {index} photometric {int(page.photometric)} is not RGB/YCbCr"
    if (page.samplesperpixel, page.bitspersample, page.planarconfig) != (3, 8, 1):
        return None, f"page {index} is not 8-bit contiguous 3-sample"
    if page.imagedepth != 1 or page.tiledepth != 1:
        return None, f"page {index} is a volume"
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    across = -(-page.imagewidth // page.tilewidth)
    down = -(-page.imagelength // page.tilelength)
    if len(offsets) != across * down or len(counts) != len(offsets):
        return None, f"page {index} has {len(offsets)} tiles, expected {across * down}"
    tables = page.jpegtables or None
    colorspace: str | None = None
    if page.photometric == 6:
        colorspace = "YCBCR"
    else:  # RGB: Aperio's raw-RGB streams carry no JFIF marker; a JFIF stream is YCbCr
        first = int(np.argmax(counts > 0))
        jfif = False
        if counts[first] > 0:
            with open(page.parent.filehandle.path, "rb") as fh:
                fh.seek(int(offsets[first]))
                jfif = b"JFIF" in fh.read(min(int(counts[first]), 64))
        colorspace = None if jfif else "RGB"
    level = _Level(index, int(page.imagewidth), int(page.imagelength), int(page.tilewidth),
                   int(page.tilelength), int(across), offsets, counts, tables, colorspace)
    return level, ""


class TiffJpegReader:
    """Integer boxes of a pyramid level, assembled from directly decoded JPEG tiles.

    Thread-safe: tiles are read with ``os.pread`` on one descriptor, no shared cursor.
    """

    def __init__(self, path: str, levels: Sequence[_Level | None]) -> None:
        self.path = path
        self._levels = list(levels)
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self.tiles_decoded = 0  # for benchmarks: file tiles decoded so far
        self._lock = threading.Lock()
        self._seams: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._seam_bytes = 0

    def has_level(self, level: int) -> bool:
        return 0 <= level < len(self._levels) and self._levels[level] is not None

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(lv.width, lv.height) if lv else (0, 0) for lv in self._levels]

    def _lv(self, level: int) -> _Level:
        lv = self._levels[level]
        if lv is None:
            raise ValueError(f"level {level} is not readable by the TIFF fast path")
        return lv

    def decode_tile(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        """One file tile as (tile_h, tile_w, 3) uint8, or None for a sparse (empty) tile."""
        lv = self._lv(level)
        i = ty * lv.across + tx
        count = int(lv.counts[i])
        if count == 0:
            return None
        if self._fd is None:
            raise ValueError("reader is closed")
        data = os.pread(self._fd, count, int(lv.offsets[i]))
        if len(data) != count:
            raise TiffReadError(f"tile {tx},{ty} of page {lv.page} is truncated "
                                f"({len(data)} of {count} bytes)")
        try:
            tile = imagecodecs.jpeg8_decode(data, tables=lv.tables, colorspace=lv.colorspace,
                                            outcolorspace="RGB")
        except Exception as err:  # noqa: BLE001 - imagecodecs raises its own error types
            raise TiffReadError(f"tile {tx},{ty} of page {lv.page}: "
                                f"{type(err).__name__}: {err}") from None
        self.tiles_decoded += 1
        if tile.ndim != 3 or tile.shape[2] != 3:
            raise TiffReadError(f"tile {tx},{ty} of page {lv.page} decoded to {tile.shape}")
        return tile

    def read_rgb(self, level: int, x: int, y: int, w: int, h: int,
                 need: Sequence[Box] | None = None) -> np.ndarray:
        """RGB of the integer box (x, y, w, h) inside the level.

        ``need``: level-pixel boxes that matter; file tiles touching none of them are not
        decoded and read as white (glass), which is how a region skips its empty tiles.
        Sparse tiles (no bytes) are white too, as OpenSlide's transparent composited on white.
        """
        return self.read_reduced(level, x, y, w, h, 1, need)

    def can_reduce(self, level: int, x: int, y: int, w: int, h: int, k: int) -> bool:
        """Whether :meth:`read_reduced` can area-average this box tile by tile."""
        lv = self._lv(level)
        return all(v % k == 0 for v in (x, y, w, h, lv.tile_w, lv.tile_h))

    def read_reduced(self, level: int, x: int, y: int, w: int, h: int, k: int,
                     need: Sequence[Box] | None = None) -> np.ndarray:
        """The box area-averaged by ``k`` (``Image.reduce``), reduced tile by tile.

        Box and file tiles aligned to k make every k x k block lie inside one tile, so the
        result equals reducing the assembled box, while the full-resolution box (k^2 times
        larger) never exists: less memory traffic and memory.
        """
        lv = self._lv(level)
        if x < 0 or y < 0 or x + w > lv.width or y + h > lv.height or w <= 0 or h <= 0:
            raise ValueError(f"box {x},{y},{w},{h} outside level {level} "
                             f"({lv.width}x{lv.height})")
        if k > 1 and not self.can_reduce(level, x, y, w, h, k):
            raise ValueError(f"box {x},{y},{w},{h} or tiles not aligned to {k}")
        out = np.empty((h // k, w // k, 3), np.uint8)
        tw, th = lv.tile_w, lv.tile_h
        boxes = np.asarray(need, np.float64).reshape(-1, 4) if need is not None else None
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                # tile rectangle clipped to the wanted box, in level pixels
                ax0, ay0 = max(x, tx * tw), max(y, ty * th)
                ax1, ay1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                dst = out[(ay0 - y) // k:(ay1 - y) // k, (ax0 - x) // k:(ax1 - x) // k]
                if boxes is not None and not (
                        (boxes[:, 0] < ax1) & (boxes[:, 2] > ax0)
                        & (boxes[:, 1] < ay1) & (boxes[:, 3] > ay0)).any():
                    dst[:] = 255
                    continue
                inside = ax0 == tx * tw and ay0 == ty * th and ax1 == (tx + 1) * tw \
                    and ay1 == (ty + 1) * th
                tile = self._tile(level, tx, ty, k, seam=not inside)
                if tile is None:
                    dst[:] = 255
                    continue
                dst[:] = tile[(ay0 - ty * th) // k:(ay1 - ty * th) // k,
                              (ax0 - tx * tw) // k:(ax1 - tx * tw) // k]
        return out

    def _tile(self, level: int, tx: int, ty: int, k: int, *, seam: bool) -> np.ndarray | None:
        """A file tile decoded and reduced by k; a seam tile (one a box only partly covers,
        so the neighbouring region or band needs it too) is kept in a small bounded cache."""
        key = (level, tx, ty, k)
        if seam:
            with self._lock:
                hit = self._seams.get(key)
            if hit is not None:
                return hit
        tile = self.decode_tile(level, tx, ty)
        if tile is not None:
            lv = self._lv(level)
            if tile.shape[:2] != (lv.tile_h, lv.tile_w):  # a writer that cropped edge tiles
                raise TiffReadError(f"tile {tx},{ty} of page {lv.page} is {tile.shape}, "
                                    f"expected {lv.tile_h}x{lv.tile_w}")
            if k > 1:
                tile = np.asarray(Image.fromarray(tile).reduce(k))
        if seam and tile is not None:
            with self._lock:
                self._seams[key] = tile
                self._seam_bytes += tile.nbytes
                while self._seam_bytes > SEAM_CACHE_BYTES:
                    self._seam_bytes -= self._seams.popitem(last=False)[1].nbytes
        return tile

    def close(self) -> None:
        """Release the file descriptor; safe to call more than once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TiffJpegReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check(reader: TiffJpegReader, slide: openslide.OpenSlide, level: int) -> str:
    """Empty when a tile near the level's centre decodes to OpenSlide's pixels; else why not."""
    from pipeline.slides import read_rgb  # late: slides imports this module's users

    lv = reader._lv(level)
    down = len(lv.counts) // lv.across
    order = sorted(range(len(lv.counts)), key=lambda i: abs(i // lv.across - down // 2)
                   + abs(i % lv.across - lv.across // 2))
    i = next((j for j in order if lv.counts[j] > 0), None)
    if i is None:
        return ""  # an entirely sparse level reads as glass on both paths
    tx, ty = i % lv.across, i // lv.across
    x, y = tx * lv.tile_w, ty * lv.tile_h
    w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
    ours = reader.read_rgb(level, x, y, w, h).astype(np.int16)
    theirs = read_rgb(slide, level, x, y, w, h).astype(np.int16)
    diff = np.abs(ours - theirs)
    if diff.mean() > CHECK_MEAN or diff.max() > CHECK_MAX:
        return (f"level {level} tile {tx},{ty} decodes differently from OpenSlide "
                f"(mean abs diff {diff.mean():.2f}, max {int(diff.max())}; colour space "
                f"{lv.colorspace or 'from markers'})")
    return ""


def open_tiff_reader(path: str, slide: openslide.OpenSlide,
                     levels: Sequence[int]) -> tuple[TiffJpegReader | None, str]:
    """A fast reader for ``levels`` of an OpenSlide-opened slide, or (None, why not)."""
    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR)
    if vendor not in VENDORS:
        return None, f"vendor {vendor!r} is not a plain tiled TIFF"
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # noqa: BLE001 - any parse failure means "not for us"
        return None, f"tifffile cannot parse it ({type(err).__name__}: {err})"
    try:
        pages = list(tif.pages)  # main IFD chain only, as OpenSlide's TIFF drivers
        found: list[_Level | None] = [None] * slide.level_count
        for level in levels:
            dims = tuple(slide.level_dimensions[level])
            match = [i for i, p in enumerate(pages)
                     if p.is_tiled and (p.imagewidth, p.imagelength) == dims]
            if len(match) != 1:
                return None, f"level {level} {dims}: {len(match)} tiled pages of that size"
            lv, why = _level_of(pages[match[0]], match[0])
            if lv is None:
                return None, why
            found[level] = lv
    finally:
        tif.close()
    reader = TiffJpegReader(path, found)
    try:
        for level in levels:
            why = _check(reader, slide, level)
            if why:
                reader.close()
                return None, why
    except Exception as err:  # noqa: BLE001 - a tile we cannot decode: let OpenSlide judge
        reader.close()
        return None, f"self-check failed ({type(err).__name__}: {err})"
    return reader, ""
