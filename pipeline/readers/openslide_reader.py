"""OpenSlide as a reader: every format it knows, and the fallback of every fast path."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import openslide

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
