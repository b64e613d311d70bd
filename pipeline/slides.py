"""Opening slides, microns-per-pixel resolution, pyramid level choice and region reads.

Everything here turns OpenSlide's failures into :class:`SlideError` with a stage and a reason a
person can act on, because a failed slide becomes an error row in the output lake, not a crash.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import openslide
from PIL import Image

# Microscope scans sit between ~0.1 (100x) and ~10 (1x macro) microns per pixel. A file value
# far outside is a default resolution tag (72 dpi = 352.8 um/px), not a calibration.
PLAUSIBLE_MPP = (0.02, 20.0)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in level pixels


class SlideError(Exception):
    """A slide that cannot be tiled; ``stage`` says where it failed, ``reason`` what to do."""

    def __init__(self, stage: str, reason: str, preview: Any = None) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        # a pipeline.preview.Preview when the slide got as far as its thumbnail: the picture
        # of why (no tissue); it stays in the tiling process (not pickled)
        self.preview = preview

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self) -> tuple[type[SlideError], tuple[str, str]]:
        # Keeps the error intact when Ray or multiprocessing pickles it across processes.
        return (SlideError, (self.stage, self.reason))


def open_slide(path: str | os.PathLike[str]) -> openslide.OpenSlide:
    """Open a slide, turning every way a file can be unusable into ``SlideError('open')``."""
    p = Path(path)
    if not p.exists():
        raise SlideError("open", f"slide file not found: {str(p)!r}")
    if not p.is_file():
        raise SlideError("open", f"slide path is not a regular file: {str(p)!r}")
    if p.stat().st_size == 0:
        raise SlideError("open", f"slide file is empty (0 bytes): {str(p)!r}")
    try:
        slide = openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError as err:
        _raise_if_truncated(p, deep=True)
        plain = _plain_image(p)
        if plain is not None:
            return plain
        raise SlideError("open", f"not a readable slide or image ({type(err).__name__}: "
                         f"{err}); formats: those OpenSlide reads, plus plain TIFF, PNG and "
                         "JPEG images (give their mpp in the manifest)") from None
    except openslide.OpenSlideError as err:
        _raise_if_truncated(p, deep=True)
        raise SlideError(
            "open", f"slide file is corrupt or truncated ({type(err).__name__}: {err})"
        ) from None
    except OSError as err:  # permissions, I/O errors
        raise SlideError("open", f"cannot read slide file ({type(err).__name__}: {err})") from None
    try:
        # OpenSlide opens a TIFF cut right after a page's pixels (the directory chain just
        # ends early: the slide silently loses its lower levels), or one whose level-0 tiles
        # run past the end (only the smallest level is read at open). A few reads per page,
        # ~3 ms for a 1 GB slide.
        _raise_if_truncated(p)
    except BaseException:
        slide.close()
        raise
    return slide


def _raise_if_truncated(p: Path, *, deep: bool = False) -> None:
    """``SlideError('open', 'slide file is truncated: ...')`` when ``p`` is a TIFF cut short
    (``deep``: also when tifffile cannot parse its directory, for a file OpenSlide refused)."""
    cut = _truncated_tiff(p) if deep else _tiff_cut(p)
    if cut is not None:
        raise SlideError("open", f"slide file is truncated: {cut}; copy it again "
                         "(an interrupted upload or download)") from None


# TIFF field types -> bytes per value (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED,
# SSHORT, SLONG, SRATIONAL, FLOAT, DOUBLE, IFD, LONG8, SLONG8, IFD8)
_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
               13: 4, 16: 8, 17: 8, 18: 8}
_DATA_TAGS = ((273, 279), (324, 325))  # (Strip|Tile)Offsets, (Strip|Tile)ByteCounts
_MAX_PAGES = 100_000  # a directory chain longer than this is a loop


def _tiff_cut(p: Path, *, data: bool = True) -> str | None:
    """Where a TIFF (classic or BigTIFF) points past its end, or None (also for non-TIFF).

    Walks the directory chain with plain reads: each directory, each out-of-line tag value
    and, with ``data``, each page's pixel data (its offsets and byte counts) must lie inside
    the file. Only "past the end" is reported, never a guess about a structure it does not
    know (NDPI's 64-bit offset extension reads as smaller offsets, never as larger ones).
    """
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return None if order is None else f"{size:,} bytes, less than a TIFF header"
        magic = struct.unpack(order + "H", head[2:4])[0]
        if magic == 42:
            count_fmt, entry, off_fmt = "H", 12, "I"
            ifd = struct.unpack(order + "I", head[4:8])[0]
        elif magic == 43 and len(head) >= 16:
            count_fmt, entry, off_fmt = "Q", 20, "Q"
            ifd = struct.unpack(order + "Q", head[8:16])[0]
        else:
            return None
        count_len, off_len = struct.calcsize(count_fmt), struct.calcsize(off_fmt)
        seen: set[int] = set()
        page = 0
        while ifd and ifd not in seen and page < _MAX_PAGES:
            seen.add(ifd)
            if ifd + count_len > size:
                return f"{size:,} bytes, but TIFF directory {page} starts at byte {ifd:,}"
            fh.seek(ifd)
            n = struct.unpack(order + count_fmt, fh.read(count_len))[0]
            end = ifd + count_len + n * entry + off_len
            if end > size:
                return (f"{size:,} bytes, but TIFF directory {page} (at byte {ifd:,}) ends "
                        f"at byte {end:,}")
            raw = fh.read(n * entry + off_len)
            arrays: dict[int, tuple[int, int, int]] = {}  # tag -> (type, count, offset)
            for i in range(n):
                e = raw[i * entry:(i + 1) * entry]
                tag, typ = struct.unpack(order + "HH", e[:4])
                cnt = struct.unpack(order + off_fmt, e[4:4 + off_len])[0]
                nbytes = _TIFF_SIZES.get(typ, 1) * cnt
                at = -1  # the value sits in the entry itself
                if nbytes > off_len:
                    at = struct.unpack(order + off_fmt, e[4 + off_len:4 + 2 * off_len])[0]
                    if at + nbytes > size:
                        return (f"{size:,} bytes, but TIFF directory {page} places tag {tag} "
                                f"up to byte {at + nbytes:,}")
                arrays[tag] = (typ, cnt, at if at >= 0 else ifd + count_len + i * entry
                               + 4 + off_len)
            if data:
                for offs_tag, counts_tag in _DATA_TAGS:
                    if offs_tag in arrays and counts_tag in arrays:
                        offs = _tiff_values(fh, order, *arrays[offs_tag])
                        counts = _tiff_values(fh, order, *arrays[counts_tag])
                        if len(offs) == len(counts) and (counts > 0).any():
                            # empty (sparse) tiles may carry any offset
                            last = int((offs + counts)[counts > 0].max())
                            if last > size:
                                return (f"{size:,} bytes, but TIFF page {page} places image "
                                        f"data up to byte {last:,}")
            ifd = struct.unpack(order + off_fmt, raw[n * entry:n * entry + off_len])[0]
            page += 1
    return None


def _tiff_values(fh: Any, order: str, typ: int, count: int, at: int) -> np.ndarray:
    """A SHORT, LONG or LONG8 tag's values as int64 (empty for another type)."""
    code = {3: "u2", 4: "u4", 16: "u8"}.get(typ)
    if code is None:
        return np.zeros(0, np.int64)
    fh.seek(at)
    dtype = np.dtype(code).newbyteorder(order)
    return np.frombuffer(fh.read(count * dtype.itemsize), dtype).astype(np.int64)


def _truncated_tiff(p: Path) -> str | None:
    """Why a TIFF-family file (SVS, generic TIFF, BigTIFF) that OpenSlide rejects is cut
    short, or None: its directories, tag values or image data lie past the end of the file
    (:func:`_tiff_cut`), or tifffile cannot read the directory."""
    import tifffile

    with open(p, "rb") as fh:
        if fh.read(2) not in (b"II", b"MM"):
            return None
    cut = _tiff_cut(p)
    if cut is not None:
        return cut
    size = p.stat().st_size
    try:
        with tifffile.TiffFile(p) as tf:
            for i, page in enumerate(tf.pages):
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts,
                                              strict=False)]
                if ends and max(ends) > size:
                    return (f"{size:,} bytes, but TIFF page {i} places image data up to byte "
                            f"{max(ends):,}")
    except Exception as err:  # noqa: BLE001 - a directory cut in half fails to parse
        return f"its TIFF directory cannot be read ({type(err).__name__}: {err})"
    return None


PLAIN_IMAGE_MAX_PIXELS = 1_000_000_000  # decoded whole into memory (3 bytes a pixel)


def _plain_image(p: Path) -> openslide.AbstractSlide | None:
    """A non-pyramidal TIFF, PNG or JPEG (ROI crops, TMA cores) through OpenSlide's own
    ``ImageSlide`` (the same API, one level, no properties: its mpp comes from the manifest);
    None if PIL cannot read it either."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, PLAIN_IMAGE_MAX_PIXELS)
    try:
        with Image.open(p) as im:
            if im.size[0] * im.size[1] > PLAIN_IMAGE_MAX_PIXELS:
                raise SlideError(
                    "open", f"plain image {str(p)!r} is {im.size[0]}x{im.size[1]} px, more than "
                    f"{PLAIN_IMAGE_MAX_PIXELS:,} px read whole into memory: convert it to a "
                    "tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)")
            im.load()  # decodes: a truncated or damaged file fails here, not mid-tiling
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError):
        return None
    return openslide.ImageSlide(str(p))


def _float_prop(slide: openslide.OpenSlide, key: str) -> float | None:
    raw = slide.properties.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def resolve_mpp(slide: openslide.OpenSlide, override: float | None) -> tuple[float, str]:
    """Level-0 microns per pixel and where it came from ("manifest" wins over "file").

    Tiles are square in level-0 pixels, so only mpp-x is used; an mpp-y that differs by more
    than 1% (rare, scanner calibration) is accepted and the tiles are slightly non-square in
    microns.
    """
    lo, hi = PLAUSIBLE_MPP
    if override is not None:
        value = float(override)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise SlideError(
                "mpp",
                f"manifest mpp {override!r} is outside the plausible range {lo}-{hi} microns per "
                "pixel (the column is microns per pixel at level 0, e.g. 0.25 for 40x)",
            )
        return value, "manifest"
    mpp_x = _float_prop(slide, openslide.PROPERTY_NAME_MPP_X)
    if mpp_x is None:
        raise SlideError(
            "mpp",
            "no microns-per-pixel in the file (openslide.mpp-x missing) and no mpp given in the "
            "manifest: add an `mpp` column for this slide",
        )
    if not lo <= mpp_x <= hi:
        unit = slide.properties.get("tiff.ResolutionUnit")
        origin = f" (derived from TIFF resolution tags, unit {unit})" if unit else ""
        raise SlideError(
            "mpp",
            f"the file's microns-per-pixel {mpp_x:.6g}{origin} is outside the plausible range "
            f"{lo}-{hi} for a microscope scan, most likely a default resolution tag: add an "
            "`mpp` column for this slide in the manifest",
        )
    return mpp_x, "file"


def level_mpps(slide: openslide.OpenSlide, mpp0: float) -> list[float]:
    """Microns per pixel of every pyramid level, using OpenSlide's level downsamples."""
    return [mpp0 * float(ds) for ds in slide.level_downsamples]


def vendor(slide: openslide.OpenSlide) -> str | None:
    """Format name OpenSlide detected (aperio, generic-tiff, hamamatsu, ...)."""
    return slide.properties.get(openslide.PROPERTY_NAME_VENDOR)


def objective_power(slide: openslide.OpenSlide) -> float | None:
    """Scanner objective magnification if the file records it (informational only)."""
    return _float_prop(slide, openslide.PROPERTY_NAME_OBJECTIVE_POWER)


class DamageLog:
    """File tiles (or, through OpenSlide, pieces of a level) whose pixels did not decode.

    Readers record each one as a level-pixel box with the decoder's complaint and deliver it
    as white (glass) instead of failing the slide; tiling flags the tiles that overlap one
    (:func:`pipeline.tiling._read_region`). Thread-safe: a reader's threads share one log.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[int, ...], str] = {}  # (level, x0, y0, x1, y1) -> why
        self._boxes: dict[int, np.ndarray] = {}  # level -> (n, 4) int64, rebuilt on add

    def add(self, level: int, box: tuple[int, int, int, int], reason: str) -> None:
        """Record level-pixel box (x0, y0, x1, y1) of ``level`` as damaged, and why."""
        key = (level, *(int(v) for v in box))
        with self._lock:
            if key in self._items:
                return
            self._items[key] = reason
            mine = [k[1:] for k in self._items if k[0] == level]
            self._boxes[level] = np.asarray(mine, np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self._items)

    def boxes(self, level: int) -> np.ndarray:
        """(n, 4) x0, y0, x1, y1 of the damaged boxes of ``level``."""
        with self._lock:
            return self._boxes.get(level, np.zeros((0, 4), np.int64))

    def notes(self, levels: Sequence[int] | None = None, limit: int = 8) -> list[str]:
        """Up to ``limit`` damaged boxes (of ``levels``; all when None) with their reasons."""
        with self._lock:
            items = sorted(self._items.items())
        if levels is not None:
            items = [(k, r) for k, r in items if k[0] in levels]
        return [f"level {k[0]} px {k[1]},{k[2]}-{k[3]},{k[4]}: {r}" for k, r in items[:limit]]

    def count(self, levels: Sequence[int] | None = None) -> int:
        """Damaged boxes of ``levels`` (all when None)."""
        with self._lock:
            return sum(1 for k in self._items if levels is None or k[0] in levels)


def _read_error(slide_path: str, level: int, err: Exception) -> SlideError:
    return SlideError(
        "read",
        f"failed reading pixels of level {level} from {slide_path!r}: the file is corrupt or "
        f"truncated ({type(err).__name__}: {err})",
    )


def read_rgb(slide: openslide.OpenSlide, level: int, x: int, y: int, w: int, h: int,
             *, path: str = "") -> np.ndarray:
    """Read an integer box of ``level`` pixels (x, y in level pixels) as RGB on white.

    OpenSlide returns un-premultiplied RGBA where pixels outside the scanned area are fully
    transparent; compositing on white makes them look like glass, not like black tissue.
    """
    try:
        return _region_rgb(slide, level, x, y, w, h)
    except openslide.OpenSlideError as err:
        raise _read_error(path, level, err) from None


def _region_rgb(slide: openslide.AbstractSlide, level: int, x: int, y: int, w: int, h: int
                ) -> np.ndarray:
    """:func:`read_rgb` without the error translation (raises ``OpenSlideError``)."""
    ds = float(slide.level_downsamples[level])
    location = (int(round(x * ds)), int(round(y * ds)))
    region = slide.read_region(location, level, (int(w), int(h)))
    rgba = np.asarray(region)
    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    if alpha.min() < 255:
        a = alpha[..., None].astype(np.float32) / 255.0
        rgb = (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
    return rgb


class RegionReader(Protocol):
    """What tiling needs from a pixel source: level sizes and integer RGB boxes."""

    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]: ...

    def read_rgb(self, level: int, x: int, y: int, w: int, h: int,
                 need: Sequence[Box] | None = None) -> np.ndarray: ...


# Piece edge for re-reading a failed OpenSlide region when the level reports no tile size.
PIECE_PX = 256


class OpenSlideReader:
    """The universal reader: OpenSlide's ``read_region`` composited on white.

    ``need`` is ignored while reads succeed: OpenSlide decodes whatever the box covers.

    Damaged JPEG tiles: OpenSlide fails a whole ``read_region`` on one tile it cannot decode,
    and the handle then fails every later call (its errors are sticky). So a failed read
    swaps in a fresh handle for the other reads (the old one is closed with the reader: a
    thread may still be inside it) and reads the box again piece by piece, one file tile of
    the level at a time (``openslide.level[N].tile-width``), on a private handle reopened
    after each failing piece. Failing pieces come back white and go to :attr:`damage`; the
    rest are OpenSlide's pixels. This costs nothing until a read fails, then an open per
    damaged piece.
    """

    def __init__(self, slide: openslide.AbstractSlide, path: str = "", *,
                 recover: bool = True) -> None:
        self.slide = slide
        self.path = path or str(getattr(slide, "_filename", "") or "")
        self.recover = recover  # False: a failed read raises SlideError('read')
        self.damage = DamageLog()
        self._lock = threading.Lock()
        self._opened: list[openslide.AbstractSlide] = []  # handles this reader opened
        self._dims: list[tuple[int, int]] | None = None

    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]:
        if self._dims is None:  # kept: a handle that failed a read fails this call too
            handle = self.slide
            try:
                dims = handle.level_dimensions
            except openslide.OpenSlideError:
                self._replace(handle)
                dims = self.slide.level_dimensions
            self._dims = [(int(w), int(h)) for w, h in dims]
        return self._dims

    def read_rgb(self, level: int, x: int, y: int, w: int, h: int,
                 need: Sequence[Box] | None = None) -> np.ndarray:
        handle = self.slide
        try:
            return _region_rgb(handle, level, x, y, w, h)
        except openslide.OpenSlideError as err:
            if not (self.recover and self.path):
                raise _read_error(self.path, level, err) from None
            self._replace(handle)
        return self._piecewise(level, x, y, w, h, need)

    def healthy(self) -> openslide.AbstractSlide:
        """The shared handle, replaced first if an earlier failed read spoiled it."""
        handle = self.slide
        try:
            handle.level_dimensions  # noqa: B018 - any call fails on a spoiled handle
        except openslide.OpenSlideError:
            if not (self.recover and self.path):
                raise
            self._replace(handle)
        return self.slide

    def _open(self) -> openslide.AbstractSlide:
        try:
            return openslide.open_slide(self.path)
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError("read", f"cannot open {self.path!r} again after a failed read "
                             f"({type(err).__name__}: {err})") from None

    def _replace(self, bad: openslide.AbstractSlide) -> None:
        """A fresh shared handle in place of ``bad`` (unless another thread replaced it)."""
        with self._lock:
            if self.slide is bad:
                self.slide = self._open()
                self._opened.append(self.slide)

    def _piecewise(self, level: int, x: int, y: int, w: int, h: int,
                   need: Sequence[Box] | None) -> np.ndarray:
        """The box read one level tile at a time on a private handle; see the class doc."""
        own = self._open()
        try:
            props = own.properties
            tw = int(props.get(f"openslide.level[{level}].tile-width", 0)) or PIECE_PX
            th = int(props.get(f"openslide.level[{level}].tile-height", 0)) or PIECE_PX
            lw, lh = own.level_dimensions[level]
            out = np.full((h, w, 3), 255, np.uint8)
            boxes = None if need is None else np.asarray(need, np.float64).reshape(-1, 4)
            for ty in range(y // th, (y + h - 1) // th + 1):
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    px0, py0 = max(x, tx * tw), max(y, ty * th)
                    px1, py1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                    if boxes is not None and not ((boxes[:, 0] < px1) & (boxes[:, 2] > px0) &
                                                  (boxes[:, 1] < py1) &
                                                  (boxes[:, 3] > py0)).any():
                        continue  # nobody needs these pixels: glass, as the TIFF reader
                    try:
                        out[py0 - y:py1 - y, px0 - x:px1 - x] = _region_rgb(
                            own, level, px0, py0, px1 - px0, py1 - py0)
                    except openslide.OpenSlideError as err:
                        tile = (tx * tw, ty * th, min(lw, (tx + 1) * tw), min(lh, (ty + 1) * th))
                        self.damage.add(level, tile, f"OpenSlideError: {err}")
                        own.close()
                        own = self._open()
            return out
        finally:
            own.close()

    def close(self) -> None:
        """Close the handles this reader opened (not the one it was given)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for handle in opened:
            handle.close()


def integer_factor(box: tuple[float, float, float, float], size: tuple[int, int]) -> int | None:
    """k when ``box`` has integer corners and is exactly k times ``size``; else None."""
    x0, y0, x1, y1 = box
    if any(v != int(v) for v in box):
        return None
    k = (x1 - x0) / size[0]
    if k != int(k) or k < 1 or (y1 - y0) != k * size[1]:
        return None
    return int(k)


def read_resampled(slide: openslide.OpenSlide | RegionReader, level: int,
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
    the thread's next scratch read (see ``TiffJpegReader.read_reduced``).
    """
    # A bare OpenSlide handle has nobody to report damaged tiles to: it raises instead.
    reader: RegionReader = (OpenSlideReader(slide, path, recover=False)
                            if isinstance(slide, openslide.AbstractSlide) else slide)
    x0, y0, x1, y1 = box
    out_w, out_h = size
    k = integer_factor(box, size)
    if k is not None:
        ix, iy, iw, ih = int(x0), int(y0), int(x1 - x0), int(y1 - y0)
        can_reduce = getattr(reader, "can_reduce", None)
        if can_reduce is not None and (k == 1 or can_reduce(level, ix, iy, iw, ih, k)):
            return reader.read_reduced(  # type: ignore[attr-defined]
                level, ix, iy, iw, ih, k, need, scratch=scratch)
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
