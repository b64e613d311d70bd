"""Pixel readers: which one reads a slide, and the protocol they all speak.

- :mod:`pipeline.readers.base`: :class:`Reader` (what tiling calls) and :class:`DamageLog`.
- :mod:`pipeline.readers.openslide_reader`: OpenSlide, every format it knows; the fallback.
- :mod:`pipeline.readers.tiff`: JPEG tiles of Aperio / generic tiled TIFF decoded directly.
- :mod:`pipeline.readers.resample`: a fractional box resampled to the tile grid.

A fast reader is offered by an *opener* in :data:`OPENERS`: ``opener(path, slide, levels,
dct_factor) -> (reader or None, why not)``. The first that returns a reader reads the slide;
each opener self-checks its reader against OpenSlide (or an independent decoder) before
returning it, so a fast path is only ever used where it gives OpenSlide's pixels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import openslide

from pipeline.readers.base import Box, ByteSource, DamageLog, Reader, ReadError
from pipeline.readers.formats import fast_format_openers
from pipeline.readers.openslide_reader import OpenSlideReader, read_rgb
from pipeline.readers.resample import integer_factor, read_resampled
from pipeline.readers.tiff import open_tiff_reader
from pipeline.slides import SlideError

__all__ = ["OPENERS", "READERS", "Box", "ByteSource", "DamageLog", "OpenSlideReader",
           "ReadError", "Reader", "choose_reader", "integer_factor", "read_resampled",
           "read_rgb"]

log = logging.getLogger(__name__)

Opener = Callable[[str, openslide.AbstractSlide, Sequence[int], int], tuple[Reader | None, str]]
# Fast readers, tried in turn; each says quickly when a file is not its format.
OPENERS: list[Opener] = [
    lambda path, slide, levels, k: open_tiff_reader(path, slide, levels, dct_factor=k),
    *fast_format_openers(),  # NDPI, Philips, OME-TIFF, DICOM (pipeline.readers.formats)
]
# tiling.reader: auto (a fast reader where one recognises the file, else OpenSlide),
# openslide (always), tiff (a fast reader or fail the slide: benchmarks and tests)
READERS = ("auto", "openslide", "tiff")
_fallbacks_logged: set[str] = set()


def _fast(slide: openslide.AbstractSlide, path: str, levels: Sequence[int], dct_factor: int
          ) -> tuple[Reader | None, str]:
    whys = []
    for opener in OPENERS:
        reader, why = opener(path, slide, levels, dct_factor)
        if reader is not None:
            return reader, ""
        whys.append(why)
    return None, "; ".join(w for w in whys if w)


def choose_reader(slide: openslide.AbstractSlide, path: str, level: int, choice: str, *,
                  dct_factor: int = 1, also: int | None = None,
                  backup: OpenSlideReader | None = None) -> Reader:
    """The reader for ``level`` of an open slide: a fast one when ``choice`` allows and one
    recognises the file, else OpenSlide (``backup`` when given). Its ``note`` says why not
    a faster way.

    ``also``: a second level (the thumbnail's) the fast reader should serve if it can.
    """
    if choice not in READERS:
        raise ValueError(f"tiling.reader must be one of {READERS}, got {choice!r}")
    fallback = backup if backup is not None else OpenSlideReader(slide, path)
    if choice == "openslide":
        return fallback
    reader, why = None, ""
    if also is not None and also != level:
        reader, why = _fast(slide, path, [level, also], dct_factor)
    if reader is None:
        reader, why = _fast(slide, path, [level], dct_factor)
    if reader is not None:
        return reader
    if choice == "tiff":
        raise SlideError("open", f"tiling.reader=tiff cannot read {path!r}: {why}")
    kind = re.sub(r"[\d.]+", "#", why)  # once per kind of reason per process, not per slide
    if kind not in _fallbacks_logged:
        _fallbacks_logged.add(kind)
        log.info("reading with OpenSlide, not a fast path: %s (e.g. %s)", why, path)
    fallback.note = f"OpenSlide, not the TIFF fast path: {why}" if why else ""
    return fallback
