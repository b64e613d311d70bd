"""Opening slides, microns-per-pixel resolution, pyramid level choice and region reads.

Everything here turns OpenSlide's failures into :class:`SlideError` with a stage and a reason a
person can act on, because a failed slide becomes an error row in the output lake, not a crash.
"""

from __future__ import annotations

import math
import os
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
        return openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError as err:
        cut = _truncated_tiff(p)
        if cut is not None:
            raise SlideError("open", f"slide file is truncated: {cut}; copy it again "
                             "(an interrupted upload or download)") from None
        plain = _plain_image(p)
        if plain is not None:
            return plain
        raise SlideError("open", f"not a readable slide or image ({type(err).__name__}: "
                         f"{err}); formats: those OpenSlide reads, plus plain TIFF, PNG and "
                         "JPEG images (give their mpp in the manifest)") from None
    except openslide.OpenSlideError as err:
        raise SlideError(
            "open", f"slide file is corrupt or truncated ({type(err).__name__}: {err})"
        ) from None
    except OSError as err:  # permissions, I/O errors
        raise SlideError("open", f"cannot read slide file ({type(err).__name__}: {err})") from None


def _truncated_tiff(p: Path) -> str | None:
    """Why a TIFF-family file (SVS, generic TIFF, BigTIFF) that OpenSlide rejects is cut
    short, or None: its directory places image data past the end of the file, or the
    directory itself cannot be read."""
    import tifffile

    with open(p, "rb") as fh:
        if fh.read(2) not in (b"II", b"MM"):
            return None
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
    ds = float(slide.level_downsamples[level])
    location = (int(round(x * ds)), int(round(y * ds)))
    try:
        region = slide.read_region(location, level, (int(w), int(h)))
    except openslide.OpenSlideError as err:
        raise _read_error(path, level, err) from None
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


class OpenSlideReader:
    """The universal reader: OpenSlide's ``read_region`` composited on white.

    ``need`` is ignored: OpenSlide decodes whatever the box covers.
    """

    def __init__(self, slide: openslide.OpenSlide, path: str = "") -> None:
        self.slide = slide
        self.path = path

    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]:
        return self.slide.level_dimensions

    def read_rgb(self, level: int, x: int, y: int, w: int, h: int,
                 need: Sequence[Box] | None = None) -> np.ndarray:
        return read_rgb(self.slide, level, x, y, w, h, path=self.path)


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
    reader: RegionReader = (OpenSlideReader(slide, path)
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
