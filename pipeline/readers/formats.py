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
    from pipeline.readers.ndpi import VENDOR, open_ndpi_reader

    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) != VENDOR:
        return None, ""  # said once by the TIFF opener: not a plain tiled TIFF
    return open_ndpi_reader(path, slide, levels, dct_factor=k)


def _ome(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], k: int
         ) -> tuple[Reader | None, str]:
    from pipeline.readers.ome import VENDOR, open_ome_reader

    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) != VENDOR:
        return None, ""  # said once by the TIFF opener: not a plain tiled TIFF
    return open_ome_reader(path, slide, levels, dct_factor=k)


def _philips(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], k: int
             ) -> tuple[Reader | None, str]:
    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) != PHILIPS:
        return None, ""
    return open_philips_reader(path, slide, levels, dct_factor=k)


def _dicom(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], k: int
           ) -> tuple[Reader | None, str]:
    from pipeline.readers.dicom import VENDOR, open_dicom_reader

    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) != VENDOR:
        return None, ""
    return open_dicom_reader(path, slide, levels, dct_factor=k)


PHILIPS = "philips"


def open_philips_reader(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], *,
                        dct_factor: int = 1) -> tuple[Reader | None, str]:
    """The TIFF fast path over a Philips TIFF's pages, or (None, why not).

    Philips pads every pyramid page to whole tiles and OpenSlide clips the levels below the
    first to level 0 / downsample (from the XML's pixel spacings): level ``i`` is the ``i``-th
    tiled page of the main IFD chain, read within OpenSlide's smaller dimensions. Each level's
    page must cover those dimensions by less than one tile of padding; a clean tile per level
    must give OpenSlide's pixels.
    """
    import dataclasses

    import tifffile

    from pipeline.readers.tiff import TiffJpegReader, _Level, _level_of, verified

    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # noqa: BLE001 - any parse failure means "not for us"
        return None, f"tifffile cannot parse it ({type(err).__name__}: {err})"
    try:
        tiled = [(i, p) for i, p in enumerate(tif.pages) if p.is_tiled]  # type: ignore[union-attr]
        if len(tiled) != slide.level_count:
            return None, (f"Philips TIFF: {len(tiled)} tiled pages for {slide.level_count} "
                          "OpenSlide levels")
        found: list[_Level | None] = [None] * slide.level_count
        for level in levels:
            i, page = tiled[level]
            lw, lh = (int(v) for v in slide.level_dimensions[level])
            pw, ph = int(page.imagewidth), int(page.imagelength)  # type: ignore[union-attr]
            tw, th = int(page.tilewidth), int(page.tilelength)  # type: ignore[union-attr]
            if not (lw <= pw < lw + tw and lh <= ph < lh + th):
                return None, (f"Philips level {level} ({lw}x{lh}) is not page {i} "
                              f"({pw}x{ph}) less its padding")
            lv, why = _level_of(page, i)  # type: ignore[arg-type]
            if lv is None:
                return None, why
            found[level] = dataclasses.replace(lv, width=lw, height=lh)
    finally:
        tif.close()
    reader = TiffJpegReader(path, found)
    reader.name = PHILIPS  # the slides row says which fast path read it
    return verified(reader, slide, levels, dct_factor)


def fast_format_openers() -> list[Opener]:
    """NDPI (restart intervals of each level decoded as tiles), OME-TIFF (the SubIFD
    pyramid's JPEG tiles), Philips TIFF (its padded pages' JPEG tiles), DICOM WSI (each
    level instance's JPEG frames)."""
    return [_ndpi, _ome, _philips, _dicom]
