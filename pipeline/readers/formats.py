"""Openers of the fast readers beyond Aperio/generic TIFF, in the order they are tried.

Each says quickly (from the vendor OpenSlide reports, or the file name) when a file is not its
format, so a slide costs one failed property lookup per opener that does not apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import openslide

from pipeline.readers.base import Reader

Opener = Callable[[str, openslide.AbstractSlide, Sequence[int], int], tuple[Reader | None, str]]


def _ndpi(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], k: int
          ) -> tuple[Reader | None, str]:
    from pipeline.readers.ndpi import open_ndpi_reader

    return open_ndpi_reader(path, slide, levels, dct_factor=k)


def fast_format_openers() -> list[Opener]:
    """NDPI (restart intervals of each level decoded as tiles)."""
    return [_ndpi]
