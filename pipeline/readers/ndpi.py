"""Direct reader of Hamamatsu NDPI: the JPEG restart intervals of each level, decoded as tiles.

Why: NDPI is the commonest non-Aperio format in clinics, and OpenSlide reads it a restart
interval ("stripe", e.g. 256 x 8 px) at a time through its tile cache: ~50 tiles/s per core
at 40x. An NDPI level is one baseline JPEG whose restart intervals (tag McuStarts, parsed by
tifffile) each reset the DC predictors, so any run of them decodes on its own under the level's
header with the frame size patched. This reader makes one JPEG per *file tile* of one stripe
column and ``b`` MCU rows (about 512 px high), renumbering the restart markers, and hands it to
the same strict libjpeg-turbo path as the TIFF reader (:class:`TiffJpegReader`, whose region
assembly, reduced-size decoding, seam cache, damage log and self-checks it inherits).

Not opentile: opentile's NDPI tiler builds the same frames but then crops them with a lossless
libjpeg-turbo transform (an entropy decode and re-encode per tile, ~1.8 ms per 512 px tile,
measured: as much as decoding it) and needs the system libturbojpeg; a tile one stripe wide
needs no crop. Tests still open the generated files with opentile as an independent reader.

Levels: OpenSlide presents each NDPI page and, between them, levels it makes by decoding a page
at 1/2, 1/4 or 1/8 in the IDCT. Those are served the same way (``decode factor``), so the
fast path gives OpenSlide's own pixels there too. One file tile is one stripe wide: decoding
several stripes side by side would blend chroma across stripe seams (4:2:2 upsampling), which
OpenSlide, decoding each stripe alone, does not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import openslide
import simplejpeg
import tifffile

from pipeline.readers.tiff import (
    DCT_FACTORS,
    TiffJpegReader,
    TiffReadError,
    _Level,
    verified,
)

log = logging.getLogger(__name__)

VENDOR = "hamamatsu"
TILE_PX = 512  # target file-tile height (level-0 px): MCU rows per tile = TILE_PX / mcu_h
_RST = [bytes([0xFF, 0xD0 + i]) for i in range(8)]
_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class _NdpiLevel(_Level):
    """A level served from an NDPI page: its restart intervals and the decode factor."""

    factor: int  # the page decoded at 1/factor gives this level (1, 2, 4, 8)
    frag_offsets: np.ndarray  # int64 file offset of each restart interval, row-major
    frag_counts: np.ndarray  # its bytes, up to and including the next RST (or EOI)
    stripes: int  # restart intervals per MCU row
    mcu_rows: int
    rows_per_tile: int  # MCU rows in one file tile
    mcu_h: int  # page pixels per MCU row
    page_w: int  # page pixels of one stripe (file tile width at factor 1)
    sof_at: int  # offset of the SOF0 frame height in the page's JPEG header
    jpeg_header: bytes  # SOI .. SOS of the page's JPEG (tifffile's, with DRI)


def _patched(lv: _NdpiLevel, rows: int) -> bytes:
    """The page's header declaring a frame of ``rows`` MCU rows by one stripe."""
    h = lv.jpeg_header
    return (h[:lv.sof_at] + (rows * lv.mcu_h).to_bytes(2, "big") + lv.page_w.to_bytes(2, "big")
            + h[lv.sof_at + 4:])


class NdpiReader(TiffJpegReader):
    """Integer boxes of NDPI levels; file tiles are stripe columns of ``rows_per_tile`` rows."""

    name = "ndpi"

    def __init__(self, path: str, levels: Sequence[_NdpiLevel | None], *,
                 dct_downscale: bool = False) -> None:
        super().__init__(path, levels, dct_downscale=dct_downscale)
        self._headers: dict[tuple[int, int], bytes] = {}

    def _nd(self, lv: _Level) -> _NdpiLevel:
        assert isinstance(lv, _NdpiLevel)
        return lv

    def dct_ok(self, level: int, k: int) -> bool:
        lv = self._nd(self._lv(level))
        return super().dct_ok(level, k) and lv.factor * k in DCT_FACTORS

    def _header(self, lv: _NdpiLevel, rows: int) -> bytes:
        key = (lv.page, rows)
        head = self._headers.get(key)
        if head is None:
            head = self._headers[key] = _patched(lv, rows)
        return head

    def _fetch(self, lv: _Level, ty: int, txs: list[int]) -> list[memoryview | None]:
        """One self-contained JPEG per file tile (tx, ty): the stripes of column tx in the
        tile's MCU rows, read with one ``pread`` per MCU row (or one for all when the columns
        cover most of each row), restart markers renumbered."""
        nd = self._nd(lv)
        if self._fd is None:
            raise ValueError("reader is closed")
        r0 = ty * nd.rows_per_tile
        r1 = min(r0 + nd.rows_per_tile, nd.mcu_rows)
        offs, counts = nd.frag_offsets, nd.frag_counts
        a = r0 * nd.stripes + txs[0]
        lo_row = offs[np.arange(r0, r1) * nd.stripes + txs[0]]
        last = np.arange(r0, r1) * nd.stripes + txs[-1]
        hi_row = offs[last] + counts[last]
        need = int((hi_row - lo_row).sum())
        whole = int(hi_row[-1] - offs[a])
        spans = [(int(offs[a]), int(hi_row[-1]))] if whole <= 2 * need + (64 << 10) else \
            list(zip(lo_row.tolist(), hi_row.tolist(), strict=True))
        starts = [s0 for s0, _ in spans]
        views = self._pread_spans(spans, f"rows {r0}-{r1} of page {nd.page}")
        head = self._header(nd, r1 - r0)
        out: list[memoryview | None] = []
        one = len(spans) == 1
        for tx in txs:
            parts: list[bytes | memoryview] = [head]
            for j, r in enumerate(range(r0, r1)):
                i = r * nd.stripes + tx
                o, c = int(offs[i]), int(counts[i])
                span = 0 if one else j
                base = o - starts[span]
                parts.append(views[span][base:base + c - 2])  # without its own marker
                parts.append(_RST[j % 8] if r < r1 - 1 else _EOI)
            out.append(memoryview(b"".join(parts)))
        return out

    def _decode(self, lv: _Level, data: bytes | memoryview, tx: int, ty: int, scale: int,
                out: np.ndarray | None = None) -> np.ndarray:
        """A file tile decoded at 1/(level factor x ``scale``); a last row of tiles shorter
        than the rest is padded white (its JPEG is only as high as the stripes it has)."""
        nd = self._nd(lv)
        f = nd.factor * scale
        shape = (nd.tile_h // scale, nd.tile_w // scale, 3)
        rows = min(nd.rows_per_tile, nd.mcu_rows - ty * nd.rows_per_tile)
        true_h = -(-rows * nd.mcu_h // f)
        true_w = -(-nd.page_w // f)
        short = true_h != shape[0]
        try:
            tile = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=true_h,
                                          min_width=true_w, min_factor=f,
                                          buffer=None if short else out, strict=True)
        except Exception as err:  # noqa: BLE001 - simplejpeg raises ValueError and others
            raise TiffReadError(f"tile {tx},{ty} of page {nd.page}: "
                                f"{type(err).__name__}: {err}") from None
        self.tiles_decoded += 1
        if tile.shape != (true_h, true_w, 3):
            raise TiffReadError(f"tile {tx},{ty} of page {nd.page} decoded to {tile.shape}, "
                                f"expected {(true_h, true_w, 3)}")
        if not short:
            return tile
        full = out if out is not None else np.empty(shape, np.uint8)
        full[:true_h] = tile
        full[true_h:] = 255
        return full


def _levels_of(path: str, slide: openslide.AbstractSlide, levels: Sequence[int]
               ) -> tuple[list[_NdpiLevel | None] | None, str]:
    """NDPI levels for OpenSlide's ``levels``, or None and why not."""
    try:
        tif = tifffile.TiffFile(path, is_ndpi=True)
    except Exception as err:  # noqa: BLE001 - any parse failure means "not for us"
        return None, f"tifffile cannot parse it as NDPI ({type(err).__name__}: {err})"
    try:
        pages = []
        for i, p in enumerate(tif.pages):
            lens = p.tags.valueof(65421)  # type: ignore[union-attr]
            if lens is None or lens <= 0 or (p.tags.valueof(65424) or 0) != 0:  # type: ignore[union-attr]
                continue
            pages.append((i, p))
        found: list[_NdpiLevel | None] = [None] * slide.level_count
        for level in levels:
            lw, lh = (int(v) for v in slide.level_dimensions[level])
            match = [(i, p, f) for i, p in pages for f in (1, *DCT_FACTORS)
                     if (-(-p.imagewidth // f), -(-p.imagelength // f)) == (lw, lh)]  # type: ignore[union-attr]
            if not match:
                return None, f"level {level} ({lw}x{lh}) is no NDPI page nor one reduced by 2-8"
            i, p, f = min(match, key=lambda m: m[2])  # OpenSlide reduces the nearest page
            lv, why = _level(p, i, f, lw, lh)
            if lv is None:
                return None, why
            found[level] = lv
    finally:
        tif.close()
    return found, ""


def _level(p: tifffile.TiffPage, index: int, f: int, lw: int, lh: int
           ) -> tuple[_NdpiLevel | None, str]:
    if p.compression != 7 or p.samplesperpixel != 3 or p.bitspersample != 8:
        return None, f"page {index} is not 8-bit 3-sample JPEG"
    header = getattr(p, "jpegheader", None)
    if not p.is_tiled or not header:
        return None, f"page {index} has no restart intervals (McuStarts)"
    offs = np.asarray(p.dataoffsets, np.int64)
    counts = np.asarray(p.databytecounts, np.int64)
    sw, mh = int(p.tilewidth), int(p.tilelength)  # one restart interval
    stripes = -(-p.imagewidth // sw)
    rows = -(-p.imagelength // mh)
    if stripes * sw != p.imagewidth or len(offs) != stripes * rows:
        return None, f"page {index}: {len(offs)} restart intervals do not tile {p.imagewidth} px"
    sof = header.find(b"\xff\xc0")
    if sof < 0:
        return None, f"page {index} is not a baseline JPEG"
    rows_per_tile = max(8, (TILE_PX // mh) // 8 * 8)  # a multiple of 8: every factor divides
    if sw % (8 * f) or (rows_per_tile * mh) % (8 * f):
        return None, f"page {index} stripes of {sw} px do not reduce by {f}"
    th, tw = rows_per_tile * mh // f, sw // f
    across, down = stripes, -(-rows // rows_per_tile)
    lv = _NdpiLevel(page=index, width=lw, height=lh, tile_w=tw, tile_h=th, across=across,
                    offsets=np.zeros(across * down, np.int64),
                    counts=np.ones(across * down, np.int64), tables=None, colorspace=None,
                    header=b"", factor=f, frag_offsets=offs, frag_counts=counts,
                    stripes=stripes, mcu_rows=rows, rows_per_tile=rows_per_tile, mcu_h=mh,
                    page_w=sw, sof_at=sof + 5, jpeg_header=bytes(header))
    return lv, ""


def open_ndpi_reader(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], *,
                     dct_factor: int = 1) -> tuple[NdpiReader | None, str]:
    """A fast reader for ``levels`` of an OpenSlide-opened NDPI slide, or (None, why not)."""
    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR)
    if vendor != VENDOR:
        return None, f"vendor {vendor!r} is not Hamamatsu"
    if not str(path).lower().endswith(".ndpi"):
        return None, "not an .ndpi file (Hamamatsu VMS/VMU are read by OpenSlide)"
    found, why = _levels_of(path, slide, levels)
    if found is None:
        return None, why
    reader = NdpiReader(path, found)
    got, why = verified(reader, slide, levels, dct_factor)
    assert got is None or isinstance(got, NdpiReader)
    return got, why


def level_tiles(reader: NdpiReader, level: int) -> tuple[int, int]:
    """(across, down) file tiles of ``level`` (for tests and benchmarks)."""
    lv = reader._nd(reader._lv(level))  # noqa: SLF001
    return lv.across, math.ceil(lv.mcu_rows / lv.rows_per_tile)
