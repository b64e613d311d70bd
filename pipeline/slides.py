"""Opening slides and their facts: microns per pixel, vendor, objective; truncated files.

Pixel readers live in :mod:`pipeline.readers`.

Everything here turns OpenSlide's failures into :class:`SlideError` with a stage and a reason a
person can act on, because a failed slide becomes an error row in the output lake, not a crash.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import openslide
from PIL import Image

from pipeline.tiffdir import PastTheEnd, walk

# Microscope scans sit between ~0.1 (100x) and ~10 (1x macro) microns per pixel. A file value
# far outside is a default resolution tag (72 dpi = 352.8 um/px), not a calibration.
PLAUSIBLE_MPP = (0.02, 20.0)


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
    if p.suffix.lower() == ".vsi":
        # OpenSlide does not read VSI; as a TIFF it would open the overview image alone.
        raise SlideError("open", f"Olympus VSI ({p.name}) is not read by OpenSlide, so not by "
                         "this pipeline: convert it to OME-TIFF (e.g. bfconvert or QuPath) and "
                         "give that file's uri")
    ome = _ome_slide(p)
    if ome is not None:
        return ome
    try:
        slide = openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError as err:
        _raise_if_truncated(p, deep=True)
        _raise_if_not_wsi(p)
        plain = _plain_image(p)
        if plain is not None:
            return plain
        raise SlideError("open", f"not a readable slide or image ({type(err).__name__}: "
                         f"{err}); formats: those OpenSlide reads, plus plain TIFF, PNG and "
                         "JPEG images (give their mpp in the manifest)") from None
    except openslide.OpenSlideError as err:
        _raise_if_truncated(p, deep=True)
        _raise_if_not_wsi(p)
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


VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _raise_if_not_wsi(p: Path) -> None:
    """``SlideError('open')`` saying why a DICOM file OpenSlide refused is no slide: not a
    whole-slide image, or a series without its pyramid (no VOLUME image flavor beside it)."""
    with open(p, "rb") as fh:
        if fh.read(132)[128:] != b"DICM":
            return
    import pydicom

    def flavors(f: Path) -> tuple[str, str] | None:  # (SOP class, image flavor)
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM, or damaged: says nothing here
            return None
        kind = list(ds.get("ImageType") or [])
        return str(ds.get("SOPClassUID", "")), (str(kind[2]) if len(kind) > 2 else "")

    mine = flavors(p)
    if mine is None:
        return
    if mine[0] != VL_WSI:
        name = getattr(pydicom.uid.UID(mine[0]), "name", mine[0]) if mine[0] else "none"
        raise SlideError("open", f"DICOM file is not a WSI (SOP class {name}, not VL Whole "
                         f"Slide Microscopy; no image flavor): {p.name}; a slide uri names a "
                         "DICOM WSI series (its folder or one .dcm of it)")
    found = {f for f in (flavors(q) for q in p.parent.glob("*.dcm")) if f and f[0] == VL_WSI}
    kinds = sorted({k for _, k in found | {mine}})
    if "VOLUME" not in kinds:
        raise SlideError("open", f"DICOM WSI series of {p.name} has no image flavor VOLUME (its "
                         f"folder holds {', '.join(kinds) or 'no flavor'} only): put the "
                         "pyramid levels' instances in the same folder")


def _raise_if_truncated(p: Path, *, deep: bool = False) -> None:
    """``SlideError('open', 'slide file is truncated: ...')`` when ``p`` is a TIFF cut short
    (``deep``: also when tifffile cannot parse its directory, for a file OpenSlide refused)."""
    cut = _truncated_tiff(p) if deep else _tiff_cut(p)
    if cut is not None:
        raise SlideError("open", f"slide file is truncated: {cut}; copy it again "
                         "(an interrupted upload or download)") from None


def _tiff_cut(p: Path, *, data: bool = True) -> str | None:
    """Where a TIFF (classic or BigTIFF) points past its end, or None (also for non-TIFF):
    each directory, each out-of-line tag value and, with ``data``, each page's pixel data
    must lie inside the file (:func:`pipeline.tiffdir.walk`)."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        def read(at: int, n: int) -> bytes:
            fh.seek(at)
            return fh.read(n)

        try:
            walk(read, size, data=data)
        except PastTheEnd as cut:
            return str(cut)
    return None


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


def _ome_slide(p: Path) -> openslide.AbstractSlide | None:
    """An OME-TIFF pyramid (SubIFDs, which OpenSlide does not read) as a slide
    (:class:`pipeline.readers.ome.OmeSlide`), after the same truncation check as any TIFF;
    None for every other file."""
    from pipeline.readers.ome import open_ome_slide

    slide = open_ome_slide(p)
    if slide is not None:
        try:
            _raise_if_truncated(p, deep=True)
        except BaseException:
            slide.close()
            raise
    return slide


PLAIN_IMAGE_MAX_PIXELS = 1_000_000_000  # decoded whole into memory (3 bytes a pixel)


def _plain_image(p: Path) -> openslide.AbstractSlide | None:
    """A non-pyramidal TIFF, PNG or JPEG (ROI crops, TMA cores) through OpenSlide's own
    ``ImageSlide`` (the same API, one level, no properties: its mpp comes from the manifest);
    None if PIL cannot read it either."""
    from PIL import UnidentifiedImageError

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
    if mpp_x is None and isinstance(slide, openslide.ImageSlide):
        raise SlideError(
            "mpp",
            "plain image (not a slide format: no pyramid, no microns-per-pixel): add an `mpp` "
            "column for this slide in the manifest (microns per pixel, e.g. 0.5 for 20x)")
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
