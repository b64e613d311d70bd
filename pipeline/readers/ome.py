"""OME-TIFF pyramids as slides, and the fast reader of their JPEG tiles.

Why: OME-TIFF (Bio-Formats, QuPath, bfconvert, tifffile exports) keeps its pyramid in SubIFDs
of the full-resolution page, which OpenSlide does not read: it opens such a file as
generic-tiff with one level (no mpp, every thumbnail decoded from level 0) or not at all.
:class:`OmeSlide` is a small :class:`openslide.AbstractSlide` over tifffile's parse of the
file: levels from the SubIFD pyramid, mpp from the OME-XML ``PhysicalSizeX/Y`` (with units),
vendor ``ome-tiff``; :func:`pipeline.slides.open_slide` returns it for OME-TIFF files, so
the rest of the pipeline (tissue mask, OpenSlide reader, rows) treats it as any slide.

Pixels: :meth:`OmeSlide.read_region` composes regions from the level's tiles (or strips),
JPEG through the same strict libjpeg-turbo call as the fast path (a libjpeg warning fails the
read, as OpenSlide fails on a damaged tile; the OpenSlide reader then delivers it white and
records it), any other compression through tifffile's decoders. The fast path,
:func:`open_ome_reader`, is :class:`TiffJpegReader` fed with the pyramid's pages; it checks a
clean tile per level against an independent decoder (tifffile's ``page.decode``, i.e.
imagecodecs' libjpeg) instead of against the slide, whose JPEG decoder it shares.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import openslide
import simplejpeg
import tifffile
from PIL import Image

from pipeline.readers.tiff import (
    CHECK_MAX,
    CHECK_MEAN,
    JPEG,
    TiffJpegReader,
    _Level,
    _level_of,
)

log = logging.getLogger(__name__)

VENDOR = "ome-tiff"
SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf")
TIFF_SUFFIXES = (".tif", ".tiff", ".tf2", ".tf8", ".btf")
# OME length units -> microns (the schema's UnitsLength; the default is the micron)
_UNITS = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "pm": 1e-6,
          "Å": 1e-4, "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6}
TILE_CACHE_BYTES = 32 << 20  # decoded tiles kept across read_region calls (regions overlap)


class OmeError(Exception):
    """The file is OME-TIFF but not a pyramid of 8-bit RGB this slide class reads."""


def is_ome_tiff(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an OME-TIFF (by the name, or by OME-XML in a .tif's first page).

    Cheap for every other file: only TIFF-named files are opened, and tifffile parses the first
    directory alone until asked for more."""
    name = Path(path).name.lower()
    if name.endswith(SUFFIXES):
        return True
    if not name.endswith(TIFF_SUFFIXES):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: not ours to judge
        return False


def _mpp(pixels: Mapping[str, str], axis: str) -> float | None:
    raw = pixels.get(f"PhysicalSize{axis}")
    if raw is None:
        return None
    unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
    scale = _UNITS.get(unit)
    try:
        value = float(raw)
    except ValueError:
        return None
    if scale is None or not value > 0:
        return None
    return value * scale


def _ome_facts(xml: str) -> dict[str, str]:
    """The first Image's Pixels attributes and the objective's magnification from OME-XML,
    by regular expressions (namespaces and schema versions vary; these names do not)."""
    facts: dict[str, str] = {}
    pixels = re.search(r"<(?:\w+:)?Pixels\b([^>]*)>", xml)
    if pixels:
        facts.update(re.findall(r'(\w+)="([^"]*)"', pixels.group(1)))
    mag = re.search(r'<(?:\w+:)?Objective\b[^>]*\bNominalMagnification="([^"]+)"', xml)
    if mag:
        facts["NominalMagnification"] = mag.group(1)
    return facts


class OmeSlide(openslide.AbstractSlide):
    """An OME-TIFF pyramid (SubIFDs) of 8-bit RGB as an OpenSlide slide.

    Thread-safe: tiles are read with ``os.pread``; the decoded-tile cache takes a lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self._path = str(path)
        self._tif = tifffile.TiffFile(self._path)
        try:
            self._setup()
        except Exception:
            self._tif.close()
            raise
        self._fd: int | None = os.open(self._path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0

    def _setup(self) -> None:
        tif = self._tif
        if not tif.is_ome or not tif.series:
            raise OmeError("no OME-XML in the first page")
        series = tif.series[0]
        pages: list[tifffile.TiffPage] = []
        for i, lv in enumerate(series.levels):
            page = lv.keyframe
            if lv.axes not in ("YXS",) or page.samplesperpixel != 3 or page.bitspersample != 8:
                raise OmeError(f"level {i} is {lv.axes} {page.dtype} with "
                               f"{page.samplesperpixel} samples, not 8-bit interleaved RGB")
            if page.planarconfig != 1 or page.imagedepth != 1:
                raise OmeError(f"level {i} is planar or a volume")
            pages.append(page)
        self.pages = pages
        w0, h0 = pages[0].imagewidth, pages[0].imagelength
        self._dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        # as OpenSlide: the mean of the two axes' ratios
        self._ds = tuple((w0 / w + h0 / h) / 2.0 for w, h in self._dims)
        self._tiles = []  # (tile w, tile h, across) per level; strips are full-width tiles
        for p in pages:
            tw = int(p.tilewidth) if p.is_tiled else int(p.imagewidth)
            th = int(p.tilelength) if p.is_tiled else int(p.rowsperstrip or p.imagelength)
            self._tiles.append((tw, min(th, int(p.imagelength)), -(-int(p.imagewidth) // tw)))
        self._jpeg: list[_Level | None] = []
        for i, p in enumerate(pages):
            lv = _level_of(p, i)[0] if p.is_tiled and p.compression == JPEG else None
            self._jpeg.append(lv)
        facts = _ome_facts(pages[0].description or "")
        props: dict[str, str] = {openslide.PROPERTY_NAME_VENDOR: VENDOR,
                                 "openslide.level-count": str(len(pages)),
                                 "ome-tiff.series-count": str(len(tif.series)),
                                 "ome-tiff.compression": pages[0].compression.name.lower()}
        for axis, key in (("X", openslide.PROPERTY_NAME_MPP_X),
                          ("Y", openslide.PROPERTY_NAME_MPP_Y)):
            mpp = _mpp(facts, axis)
            if mpp is not None:
                props[key] = repr(mpp)
            for k in (f"PhysicalSize{axis}", f"PhysicalSize{axis}Unit"):
                if k in facts:
                    props[f"ome-tiff.{k}"] = facts[k]
        if "NominalMagnification" in facts:
            props[openslide.PROPERTY_NAME_OBJECTIVE_POWER] = facts["NominalMagnification"]
        for i, ((w, h), ds, (tw, th, _)) in enumerate(zip(self._dims, self._ds, self._tiles,
                                                          strict=True)):
            props.update({f"openslide.level[{i}].width": str(w),
                          f"openslide.level[{i}].height": str(h),
                          f"openslide.level[{i}].downsample": repr(ds),
                          f"openslide.level[{i}].tile-width": str(tw),
                          f"openslide.level[{i}].tile-height": str(th)})
        self._props = props

    @classmethod
    def detect_format(cls, filename: str | os.PathLike[str]) -> str | None:  # type: ignore[override]
        return VENDOR if is_ome_tiff(filename) else None

    @property
    def path(self) -> str:
        return self._path

    def reopen(self) -> OmeSlide:
        """A fresh handle on the same file (what the OpenSlide reader does after a failed
        read; ``openslide.open_slide`` would open the file as a one-level generic TIFF)."""
        return OmeSlide(self._path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._ds

    @property
    def properties(self) -> Mapping[str, str]:
        return self._props

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        return {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for i, ds in enumerate(self._ds):
            if ds <= downsample * 1.0001:
                best = i
        return best

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """One decoded tile/strip (h, w, 3) of ``level``, None when sparse; raises
        ``OpenSlideError`` when it does not decode cleanly."""
        key = (level, index)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        page = self.pages[level]
        off, n = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if n == 0:
            return None
        if self._fd is None:
            raise openslide.OpenSlideError("slide is closed")
        data = os.pread(self._fd, n, off)
        if len(data) != n:
            raise openslide.OpenSlideError(f"tile {index} of level {level} is truncated "
                                           f"({len(data)} of {n} bytes)")
        tw, th, _ = self._tiles[level]
        lv = self._jpeg[level]
        try:
            if lv is not None:
                tile = simplejpeg.decode_jpeg(lv.header + data[2:], colorspace="RGB",
                                              strict=True)
            else:
                seg = page.decode(data, index, jpegtables=page.jpegtables)[0]
                tile = np.asarray(seg).reshape(-1, np.asarray(seg).shape[-2], 3)
        except Exception as err:  # noqa: BLE001 - any decoder complaint is a damaged tile
            raise openslide.OpenSlideError(
                f"cannot decode tile {index} of level {level}: {type(err).__name__}: "
                f"{err}") from None
        if tile.shape[1] < min(tw, page.imagewidth) or tile.ndim != 3:
            raise openslide.OpenSlideError(f"tile {index} of level {level} decoded to "
                                           f"{tile.shape}")
        with self._lock:
            self._cache[key] = tile
            self._cache_bytes += tile.nbytes
            while self._cache_bytes > TILE_CACHE_BYTES and len(self._cache) > 1:
                self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def read_region(self, location: tuple[int, int], level: int,
                    size: tuple[int, int]) -> Image.Image:
        """RGBA of ``size`` at level-0 ``location`` of ``level``; outside the level, and
        sparse tiles, transparent (as OpenSlide)."""
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise openslide.OpenSlideError(f"invalid region size {w}x{h}")
        if not 0 <= level < len(self._dims):
            raise openslide.OpenSlideError(f"no level {level}")
        ds = self._ds[level]
        x, y = int(round(location[0] / ds)), int(round(location[1] / ds))
        lw, lh = self._dims[level]
        tw, th, across = self._tiles[level]
        out = np.zeros((h, w, 4), np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        for ty in range(y0 // th, (y1 - 1) // th + 1) if y1 > y0 else ():
            for tx in range(x0 // tw, (x1 - 1) // tw + 1) if x1 > x0 else ():
                tile = self._tile(level, ty * across + tx)
                if tile is None:
                    continue
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1 = min(x1, tx * tw + tile.shape[1])
                ay1 = min(y1, ty * th + tile.shape[0])
                if ax1 <= ax0 or ay1 <= ay0:
                    continue
                dst = out[ay0 - y:ay1 - y, ax0 - x:ax1 - x]
                dst[..., :3] = tile[ay0 - ty * th:ay1 - ty * th, ax0 - tx * tw:ax1 - tx * tw]
                dst[..., 3] = 255
        return Image.fromarray(out, "RGBA")


def open_ome_slide(path: str | os.PathLike[str]) -> OmeSlide | None:
    """The OME-TIFF at ``path`` as a slide, or None when it is no OME-TIFF this class reads
    (then OpenSlide judges it as any TIFF)."""
    if not is_ome_tiff(path):
        return None
    try:
        return OmeSlide(path)
    except OmeError as err:
        log.info("%s: OME-TIFF, but not read as a pyramid here (%s)", path, err)
        return None
    except Exception as err:  # noqa: BLE001 - a damaged directory: OpenSlide's checks say why
        log.info("%s: tifffile cannot read it as OME-TIFF (%s: %s)", path,
                 type(err).__name__, err)
        return None


class OmeTiffReader(TiffJpegReader):
    """The JPEG tiles of an OME-TIFF pyramid's pages (main IFD and SubIFDs), decoded as the
    TIFF fast path decodes tiles; self-checked against tifffile's own decoder."""

    name = "ome-tiff"

    def __init__(self, path: str, levels: Sequence[_Level | None],
                 pages: Sequence[tifffile.TiffPage | None], *,
                 dct_downscale: bool = False) -> None:
        super().__init__(path, levels, dct_downscale=dct_downscale)
        self._pages = list(pages)

    def _check_against(self, slide: openslide.AbstractSlide, level: int) -> str:
        """Empty when a clean tile near the level's centre gives the pixels tifffile's decoder
        (imagecodecs) gives for it; else why not. ``slide`` decodes with our own decoder, so
        it is not the witness here."""
        lv = self._lv(level)
        page = self._pages[level]
        assert page is not None
        tiles = self._clean_tiles(level)
        if not tiles.filled:
            return ""
        if not tiles.clean:
            return (f"none of the {len(tiles.damaged)} file tiles tried near the centre of "
                    f"level {level} decodes cleanly (first: {tiles.damaged[0]})")
        tx, ty = tiles.clean[0]
        i = ty * lv.across + tx
        with open(self.path, "rb") as fh:
            fh.seek(int(lv.offsets[i]))
            data = fh.read(int(lv.counts[i]))
        theirs = np.asarray(page.decode(data, i, jpegtables=page.jpegtables)[0])[0]
        x, y = tx * lv.tile_w, ty * lv.tile_h
        w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
        ours = self.read_rgb(level, x, y, w, h).astype(np.int16)
        diff = np.abs(ours - theirs[:h, :w].astype(np.int16))
        if diff.mean() > CHECK_MEAN or diff.max() > CHECK_MAX:
            return (f"level {level} tile {tx},{ty} decodes differently from tifffile's decoder "
                    f"(mean abs diff {diff.mean():.2f}, max {int(diff.max())}; colour space "
                    f"{lv.colorspace or 'from markers'})")
        return ""


def open_ome_reader(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], *,
                    dct_factor: int = 1) -> tuple[OmeTiffReader | None, str]:
    """A fast reader for ``levels`` of an :class:`OmeSlide`, or (None, why not)."""
    from pipeline.readers.tiff import verified

    if not isinstance(slide, OmeSlide):
        vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR)
        return None, f"vendor {vendor!r} is not OME-TIFF"
    found: list[_Level | None] = [None] * slide.level_count
    pages: list[tifffile.TiffPage | None] = [None] * slide.level_count
    for level in levels:
        page = slide.pages[level]
        lv, why = _level_of(page, level)
        if lv is None:
            return None, f"OME-TIFF {why}"
        found[level], pages[level] = lv, page
    reader = OmeTiffReader(path, found, pages)
    got, why = verified(reader, slide, levels, dct_factor)
    assert got is None or isinstance(got, OmeTiffReader)
    return got, why
