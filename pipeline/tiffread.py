"""Direct reader of plain-JPEG tiled TIFF pyramids (Aperio SVS, generic tiled TIFF).

Why: OpenSlide decodes every region through its tile cache and hands back premultiplied RGBA
that we convert again; reading the JPEG tiles ourselves (byte ranges from the TIFF directory,
libjpeg-turbo through imagecodecs) skips that work, decodes only the file tiles that hold
kept tissue tiles, and lets several threads decode at once (the decoder releases the GIL).

OpenSlide stays the reader of record: :func:`open_tiff_reader` only returns a reader when
every fact it relies on holds (vendor, one tiled JPEG page per pyramid level with OpenSlide's
geometry, 8-bit RGB/YCbCr, contiguous samples) and when one tile per level decodes to the
pixels OpenSlide returns for it; otherwise it returns the reason and the caller falls back.

Halving 40x tiles (0.25 -> 0.5 um/px) is done by default inside libjpeg-turbo's inverse DCT
(``dct_downscale``: 2x, 4x or 8x reduced-size decoding, through simplejpeg): the decoder skips
the high-frequency coefficients and the colour conversion of pixels that would be averaged
away, about twice as fast as a full decode followed by a 2x2 box average. It is a low-pass
too, but not the same one: against the box average it differs by ~1 level on average and up
to ~45 at sharp edges (tests/test_tiffread.py bounds it). ``dct_downscale=False`` restores
the exact box filter, bit-identical to the OpenSlide path.

Colour: Aperio writes photometric RGB with JPEG streams that carry no JFIF marker and store
RGB components (no colour transform); generic TIFF writers (tifffile, libtiff) store YCbCr
JPEG under photometric YCbCr. Decoding an RGB stream as YCbCr (the libjpeg default without
markers) shifts colours by ~48 levels, hence the explicit colour space and the check.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import imagecodecs
import numpy as np
import openslide
import simplejpeg
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
# Reduction factors libjpeg-turbo's scaled IDCT delivers exactly (1/2, 1/4, 1/8).
DCT_FACTORS = (2, 4, 8)
# Reduced-size decoding against decode + box average: ~1.3 mean abs diff on H&E; a colour
# space mistake is ~48. Beyond this the reader keeps the box filter.
DCT_CHECK_MEAN = 4.0
# Markers that pin the colour space for decoders that infer it from the stream: Adobe APP14
# with transform 0 (components are R, G, B) and a JFIF APP0 (components are Y, Cb, Cr).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"

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
    # SOI + colour-space marker + tables: prefixed to a tile stream (minus its SOI) it makes a
    # self-contained JPEG for decoders without a tables/colour-space API; None: not possible.
    header: bytes | None


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
    first = int(np.argmax(counts > 0))
    jfif = False
    if counts[first] > 0:
        with open(page.parent.filehandle.path, "rb") as fh:
            fh.seek(int(offsets[first]))
            jfif = b"JFIF" in fh.read(min(int(counts[first]), 64))
    colorspace: str | None = None
    if page.photometric == 6:
        colorspace = "YCBCR"
    elif not jfif:  # Aperio's raw-RGB streams carry no JFIF marker; a JFIF stream is YCbCr
        colorspace = "RGB"
    marker = {"RGB": _ADOBE_RGB, "YCBCR": b"" if jfif else _JFIF}.get(colorspace or "", b"")
    header: bytes | None = b"\xff\xd8" + marker
    if tables:
        ok = tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")
        header = header + tables[2:-2] if ok else None
    level = _Level(index, int(page.imagewidth), int(page.imagelength), int(page.tilewidth),
                   int(page.tilelength), int(across), offsets, counts, tables, colorspace,
                   header)
    return level, ""


class TiffJpegReader:
    """Integer boxes of a pyramid level, assembled from directly decoded JPEG tiles.

    Thread-safe: tiles are read with ``os.pread`` on one descriptor, no shared cursor.
    """

    def __init__(self, path: str, levels: Sequence[_Level | None], *,
                 dct_downscale: bool = False) -> None:
        self.path = path
        self.dct_downscale = dct_downscale  # reduce by 2/4/8 inside the IDCT (see module doc)
        self._levels = list(levels)
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self.tiles_decoded = 0  # for benchmarks: file tiles decoded so far
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread scratch region buffer
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

    def decode_tile(self, level: int, tx: int, ty: int, scale: int = 1) -> np.ndarray | None:
        """One file tile as (tile_h, tile_w, 3) uint8, or None for a sparse (empty) tile.

        ``scale`` 2, 4 or 8: reduced-size decoding by libjpeg-turbo's scaled IDCT, an array
        ``scale`` times smaller per side (needs a level ``header``; see :meth:`dct_ok`).
        """
        lv = self._lv(level)
        if scale != 1 and (lv.header is None or scale not in DCT_FACTORS):
            raise ValueError(f"no reduced-size decoding by {scale} for page {lv.page}")
        data = self._fetch(lv, ty, [tx])[0]
        return None if data is None else self._decode(lv, data, tx, ty, scale)

    def dct_ok(self, level: int, k: int) -> bool:
        """Whether a box reduced by k may come straight out of the scaled IDCT."""
        lv = self._lv(level)
        return (self.dct_downscale and k in DCT_FACTORS and lv.header is not None
                and lv.tile_w % k == 0 and lv.tile_h % k == 0)

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
                     need: Sequence[Box] | None = None, *, scratch: bool = False) -> np.ndarray:
        """The box area-averaged by ``k`` (``Image.reduce``), reduced tile by tile.

        ``scratch``: return a view of this thread's reusable buffer, valid until the thread's
        next scratch read (tiling copies tiles out at once). A fresh region array per read
        costs a page fault per 4 KB, ~10% of the time at 40x, and faults contend across
        threads.

        Box and file tiles aligned to k make every k x k block lie inside one tile, so the
        result equals reducing the assembled box, while the full-resolution box (k^2 times
        larger) never exists: less memory traffic and memory.

        The loop is lean on purpose: with several threads, every line of Python between two
        decodes holds the GIL while the other threads want it back, and each such wait costs
        a context switch. So each row of file tiles is read with one ``pread``, tiles decode
        into a per-thread buffer, and the geometry is worked out once per row and column.
        """
        lv = self._lv(level)
        if x < 0 or y < 0 or x + w > lv.width or y + h > lv.height or w <= 0 or h <= 0:
            raise ValueError(f"box {x},{y},{w},{h} outside level {level} "
                             f"({lv.width}x{lv.height})")
        if k > 1 and not self.can_reduce(level, x, y, w, h, k):
            raise ValueError(f"box {x},{y},{w},{h} or tiles not aligned to {k}")
        if self._fd is None:
            raise ValueError("reader is closed")
        shape = (h // k, w // k, 3)
        out = self._scratch("region", shape) if scratch else np.empty(shape, np.uint8)
        cols = _spans(x, w, lv.tile_w, k)
        rows = _spans(y, h, lv.tile_h, k)
        wanted = _wanted(need, x, y, w, h, lv.tile_w, lv.tile_h)
        step = k if k > 1 and self.dct_ok(level, k) else 1  # reduction inside the IDCT
        tile_buf = self._scratch("tile", (lv.tile_h // step, lv.tile_w // step, 3))
        seams, lock = self._seams, self._lock
        for ri, (ty, sy0, sy1, dy0, dy1, row_whole) in enumerate(rows):
            row_wanted = None if wanted is None else wanted[ri].tolist()
            todo = []  # (column span, seam cache key) of the tiles this row must decode
            for ci, col in enumerate(cols):
                tx, sx0, sx1, dx0, dx1, col_whole = col
                if row_wanted is not None and not row_wanted[ci]:
                    out[dy0:dy1, dx0:dx1] = 255
                    continue
                key = None if row_whole and col_whole else (level, tx, ty, k)
                if key is not None:
                    with lock:
                        hit = seams.get(key)
                    if hit is not None:
                        out[dy0:dy1, dx0:dx1] = hit[sy0:sy1, sx0:sx1]
                        continue
                todo.append((col, key))
            if not todo:
                continue
            found = self._fetch(lv, ty, [col[0] for col, _ in todo])
            for (col, key), data in zip(todo, found, strict=True):
                tx, sx0, sx1, dx0, dx1, _ = col
                if data is None:  # sparse tile: glass
                    out[dy0:dy1, dx0:dx1] = 255
                    continue
                # a seam tile outlives this read (it is cached): it gets its own array
                tile = self._decode(lv, data, tx, ty, step, tile_buf if key is None else None)
                if step != k:
                    tile = np.asarray(Image.fromarray(tile).reduce(k // step))
                out[dy0:dy1, dx0:dx1] = tile[sy0:sy1, sx0:sx1]
                if key is not None:
                    self._keep_seam(key, tile)
        return out

    def _scratch(self, name: str, shape: tuple[int, int, int]) -> np.ndarray:
        """This thread's reusable uint8 buffer ``name``, viewed as ``shape``."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        nbytes = shape[0] * shape[1] * shape[2]
        buf = bufs.get(name)
        if buf is None or buf.size < nbytes:
            buf = bufs[name] = np.empty(nbytes, np.uint8)
        return buf[:nbytes].reshape(shape)

    def _fetch(self, lv: _Level, ty: int, txs: list[int]) -> list[memoryview | None]:
        """The compressed bytes of file tiles (tx, ty) of one row (``txs`` ascending), None
        for sparse ones.

        Tiles stored back to back (as scanners write a row) come in one ``pread``; a row whose
        tiles lie far apart in the file falls back to one read per tile.
        """
        if self._fd is None:
            raise ValueError("reader is closed")
        first = ty * lv.across + txs[0]
        offs_row = lv.offsets[first:first + txs[-1] - txs[0] + 1].tolist()
        counts_row = lv.counts[first:first + txs[-1] - txs[0] + 1].tolist()
        offs = [offs_row[tx - txs[0]] for tx in txs]
        counts = [counts_row[tx - txs[0]] for tx in txs]
        filled = [(o, c) for o, c in zip(offs, counts, strict=True) if c > 0]
        if not filled:
            return [None] * len(txs)
        lo, hi = min(o for o, _ in filled), max(o + c for o, c in filled)
        spans = [(lo, hi)]
        if hi - lo > 2 * sum(c for _, c in filled) + (64 << 10):  # far apart: read each
            spans = sorted((o, o + c) for o, c in filled)
        # Into this thread's reusable buffer: a fresh 0.5 MB bytes object per row would be
        # page-faulted in and trimmed away again every time, and page faults of threads of
        # one process contend in the kernel.
        starts, blobs = [], []
        buf = memoryview(self._scratch("bytes", (sum(b - a for a, b in spans), 1, 1)).reshape(-1))
        at = 0
        for a, b in spans:
            view = buf[at:at + b - a]
            got = os.preadv(self._fd, [view], a)
            if got != b - a:
                raise TiffReadError(f"row {ty} of page {lv.page} is truncated: read "
                                    f"{got} of {b - a} bytes at offset {a}")
            starts.append(a)
            blobs.append(view)
            at += b - a
        found: list[memoryview | None] = []
        for o, c in zip(offs, counts, strict=True):
            if c == 0:
                found.append(None)
                continue
            j = bisect.bisect_right(starts, o) - 1
            found.append(blobs[j][o - starts[j]:o - starts[j] + c])
        return found

    def _decode(self, lv: _Level, data: bytes | memoryview, tx: int, ty: int, scale: int,
                out: np.ndarray | None = None) -> np.ndarray:
        """One file tile's stream decoded (reduced by ``scale`` in the IDCT), into ``out``."""
        shape = (lv.tile_h // scale, lv.tile_w // scale, 3)
        try:
            if scale == 1:
                tile = imagecodecs.jpeg8_decode(data, tables=lv.tables, colorspace=lv.colorspace,
                                                outcolorspace="RGB", out=out)
            else:
                assert lv.header is not None
                tile = simplejpeg.decode_jpeg(lv.header + data[2:], colorspace="RGB",
                                              min_height=shape[0], min_width=shape[1],
                                              min_factor=scale, buffer=out)
        except Exception as err:  # noqa: BLE001 - imagecodecs raises its own error types
            raise TiffReadError(f"tile {tx},{ty} of page {lv.page}: "
                                f"{type(err).__name__}: {err}") from None
        self.tiles_decoded += 1
        if tile.shape != shape:  # a writer that cropped edge tiles, or a grey stream
            raise TiffReadError(f"tile {tx},{ty} of page {lv.page} decoded to {tile.shape}, "
                                f"expected {shape}")
        return tile

    def _keep_seam(self, key: tuple[int, int, int, int], tile: np.ndarray) -> None:
        """Cache a seam tile (one a box only partly covers: the neighbouring region or band
        needs it too) in a small bounded cache, oldest out first."""
        with self._lock:
            self._seams[key] = tile
            self._seam_bytes += tile.nbytes
            while self._seam_bytes > SEAM_CACHE_BYTES:
                self._seam_bytes -= self._seams.popitem(last=False)[1].nbytes

    def clear_seams(self) -> None:
        """Drop cached seam tiles (after the thumbnail: its level's tiles are not needed again)."""
        with self._lock:
            self._seams.clear()
            self._seam_bytes = 0

    def close(self) -> None:
        """Release the file descriptor; safe to call more than once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TiffJpegReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wanted(need: Sequence[Box] | None, x: int, y: int, w: int, h: int, tw: int,
            th: int) -> np.ndarray | None:
    """(rows, cols) of the file tiles under the box that some ``need`` box overlaps.

    One vectorised test per region instead of one per file tile: the per-tile Python work is
    what holds the GIL while other threads decode.
    """
    if need is None:
        return None
    boxes = np.asarray(need, np.float64).reshape(-1, 4)
    cols = np.arange(x // tw, (x + w - 1) // tw + 1)
    rows = np.arange(y // th, (y + h - 1) // th + 1)
    # each file tile clipped to the box, as the read loop clips it
    cx0, cx1 = np.maximum(x, cols * tw), np.minimum(x + w, (cols + 1) * tw)
    ry0, ry1 = np.maximum(y, rows * th), np.minimum(y + h, (rows + 1) * th)
    in_col = (boxes[:, 0:1] < cx1) & (boxes[:, 2:3] > cx0)  # (boxes, cols)
    in_row = (boxes[:, 1:2] < ry1) & (boxes[:, 3:4] > ry0)  # (boxes, rows)
    return (in_row.T.astype(np.int32) @ in_col.astype(np.int32)) > 0


def _spans(x: int, w: int, t: int, k: int) -> list[tuple[int, int, int, int, int, bool]]:
    """The file tiles a box [x, x + w) crosses along one axis, tiles ``t`` wide:
    (tile, first and end pixel inside the tile, first and end pixel in the box, whether the
    box covers the whole tile), pixels reduced by ``k``."""
    spans = []
    for i in range(x // t, (x + w - 1) // t + 1):
        a0, a1 = max(x, i * t), min(x + w, (i + 1) * t)
        spans.append((i, (a0 - i * t) // k, (a1 - i * t) // k, (a0 - x) // k, (a1 - x) // k,
                      a0 == i * t and a1 == (i + 1) * t))
    return spans


def _check_tile(reader: TiffJpegReader, level: int) -> tuple[int, int] | None:
    """The non-empty file tile nearest the level's centre (tissue, not glass, most likely)."""
    lv = reader._lv(level)
    filled = np.nonzero(lv.counts > 0)[0]
    if not len(filled):
        return None
    down = len(lv.counts) // lv.across
    rows, cols = filled // lv.across, filled % lv.across
    i = int(filled[np.argmin(np.abs(rows - down // 2) + np.abs(cols - lv.across // 2))])
    return i % lv.across, i // lv.across


def _check(reader: TiffJpegReader, slide: openslide.OpenSlide, level: int) -> str:
    """Empty when a tile near the level's centre decodes to OpenSlide's pixels; else why not."""
    from pipeline.slides import read_rgb  # late: slides imports this module's users

    lv = reader._lv(level)
    where = _check_tile(reader, level)
    if where is None:
        return ""  # an entirely sparse level reads as glass on both paths
    tx, ty = where
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


def _check_dct(reader: TiffJpegReader, level: int, k: int) -> str:
    """Empty when reduced-size decoding of the check tile matches decode + box average."""
    where = _check_tile(reader, level)
    if where is None:
        return ""
    full = reader.decode_tile(level, *where)
    scaled = reader.decode_tile(level, *where, scale=k)
    assert full is not None and scaled is not None
    box = np.asarray(Image.fromarray(full).reduce(k)).astype(np.int16)
    diff = float(np.abs(scaled.astype(np.int16) - box).mean())
    if diff > DCT_CHECK_MEAN:
        return (f"reduced-size decoding of level {level} differs from the box average "
                f"(mean abs diff {diff:.2f})")
    return ""


def open_tiff_reader(path: str, slide: openslide.OpenSlide, levels: Sequence[int], *,
                     dct_factor: int = 1) -> tuple[TiffJpegReader | None, str]:
    """A fast reader for ``levels`` of an OpenSlide-opened slide, or (None, why not).

    ``dct_factor`` > 1: the caller reduces ``levels[0]`` by that factor and allows
    reduced-size decoding; the reader uses it only if it verifies (else the exact box filter).
    """
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
    if dct_factor > 1:
        reader.dct_downscale = True
        try:
            why = (_check_dct(reader, levels[0], dct_factor)
                   if reader.dct_ok(levels[0], dct_factor) else "tiles not aligned")
        except Exception as err:  # noqa: BLE001 - e.g. a stream simplejpeg rejects
            why = f"{type(err).__name__}: {err}"
        if why:
            reader.dct_downscale = False
            log.info("box-averaging, not reduced-size decoding, for %s: %s", path, why)
    return reader, ""
