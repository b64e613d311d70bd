"""OpenSlide as a reader: every format it knows, and the fallback of every fast path."""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Sequence

import cv2
import numpy as np
import openslide
import openslide.lowlevel
from openslide import _convert
from PIL import Image

from pipeline.readers.base import Box, Reader
from pipeline.slides import SlideError


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


def _region_rgb(slide: openslide.AbstractSlide, level: int, x: int, y: int, w: int, h: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """:func:`read_rgb` without the error translation (raises ``OpenSlideError``), into
    ``out`` (h, w, 3) when given."""
    ds = float(slide.level_downsamples[level])
    location = (int(round(x * ds)), int(round(y * ds)))
    rgba = _rgba(slide, location, level, int(w), int(h))
    if out is None:
        out = np.empty((int(h), int(w), 3), np.uint8)
    if not _opaque(rgba):
        a = rgba[..., 3:].astype(np.float32) / 255.0
        out[:] = (rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
    else:
        _drop_alpha(rgba, out)
    return out


def _opaque(rgba: np.ndarray) -> bool:
    """No transparent pixel: on little-endian RGBA the alpha byte is each uint32's top byte,
    so one min over uint32 (~7x faster than over the strided alpha bytes)."""
    if np.little_endian and rgba.flags.c_contiguous:
        return int(rgba.view(np.uint32).min()) >= 0xFF000000
    return int(rgba[..., 3].min()) == 255


def _drop_alpha(rgba: np.ndarray, out: np.ndarray) -> None:
    """RGB of ``rgba`` into ``out`` (a view with rows apart is fine): OpenCV's SIMD copy,
    ~30x numpy's strided one for a 224 x 1792 run."""
    got = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB, dst=out)
    if got is not out and not np.shares_memory(got, out):  # OpenCV would not write into it
        out[:] = got


_RAW = hasattr(openslide.lowlevel, "_read_region") and hasattr(_convert, "argb2rgba")


def _rgba(slide: openslide.AbstractSlide, location: tuple[int, int], level: int, w: int,
          h: int) -> np.ndarray:
    """Un-premultiplied RGBA (h, w, 4) of a region, as ``slide.read_region`` gives it.

    For an OpenSlide handle, OpenSlide's C call fills a numpy buffer and openslide-python's
    own converter un-premultiplies it in place: the same bytes, without the PIL image that
    ``read_region`` wraps them in, whose ``np.asarray`` costs a second copy through PIL's
    raw encoder (~10% of reading a 40x region).
    """
    if _RAW and isinstance(slide, openslide.OpenSlide) and w > 0 and h > 0:
        buf = np.empty((h, w), np.uint32)
        openslide.lowlevel._read_region(  # noqa: SLF001 - the C call read_region wraps
            slide._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),  # noqa: SLF001
            location[0], location[1], level, w, h)
        _convert.argb2rgba(buf)
        return buf.view(np.uint8).reshape(h, w, 4)
    return np.asarray(slide.read_region(location, level, (w, h)))


# Read the whole box in one call when the needed runs cover at least this share of it.
WHOLE_BOX_SHARE = 0.9


def _runs(need: Sequence[Box], x: int, y: int, w: int, h: int
          ) -> list[tuple[int, int, int, int]] | None:
    """Integer (x, y, w, h) boxes covering the ``need`` boxes inside the box: boxes of one
    row (same top and bottom) merged where they touch or overlap, then runs of the same
    columns in rows that touch or overlap (fewer calls; OpenSlide decodes a file tile under
    two rows once). None: read the whole box (the runs cover nearly all of it)."""
    rows: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for bx0, by0, bx1, by1 in need:
        x0, y0 = max(x, math.floor(bx0)), max(y, math.floor(by0))
        x1, y1 = min(x + w, math.ceil(bx1)), min(y + h, math.ceil(by1))
        if x1 > x0 and y1 > y0:
            rows.setdefault((y0, y1), []).append((x0, x1))
    runs: list[tuple[int, int, int, int]] = []
    for (y0, y1), spans in rows.items():
        spans.sort()
        a, b = spans[0]
        for c, d in spans[1:]:
            if c <= b:
                b = max(b, d)
                continue
            runs.append((a, y0, b - a, y1 - y0))
            a, b = c, d
        runs.append((a, y0, b - a, y1 - y0))
    runs.sort(key=lambda r: (r[0], r[2], r[1]))
    tall: list[tuple[int, int, int, int]] = []
    for r in runs:
        if tall and tall[-1][0] == r[0] and tall[-1][2] == r[2] and \
                r[1] <= tall[-1][1] + tall[-1][3]:
            ax, ay, aw, ah = tall[-1]
            tall[-1] = (ax, ay, aw, max(ay + ah, r[1] + r[3]) - ay)
        else:
            tall.append(r)
    if sum(rw * rh for _, _, rw, rh in tall) >= WHOLE_BOX_SHARE * w * h:
        return None
    return tall


# Piece edge for re-reading a failed OpenSlide region when the level reports no tile size.
PIECE_PX = 256


class OpenSlideReader(Reader):
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

    name = "openslide"

    def __init__(self, slide: openslide.AbstractSlide, path: str = "", *,
                 recover: bool = True) -> None:
        super().__init__()
        self.slide = slide
        self.path = path or str(getattr(slide, "_filename", "") or "")
        self.recover = recover  # False: a failed read raises SlideError('read')
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
        """The box, or with ``need`` only the runs of needed pixels (the rest white).

        Reading the runs rather than the whole box: a region of kept tiles is their bounding
        box, ~1.6x the pixels they cover at tissue edges, and OpenSlide decodes and composites
        every file tile a call touches; its tile cache keeps the file tiles two runs share.
        """
        handle = self.slide
        runs = None if need is None else _runs(need, x, y, w, h)
        try:
            if runs is None:
                return _region_rgb(handle, level, x, y, w, h)
            out = np.full((h, w, 3), 255, np.uint8)
            for rx, ry, rw, rh in runs:
                _region_rgb(handle, level, rx, ry, rw, rh,
                            out[ry - y:ry - y + rh, rx - x:rx - x + rw])
            return out
        except openslide.OpenSlideError as err:
            if not (self.recover and self.path):
                raise _read_error(self.path, level, err) from None
            self._replace(handle)
        return self._piecewise(level, x, y, w, h, need)

    def can_reduce(self, level: int, x: int, y: int, w: int, h: int, k: int) -> bool:
        return all(v % k == 0 for v in (x, y, w, h))

    def read_reduced(self, level: int, x: int, y: int, w: int, h: int, k: int,
                     need: Sequence[Box] | None = None, *, scratch: bool = False
                     ) -> np.ndarray:
        """The box area-averaged by ``k`` (``Image.reduce``), run by run.

        An opaque run is reduced straight from OpenSlide's RGBA buffer (the same per-channel
        box average as reducing its RGB): the full-size RGB copy and PIL image never exist.
        A run with transparent pixels is composited on white first, as :meth:`read_rgb` does.
        """
        if k == 1:
            return self.read_rgb(level, x, y, w, h, need)
        runs = None if need is None else _runs(need, x, y, w, h)
        boxes = [(x, y, w, h)] if runs is None else runs
        handle = self.slide
        if all(v % k == 0 for box in boxes for v in box):
            out = np.full((h // k, w // k, 3), 255, np.uint8)
            try:
                for rx, ry, rw, rh in boxes:
                    ds = float(handle.level_downsamples[level])
                    rgba = _rgba(handle, (int(round(rx * ds)), int(round(ry * ds))), level,
                                 rw, rh)
                    dst = out[(ry - y) // k:(ry - y + rh) // k, (rx - x) // k:(rx - x + rw) // k]
                    if not _opaque(rgba):
                        rgb = _region_rgb(handle, level, rx, ry, rw, rh)
                        dst[:] = np.asarray(Image.fromarray(rgb).reduce(k))
                    else:
                        img = Image.frombuffer("RGBA", (rw, rh), rgba, "raw", "RGBA", 0, 1)
                        _drop_alpha(np.asarray(img.reduce(k)), dst)
                return out
            except openslide.OpenSlideError:
                pass  # read_rgb below recovers (fresh handle, piece by piece) or raises
        return np.asarray(Image.fromarray(self.read_rgb(level, x, y, w, h, need)).reduce(k))

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
        reopen = getattr(self.slide, "reopen", None)  # a slide class of ours (OME-TIFF)
        try:
            return reopen() if reopen is not None else openslide.open_slide(self.path)
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
