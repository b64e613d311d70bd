"""Direct reader of plain-JPEG tiled TIFF pyramids (Aperio SVS, generic tiled TIFF).

Why: OpenSlide decodes every region through its tile cache and hands back premultiplied RGBA
that we convert again; reading the JPEG tiles ourselves (byte ranges from the TIFF directory,
libjpeg-turbo through simplejpeg) skips that work, decodes only the file tiles that hold
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
to ~45 at sharp edges (tests/test_readers_tiff.py bounds it). ``dct_downscale=False`` restores
the exact box filter, bit-identical to the OpenSlide path.

Decoder calls: tiles that share one header (tables, frame, scan) are decoded a run at a time
as one tall JPEG, each tile's entropy-coded data after a restart marker (see
``TiffJpegReader._stack_info``): one GIL release per run instead of per tile, which is what
lets threads scale. Each level verifies on a few tiles that this gives exactly the pixels of
decoding tile by tile, and decodes tile by tile otherwise.

Damaged tiles: every decoder call treats a libjpeg warning as an error (simplejpeg's
``strict``; imagecodecs' decoder, used before, let warnings pass and returned what it had, a
grey or garbled tile). A file tile that does not decode cleanly is delivered as white and
recorded in :attr:`TiffJpegReader.damage` with the decoder's complaint; tiling flags the tiles
over it and fails the slide past ``tiling.max_damaged_fraction``. Clean tiles pay nothing
for this: the warning check is inside the decoder call, and a run of tiles decoded as one
stream (below) is decoded again tile by tile only when that stream fails. Corruption that
still decodes as a valid stream without a warning (random bytes that happen to form valid
Huffman codes of the right total length) cannot be told from tissue: TIFF keeps no checksum.

Colour: Aperio writes photometric RGB with JPEG streams that carry no JFIF marker and store
RGB components (no colour transform); generic TIFF writers (tifffile, libtiff) store YCbCr
JPEG under photometric YCbCr. Decoding an RGB stream as YCbCr (the libjpeg default without
markers) shifts colours by ~48 levels, hence the explicit colour space and the check.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import openslide
import simplejpeg
import tifffile
from PIL import Image

from pipeline.readers.base import Box, ByteSource, Reader, ReadError
from pipeline.readers.openslide_reader import read_rgb

if TYPE_CHECKING:
    from pipeline.geometry import ReadGeometry
    from pipeline.tissue import TileGrid

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
# Self-checks use tiles that decode cleanly: at most this many, nearest the level's centre
# first, are tried before the level is declared unreadable by the fast path.
CHECK_TRIES = 32
CHECK_TILES = 4  # tiles kept per level: the stacking check decodes four
# Markers that pin the colour space for decoders that infer it from the stream: Adobe APP14
# with transform 0 (components are R, G, B) and a JFIF APP0 (components are Y, Cb, Cr).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"

# Decoded bytes per stacked decoder call (see TiffJpegReader._stack_info): big enough that
# the GIL is taken once per row of file tiles, small enough to stay in cache.
STACK_BYTES = 4 << 20
_RST = [bytes([0xFF, 0xD0 + i]) for i in range(8)]  # restart markers, in turn
_EOI = b"\xff\xd9"
# Frame markers other than baseline/extended Huffman (progressive, lossless, arithmetic).
_OTHER_FRAMES = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})



class TiffReadError(ReadError):
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
    # self-contained JPEG, which is how every tile is decoded.
    header: bytes


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
    header = b"\xff\xd8" + marker
    if tables:
        if not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
            return None, f"page {index} JPEGTables are not SOI ... EOI"
        header = header + tables[2:-2]
    level = _Level(index, int(page.imagewidth), int(page.imagelength), int(page.tilewidth),
                   int(page.tilelength), int(across), offsets, counts, tables, colorspace,
                   header)
    return level, ""


@dataclass(frozen=True)
class _Stack:
    """What stacking a level's tiles into one tall JPEG needs (see ``_stack_info``)."""

    head: bytes  # a tile's bytes up to its entropy-coded data: SOI .. SOS
    before_height: bytes  # the tall stream's header up to the frame height ...
    after_height: bytes  # ... and after it, with a restart interval of one tile
    tile_h: int
    most: int  # tiles per decoder call

    @property
    def head_len(self) -> int:
        return len(self.head)

    def fits(self, data: memoryview) -> bool:
        """Whether a tile has the shared header and ends with EOI, so it can be stacked."""
        return data[:len(self.head)] == self.head and data[-2:] == _EOI

    def header(self, n: int) -> bytes:
        return self.before_height + (n * self.tile_h).to_bytes(2, "big") + self.after_height


def _segments(stream: bytes) -> list[tuple[int, int]] | None:
    """(marker, offset) of each segment from after SOI through SOS; None if malformed."""
    out, i = [], 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        out.append((marker, i))
        if marker == 0xDA:
            return out
        i += 2 + int.from_bytes(stream[i + 2:i + 4], "big")
    return None


@dataclass(frozen=True)
class _Clean:
    """File tiles of a level for the self-checks: ones that decode cleanly, nearest the
    centre first, and what was wrong with the damaged ones tried before them."""

    clean: list[tuple[int, int]]
    filled: int  # non-empty file tiles in the level
    damaged: list[str]


class TiffJpegReader(Reader):
    """Integer boxes of a pyramid level, assembled from directly decoded JPEG tiles.

    Thread-safe: tiles are read with ``os.pread`` on one descriptor, no shared cursor.
    """

    name = "tiff"

    def __init__(self, path: str, levels: Sequence[_Level | None], *,
                 dct_downscale: bool = False) -> None:
        super().__init__()
        self.path = path
        self.dct_downscale = dct_downscale  # reduce by 2/4/8 inside the IDCT (see module doc)
        self._levels = list(levels)
        self._fd: int | None = os.open(path, os.O_RDONLY)
        # Tile bytes from elsewhere (ranged GETs of a remote slide), or None: pread of path.
        self._source: ByteSource | None = None
        self.tiles_decoded = 0  # for benchmarks: file tiles decoded so far
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread scratch region buffer
        self._seams: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._seam_bytes = 0
        self.seam_budget = SEAM_CACHE_BYTES  # lowered to what the slide needs by prepare()
        self._stacks: dict[tuple[int, int], _Stack | None] = {}  # see _stack_info
        self._clean: dict[int, _Clean] = {}  # see _clean_tiles
        # Why reduced-size decoding was asked for but is not used ("": used or not asked).
        self.dct_note = ""

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
        ``scale`` times smaller per side (see :meth:`dct_ok`). Strict: a damaged tile raises
        TiffReadError (region reads deliver it white instead, see :attr:`damage`).
        """
        lv = self._lv(level)
        if scale != 1 and scale not in DCT_FACTORS:
            raise ValueError(f"no reduced-size decoding by {scale} for page {lv.page}")
        data = self._fetch(lv, ty, [tx])[0]
        return None if data is None else self._decode(lv, data, tx, ty, scale)

    def tile_shape(self, level: int) -> tuple[int, int]:
        """(width, height) of the level's file tiles."""
        lv = self._lv(level)
        return lv.tile_w, lv.tile_h

    def dct_ok(self, level: int, k: int) -> bool:
        """Whether a box reduced by k may come straight out of the scaled IDCT."""
        lv = self._lv(level)
        return (self.dct_downscale and k in DCT_FACTORS
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

        Work goes row of file tiles by row: one ``pread`` for the row, one decoder call for
        a run of tiles (see :meth:`_stack_info`), one numpy call to place the row. With
        several threads, every Python step between two GIL-free calls is a moment the other
        threads may have to wait for the GIL, so the steps are counted per row, not per tile.
        """
        lv = self._lv(level)
        if x < 0 or y < 0 or x + w > lv.width or y + h > lv.height or w <= 0 or h <= 0:
            raise ValueError(f"box {x},{y},{w},{h} outside level {level} "
                             f"({lv.width}x{lv.height})")
        if k > 1 and not self.can_reduce(level, x, y, w, h, k):
            raise ValueError(f"box {x},{y},{w},{h} or tiles not aligned to {k}")
        if self._fd is None:
            raise ValueError("reader is closed")
        tw, th = lv.tile_w, lv.tile_h
        tx0, ty0 = x // tw, y // th
        tx1, ty1 = (x + w - 1) // tw + 1, (y + h - 1) // th + 1
        rw, rh = tw // k, th // k  # a file tile, reduced
        # Whole file tiles are placed; the box is a view into them.
        shape = ((ty1 - ty0) * rh, (tx1 - tx0) * rw, 3)
        full = self._scratch("region", shape) if scratch else np.empty(shape, np.uint8)
        grid = full.reshape(ty1 - ty0, rh, tx1 - tx0, rw, 3)
        wanted = _wanted(need, x, y, w, h, tw, th)
        step = k if k > 1 and self.dct_ok(level, k) else 1  # reduction inside the IDCT
        stack = self._stack_info(level, step)
        seams, lock = self._seams, self._lock
        col_whole = [x <= tx * tw and (tx + 1) * tw <= x + w for tx in range(tx0, tx1)]
        for ty in range(ty0, ty1):
            ri = ty - ty0
            row_whole = y <= ty * th and (ty + 1) * th <= y + h
            row_wanted = None if wanted is None else wanted[ri].tolist()
            glass: list[int] = []  # column slots read as white
            hits: list[tuple[int, np.ndarray]] = []  # seam tiles already decoded
            todo: list[int] = []  # file tile columns to decode
            for ci in range(tx1 - tx0):
                if row_wanted is not None and not row_wanted[ci]:
                    glass.append(ci)
                    continue
                if not (row_whole and col_whole[ci]):
                    with lock:
                        hit = seams.get((level, tx0 + ci, ty, k))
                    if hit is not None:
                        hits.append((ci, hit))
                        continue
                todo.append(ci)
            found = self._fetch(lv, ty, [tx0 + ci for ci in todo]) if todo else []
            datas = [d for d in found if d is not None]
            cis = [ci for ci, d in zip(todo, found, strict=True) if d is not None]
            glass += [ci for ci, d in zip(todo, found, strict=True) if d is None]  # sparse
            if glass:
                grid[ri, :, glass] = 255
            if len(hits) == 1:
                grid[ri, :, hits[0][0]] = hits[0][1]
            elif hits:
                grid[ri, :, [ci for ci, _ in hits]] = np.stack([t for _, t in hits])
            if not datas:
                continue
            tiles = self._scratch("tiles", (len(datas), rh, rw, 3))
            if step == k:
                self._decode_row(lv, level, datas, [tx0 + ci for ci in cis], ty, step, stack,
                                 tiles)
            else:  # exact box filter: full decode, then Image.reduce
                for i, (ci, data) in enumerate(zip(cis, datas, strict=True)):
                    tile = self._decode_or_glass(lv, level, data, tx0 + ci, ty, 1)
                    tiles[i] = np.asarray(Image.fromarray(tile).reduce(k))
            grid[ri, :, cis] = tiles
            seam = [i for i, ci in enumerate(cis) if not (row_whole and col_whole[ci])]
            if seam:  # partly covered: the neighbouring region or band needs them too
                kept = tiles[seam]
                self._keep_seams([((level, tx0 + cis[i], ty, k), kept[j])
                                  for j, i in enumerate(seam)])
        oy, ox = (y - ty0 * th) // k, (x - tx0 * tw) // k
        out = full[oy:oy + h // k, ox:ox + w // k]
        return out if scratch or out.shape == full.shape else np.ascontiguousarray(out)

    def _decode_row(self, lv: _Level, level: int, datas: list[memoryview], txs: list[int],
                    ty: int, step: int, stack: _Stack | None, out: np.ndarray) -> None:
        """Decode file tiles into ``out`` (n, h, w, 3): runs of tiles whose headers match
        the level's in one stacked decoder call each, any other tile on its own; a tile that
        does not decode cleanly comes out white and goes to :attr:`damage`."""
        n = len(datas)
        i = 0
        while i < n:
            j = i
            if stack is not None:
                while j < n and j - i < stack.most and stack.fits(datas[j]):
                    j += 1
            if j - i >= 2:
                try:
                    self._decode_stack(lv, datas[i:j], step, stack, out[i:j])
                except TiffReadError:  # a damaged tile in the run: find it, name it
                    for m in range(i, j):
                        self._decode_or_glass(lv, level, datas[m], txs[m], ty, step, out[m])
                i = j
                continue
            self._decode_or_glass(lv, level, datas[i], txs[i], ty, step, out[i])
            i += 1

    def _decode_stack(self, lv: _Level, datas: list[memoryview], step: int, stack: _Stack,
                      out: np.ndarray) -> None:
        n = len(datas)
        parts: list[bytes | memoryview] = [stack.header(n)]
        for m, data in enumerate(datas):
            parts.append(data[stack.head_len:-2])  # entropy-coded data, EOI dropped
            if m < n - 1:
                parts.append(_RST[m % 8])
        parts.append(b"\xff\xd9")
        rh, rw = lv.tile_h // step, lv.tile_w // step
        try:
            img = simplejpeg.decode_jpeg(b"".join(parts), colorspace="RGB",
                                         min_height=n * rh, min_width=rw, min_factor=step,
                                         buffer=out, strict=True)
        except Exception as err:  # noqa: BLE001 - whichever tile it is, the caller finds it
            raise TiffReadError(f"stacked decode: {type(err).__name__}: {err}") from None
        if img.shape != (n * rh, rw, 3):
            raise TiffReadError(f"stacked decode gave {img.shape}, expected {(n * rh, rw, 3)}")
        self.tiles_decoded += n

    def _stack_info(self, level: int, step: int) -> _Stack | None:
        """How to stack this level's tiles for one decoder call, or None when it must not.

        Tiles sharing one header (tables, frame, scan) can be decoded as one tall JPEG: the
        frame height becomes n tiles, each tile's entropy-coded data follows the previous
        one after a restart marker, and a restart interval of one tile's MCUs resets the DC
        predictors where a tile would start afresh. One GIL release then decodes n tiles.
        Only used when decoding a few tiles that way gives exactly the pixels of decoding
        them one by one (with 4:2:0 chroma at full size, upsampling blends across tile
        edges; at reduced size libjpeg-turbo needs no upsampling and the pixels agree).
        """
        key = (level, step)
        with self._lock:
            if key in self._stacks:
                return self._stacks[key]
        info = self._build_stack(level, step)
        with self._lock:
            self._stacks[key] = info
        return info

    def _scratch(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """This thread's reusable uint8 buffer ``name``, viewed as ``shape``."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        nbytes = math.prod(shape)
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
        if self._source is not None:
            return self._source.get(offs, counts)
        lo, hi = min(o for o, _ in filled), max(o + c for o, c in filled)
        spans = [(lo, hi)]
        if hi - lo > 2 * sum(c for _, c in filled) + (64 << 10):  # far apart: read each
            spans = sorted((o, o + c) for o, c in filled)
        # Into this thread's reusable buffer: a fresh 0.5 MB bytes object per row would be
        # page-faulted in and trimmed away again every time, and page faults of threads of
        # one process contend in the kernel.
        starts = [a for a, _ in spans]
        blobs = self._pread_spans(spans, f"row {ty} of page {lv.page}")
        found: list[memoryview | None] = []
        for o, c in zip(offs, counts, strict=True):
            if c == 0:
                found.append(None)
                continue
            j = bisect.bisect_right(starts, o) - 1
            found.append(blobs[j][o - starts[j]:o - starts[j] + c])
        return found

    def _pread_spans(self, spans: list[tuple[int, int]], what: str) -> list[memoryview]:
        """Each [a, b) byte span of the file, one ``preadv`` each, into this thread's
        reusable byte buffer (valid until the thread's next fetch)."""
        if self._fd is None:
            raise ValueError("reader is closed")
        buf = memoryview(self._scratch("bytes", (sum(b - a for a, b in spans),)))
        views, at = [], 0
        for a, b in spans:
            view = buf[at:at + b - a]
            got = os.preadv(self._fd, [view], a)
            if got != b - a:
                raise TiffReadError(f"{what}: the file is truncated, read {got} of {b - a} "
                                    f"bytes at offset {a}")
            views.append(view)
            at += b - a
        return views

    def _decode(self, lv: _Level, data: bytes | memoryview, tx: int, ty: int, scale: int,
                out: np.ndarray | None = None) -> np.ndarray:
        """One file tile's stream decoded (reduced by ``scale`` in the IDCT), into ``out``.

        Strict: a libjpeg warning (corrupt data, premature end, extraneous bytes) raises
        TiffReadError like an error does, at full size as at reduced size.
        """
        shape = (lv.tile_h // scale, lv.tile_w // scale, 3)
        try:
            tile = simplejpeg.decode_jpeg(lv.header + data[2:], colorspace="RGB",
                                          min_height=shape[0], min_width=shape[1],
                                          min_factor=scale, buffer=out, strict=True)
        except Exception as err:  # noqa: BLE001 - simplejpeg raises ValueError and others
            raise TiffReadError(f"tile {tx},{ty} of page {lv.page}: "
                                f"{type(err).__name__}: {err}") from None
        self.tiles_decoded += 1
        if tile.shape != shape:  # a writer that cropped edge tiles, or a grey stream
            raise TiffReadError(f"tile {tx},{ty} of page {lv.page} decoded to {tile.shape}, "
                                f"expected {shape}")
        return tile

    def _decode_or_glass(self, lv: _Level, level: int, data: bytes | memoryview, tx: int,
                         ty: int, scale: int, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`_decode`, or white recorded in :attr:`damage` when the tile is damaged."""
        try:
            return self._decode(lv, data, tx, ty, scale, out)
        except TiffReadError as err:
            box = (tx * lv.tile_w, ty * lv.tile_h, min(lv.width, (tx + 1) * lv.tile_w),
                   min(lv.height, (ty + 1) * lv.tile_h))
            self.damage.add(level, box, str(err))
            if len(self.damage) <= 3:  # the slide's row and error row list them all
                log.warning("%s: damaged JPEG tile, read as white: %s", self.path, err)
            if out is None:
                out = np.empty((lv.tile_h // scale, lv.tile_w // scale, 3), np.uint8)
            out[:] = 255
            return out

    def _keep_seams(self, items: list[tuple[tuple[int, int, int, int], np.ndarray]]) -> None:
        """Cache seam tiles (ones a box only partly covers: the neighbouring region or band
        needs them too) in a small bounded cache, oldest out first."""
        with self._lock:
            for key, tile in items:
                old = self._seams.pop(key, None)  # two threads may decode the same seam
                if old is not None:
                    self._seam_bytes -= old.nbytes
                self._seams[key] = tile
                self._seam_bytes += tile.nbytes
            while self._seam_bytes > self.seam_budget:
                self._seam_bytes -= self._seams.popitem(last=False)[1].nbytes

    def read_from(self, source: ByteSource) -> None:
        """Take tile bytes from ``source`` (ranged GETs of the remote slide whose skeleton
        this reader opened) instead of ``pread`` of the local file."""
        if type(self)._fetch is not TiffJpegReader._fetch:
            super().read_from(source)  # a subclass with its own fetch: refuse
        self._source = source

    def prepare(self, grid: TileGrid, geo: ReadGeometry) -> None:
        """Size the seam cache to what this slide needs, at most ``SEAM_CACHE_BYTES``.

        A band leaves the file tiles on its lower edge for the next band: one row of file tiles
        under the widest row of kept tiles, half again for the regions in flight and the
        vertical seams between regions. A fixed 24 MB would hold a full 100k px wide row of
        tissue; most slides need half of that, and it is a good part of a worker's peak RSS.
        """
        if grid.num_tiles == 0:
            return
        tw, th = self.tile_shape(geo.level)
        k = geo.whole_scale or 1  # cached tiles are reduced by k
        span = geo.tile_px * geo.scale  # level px per grid column
        c0 = np.floor(grid.col * span / tw).astype(np.int64)  # file columns under each kept tile
        c1 = np.floor(((grid.col + 1) * span - 1) / tw).astype(np.int64)
        same_row = np.r_[False, grid.row[1:] == grid.row[:-1]]
        shared = np.where(same_row, np.maximum(0, np.r_[0, c1[:-1]] - c0 + 1), 0)
        per_row = np.bincount(grid.row, weights=(c1 - c0 + 1 - shared).astype(np.float64))
        need = 1.5 * float(per_row.max()) * (tw // k) * (th // k) * 3
        self.seam_budget = int(min(SEAM_CACHE_BYTES, max(4 << 20, need)))
        if self._source is not None:
            tiles = self.planned_tiles(grid, geo)
            lv = self._lv(geo.level)
            self._source.plan(lv.offsets[tiles], lv.counts[tiles])

    def planned_tiles(self, grid: TileGrid, geo: ReadGeometry) -> np.ndarray:
        """Indices of the non-empty file tiles of ``geo.level`` under the kept tiles, in the
        order tiling reads them (row of file tiles by row): what a byte source fetches ahead.
        A resize (non-integer scale) reads a margin around each tile, as read_resampled."""
        lv = self._lv(geo.level)
        span = geo.tile_px * geo.scale
        pad = 0 if geo.whole_scale else math.ceil(max(geo.scale, 1.0)) + 1
        x0, x1 = grid.col * span - pad, (grid.col + 1) * span + pad
        y0, y1 = grid.row * span - pad, (grid.row + 1) * span + pad
        down = -(-lv.height // lv.tile_h)
        c0 = np.clip(np.floor(x0 / lv.tile_w), 0, lv.across - 1).astype(np.int64)
        c1 = np.clip(np.ceil(x1 / lv.tile_w) - 1, 0, lv.across - 1).astype(np.int64)
        r0 = np.clip(np.floor(y0 / lv.tile_h), 0, down - 1).astype(np.int64)
        r1 = np.clip(np.ceil(y1 / lv.tile_h) - 1, 0, down - 1).astype(np.int64)
        hit = np.zeros((down, lv.across), bool)
        for a, b, c, d in zip(r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist(), strict=True):
            hit[a:b + 1, c:d + 1] = True
        tiles = np.flatnonzero(hit.ravel())
        return tiles[lv.counts[tiles] > 0]

    def clear_caches(self) -> None:
        """Drop cached seam tiles (after the thumbnail: its level's tiles are not needed again)."""
        with self._lock:
            self._seams.clear()
            self._seam_bytes = 0

    def _build_stack(self, level: int, step: int) -> _Stack | None:
        """Build and verify the stacking recipe of one level decoded at 1/``step``."""
        lv = self._lv(level)
        if step not in (1, *DCT_FACTORS):
            return None
        picks = [ty * lv.across + tx for tx, ty in self._clean_tiles(level).clean]
        if len(picks) < 2:
            return None
        try:
            # bytes(): each fetch reuses the thread's read buffer
            datas = [bytes(self._fetch(lv, i // lv.across, [i % lv.across])[0])  # type: ignore[arg-type]
                     for i in picks]  # picked among filled tiles: never None
            first = datas[0]
            stream = lv.header + first[2:]
            segs = _segments(stream)
            if segs is None or any(m == 0xDD or m in _OTHER_FRAMES for m, _ in segs):
                return None  # restart markers of its own, or not a Huffman sequential frame
            sof = [o for m, o in segs if m in (0xC0, 0xC1)]
            if len(sof) != 1:
                return None
            s = sof[0]
            comps = stream[s + 9]
            hs = [stream[s + 11 + 3 * c] >> 4 for c in range(comps)]
            vs = [stream[s + 11 + 3 * c] & 15 for c in range(comps)]
            mcu_w, mcu_h = 8 * max(hs), 8 * max(vs)
            if lv.tile_w % mcu_w or lv.tile_h % mcu_h:
                return None
            if step == 1 and len(set(vs)) > 1:
                # Chroma subsampled vertically (4:2:0) and upsampled at full size: libjpeg's
                # upsampling reads the chroma rows of the tile above across the restart
                # marker (up to ~24 levels off along tile edges). The pixel check below can
                # miss it when its tiles are flat (glass), so it is ruled out by structure.
                return None
            interval = (lv.tile_w // mcu_w) * (lv.tile_h // mcu_h)
            sos = segs[-1][1]
            end = sos + 2 + int.from_bytes(stream[sos + 2:sos + 4], "big")
            dri = b"\xff\xdd\x00\x04" + interval.to_bytes(2, "big")
            rh, rw = lv.tile_h // step, lv.tile_w // step
            info = _Stack(head=first[:end - len(lv.header) + 2], before_height=stream[:s + 5],
                          after_height=stream[s + 7:sos] + dri + stream[sos:end],
                          tile_h=lv.tile_h,
                          most=max(2, min(STACK_BYTES // (rh * rw * 3), 65535 // lv.tile_h)))
            if not all(info.fits(memoryview(d)) for d in datas):
                return None
            stacked = np.empty((len(datas), rh, rw, 3), np.uint8)
            self._decode_stack(lv, [memoryview(d) for d in datas], step, info, stacked)
            for i, d, tile in zip(picks, datas, stacked, strict=True):
                alone = self._decode(lv, d, i % lv.across, i // lv.across, step)
                if not np.array_equal(alone, tile):
                    log.debug("no stacked decoding of level %d at 1/%d: pixels differ", level, step)
                    return None
            self.tiles_decoded -= 2 * len(datas)  # checking is not reading
        except (TiffReadError, ValueError) as err:
            log.debug("no stacked decoding of level %d: %s", level, err)
            return None
        return info

    def _clean_tiles(self, level: int) -> _Clean:
        """Up to ``CHECK_TILES`` non-empty file tiles nearest the level's centre (tissue, not
        glass, most likely) that decode cleanly, trying at most ``CHECK_TRIES``.

        The checks compare pixels: a damaged tile proves nothing about the reader (OpenSlide
        fails on it, or both decode the same garbage), so it is skipped, not held against the
        level. Cached per level; decoding here is not counted as reading.
        """
        with self._lock:
            done = self._clean.get(level)
        if done is not None:
            return done
        lv = self._lv(level)
        filled = np.nonzero(lv.counts > 0)[0]
        down = len(lv.counts) // lv.across
        rows, cols = filled // lv.across, filled % lv.across
        order = filled[np.argsort(np.abs(rows - down // 2) + np.abs(cols - lv.across // 2),
                                  kind="stable")]
        clean: list[tuple[int, int]] = []
        damaged: list[str] = []
        before = self.tiles_decoded
        for i in order[:CHECK_TRIES].tolist():
            tx, ty = i % lv.across, i // lv.across
            try:
                self.decode_tile(level, tx, ty)
            except TiffReadError as err:
                damaged.append(str(err))
                continue
            clean.append((tx, ty))
            if len(clean) == CHECK_TILES:
                break
        self.tiles_decoded = before
        done = _Clean(clean, len(filled), damaged)
        with self._lock:
            self._clean[level] = done
        return done


    def _check_against(self, slide: openslide.OpenSlide, level: int) -> str:
        """Empty when a clean tile near the level's centre decodes to OpenSlide's pixels; else
        why not."""
        lv = self._lv(level)
        tiles = self._clean_tiles(level)
        if not tiles.filled:
            return ""  # an entirely sparse level reads as glass on both paths
        if not tiles.clean:
            return (f"none of the {len(tiles.damaged)} file tiles tried near the centre of "
                    f"level {level} decodes cleanly (first: {tiles.damaged[0]})")
        tx, ty = tiles.clean[0]
        x, y = tx * lv.tile_w, ty * lv.tile_h
        w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
        ours = self.read_rgb(level, x, y, w, h).astype(np.int16)
        theirs = read_rgb(slide, level, x, y, w, h).astype(np.int16)
        diff = np.abs(ours - theirs)
        if diff.mean() > CHECK_MEAN or diff.max() > CHECK_MAX:
            return (f"level {level} tile {tx},{ty} decodes differently from OpenSlide "
                    f"(mean abs diff {diff.mean():.2f}, max {int(diff.max())}; colour space "
                    f"{lv.colorspace or 'from markers'})")
        return ""


    def _check_dct(self, level: int, k: int) -> str:
        """Empty when reduced-size decoding of a clean check tile matches decode + box average."""
        tiles = self._clean_tiles(level)
        if not tiles.clean:
            return ""
        full = self.decode_tile(level, *tiles.clean[0])
        scaled = self.decode_tile(level, *tiles.clean[0], scale=k)
        assert full is not None and scaled is not None
        box = np.asarray(Image.fromarray(full).reduce(k)).astype(np.int16)
        diff = float(np.abs(scaled.astype(np.int16) - box).mean())
        if diff > DCT_CHECK_MEAN:
            return (f"reduced-size decoding of level {level} differs from the box average "
                    f"(mean abs diff {diff:.2f})")
        return ""

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
    return verified(TiffJpegReader(path, found), slide, levels, dct_factor)


def verified(reader: TiffJpegReader, slide: openslide.AbstractSlide, levels: Sequence[int],
             dct_factor: int, check: bool = True) -> tuple[TiffJpegReader | None, str]:
    """``reader`` once every level's clean check tile gives ``slide``'s pixels (``check``),
    with reduced-size decoding on when asked for and verified; else (None, why not), the
    reader closed. Every direct JPEG reader's opener ends here."""
    try:
        for level in levels if check else ():
            why = reader._check_against(slide, level)  # noqa: SLF001
            if why:
                reader.close()
                return None, why
    except Exception as err:  # noqa: BLE001 - a tile we cannot decode: let OpenSlide judge
        reader.close()
        return None, f"self-check failed ({type(err).__name__}: {err})"
    if dct_factor > 1:
        reader.dct_downscale = True
        try:
            why = (reader._check_dct(levels[0], dct_factor)  # noqa: SLF001
                   if reader.dct_ok(levels[0], dct_factor) else "tiles not aligned")
        except Exception as err:  # noqa: BLE001 - e.g. a stream simplejpeg rejects
            why = f"{type(err).__name__}: {err}"
        if why:
            reader.dct_downscale = False
            reader.dct_note = why
            reader.note = f"box filter, not reduced-size decoding: {why}"
            log.info("box-averaging, not reduced-size decoding, for %s: %s", reader.path, why)
    return reader, ""
