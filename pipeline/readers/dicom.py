"""Direct reader of DICOM WSI series: the JPEG frames of each pyramid level's instance.

Why: OpenSlide 4 reads DICOM WSI (through libdicom) a frame at a time through its tile cache,
like any tiled TIFF. A level of a series is one VL Whole Slide Microscopy instance whose
frames, with ``DimensionOrganizationType`` TILED_FULL, are the level's tiles in row-major
order; with a JPEG baseline transfer syntax each frame is a complete JPEG stored as one item
of the encapsulated Pixel Data. Those items are byte ranges of the .dcm file, found once at
open by walking the item headers (8 bytes each; pydicom gives where Pixel Data starts), so the
frames are read with ``pread`` and decoded by the TIFF reader's strict libjpeg-turbo path
(:class:`~pipeline.readers.tiff.TiffJpegReader`: region assembly, reduced-size and stacked
decoding, seam cache, damage log, checks).

Levels live in different files (one instance each), so this reader keeps one descriptor per
level and overrides only the byte fetch. Which files: the slide's path is the instance
OpenSlide opened (pipeline.fileset stages a series as its folder and names the largest .dcm);
its series is the VOLUME instances beside it with the same SeriesInstanceUID. Each level the
tiling reads must be one of them with OpenSlide's dimensions, one focal plane and optical path,
else OpenSlide reads the slide. A clean frame per level must decode to OpenSlide's pixels.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide

from pipeline.readers.tiff import TiffJpegReader, TiffReadError, _Level

log = logging.getLogger(__name__)

VENDOR = "dicom"
VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
# JPEG baseline (process 1) and extended (2/4): each frame a self-contained JPEG stream
JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_SEQ_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)
_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class _DicomLevel(_Level):
    """A level served from one instance's frames (``offsets``/``counts`` are frame ranges)."""

    file: str  # the instance holding this level's frames


def frame_ranges(path: str | os.PathLike[str], pixel_data_at: int, frames: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(file offset, byte count) of each frame of an encapsulated Pixel Data value starting
    at ``pixel_data_at``: the items after the Basic Offset Table, one frame each (raises
    ValueError when the item count is not ``frames``: fragmented frames are not read here)."""
    offs, counts = [], []
    with open(path, "rb") as fh:
        fh.seek(pixel_data_at)
        head = fh.read(8)
        if len(head) != 8 or head[:4] != _ITEM:
            raise ValueError("Pixel Data does not start with the Basic Offset Table item")
        at = pixel_data_at + 8 + struct.unpack("<I", head[4:])[0]
        size = os.fstat(fh.fileno()).st_size
        while True:
            fh.seek(at)
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"Pixel Data cut short at byte {at:,} (file {size:,} bytes)")
            if head[:4] == _SEQ_END:
                break
            if head[:4] != _ITEM:
                raise ValueError(f"no item tag at byte {at:,} of Pixel Data")
            n = struct.unpack("<I", head[4:])[0]
            if at + 8 + n > size:
                raise ValueError(f"frame {len(offs)} runs past the end of the file")
            offs.append(at + 8)
            counts.append(n)
            at += 8 + n
            if len(offs) > frames:
                break
    if len(offs) != frames:
        raise ValueError(f"{len(offs)} fragments for {frames} frames (fragmented frames)")
    return np.asarray(offs, np.int64), np.asarray(counts, np.int64)


def _instances(path: str) -> list[tuple[str, object]]:
    """(file, dataset without pixels) of the VOLUME instances of ``path``'s series."""
    import pydicom

    mine = pydicom.dcmread(path, stop_before_pixels=True)
    series = str(mine.get("SeriesInstanceUID", ""))
    out = []
    for f in sorted(Path(path).parent.glob("*.dcm")):
        try:
            ds = mine if str(f) == str(path) else pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - a damaged sibling: OpenSlide's business
            continue
        kind = list(ds.get("ImageType") or [])
        if (str(ds.get("SOPClassUID", "")) == VL_WSI and str(ds.get("SeriesInstanceUID", ""))
                == series and len(kind) > 2 and kind[2] == "VOLUME"):
            out.append((str(f), ds))
    return out


def _level(file: str, ds: object, level: int) -> tuple[_DicomLevel | None, str]:
    """One instance as a level, or None and why it is not plain tiled JPEG."""
    import pydicom

    g = ds.get  # type: ignore[attr-defined]
    syntax = str(ds.file_meta.TransferSyntaxUID)  # type: ignore[attr-defined]
    if syntax not in JPEG_SYNTAXES:
        name = getattr(pydicom.uid.UID(syntax), "name", syntax)
        return None, f"level {level} transfer syntax {name} is not JPEG baseline"
    if str(g("DimensionOrganizationType", "")) != "TILED_FULL":
        return None, f"level {level} is not TILED_FULL (sparse tiles: OpenSlide places them)"
    if int(g("TotalPixelMatrixFocalPlanes", 1) or 1) != 1 or \
            int(g("NumberOfOpticalPaths", 1) or 1) != 1:
        return None, f"level {level} has several focal planes or optical paths"
    if (int(g("SamplesPerPixel", 0)), int(g("BitsAllocated", 0))) != (3, 8):
        return None, f"level {level} is not 8-bit 3-sample"
    photometric = str(g("PhotometricInterpretation", ""))
    tw, th = int(g("Columns")), int(g("Rows"))
    width, height = int(g("TotalPixelMatrixColumns")), int(g("TotalPixelMatrixRows"))
    across, down = -(-width // tw), -(-height // th)
    frames = int(g("NumberOfFrames", 1))
    if frames != across * down:
        return None, f"level {level} has {frames} frames, expected {across * down}"
    full = pydicom.dcmread(file, defer_size=256)
    raw = full.get_item(0x7FE00010, keep_deferred=True)
    if raw is None or getattr(raw, "value_tell", None) is None:
        return None, f"level {level} has no encapsulated Pixel Data"
    try:
        offs, counts = frame_ranges(file, int(raw.value_tell), frames)
    except ValueError as err:
        return None, f"level {level}: {err}"
    with open(file, "rb") as fh:
        fh.seek(int(offs[0]))
        first = fh.read(min(int(counts[0]), 64))
    if not first.startswith(b"\xff\xd8"):
        return None, f"level {level} frame 0 is not a JPEG stream"
    jfif, adobe = b"JFIF" in first, b"Adobe" in first
    colorspace: str | None = None
    marker = b""
    if not (jfif or adobe):  # no marker: the photometric interpretation says what it holds
        colorspace = "RGB" if photometric == "RGB" else "YCBCR"
        marker = _ADOBE_RGB if colorspace == "RGB" else _JFIF
    lv = _DicomLevel(page=level, width=width, height=height, tile_w=tw, tile_h=th,
                     across=across, offsets=offs, counts=counts, tables=None,
                     colorspace=colorspace, header=b"\xff\xd8" + marker, file=file)
    return lv, ""


class DicomReader(TiffJpegReader):
    """Integer boxes of DICOM WSI levels, assembled from their directly decoded JPEG frames."""

    name = "dicom"

    def __init__(self, path: str, levels: Sequence[_DicomLevel | None], *,
                 dct_downscale: bool = False) -> None:
        super().__init__(path, levels, dct_downscale=dct_downscale)
        self._fds: dict[str, int] = {}
        for lv in levels:
            if lv is not None and lv.file not in self._fds:
                self._fds[lv.file] = os.open(lv.file, os.O_RDONLY)

    def _fetch(self, lv: _Level, ty: int, txs: list[int]) -> list[memoryview | None]:
        """The frames (tx, ty) of one row of the level's instance: one ``pread`` for the run
        when they lie close together (an encoder writes them in order), else one each."""
        assert isinstance(lv, _DicomLevel)
        fd = self._fds.get(lv.file)
        if fd is None or self._fd is None:
            raise ValueError("reader is closed")
        idx = [ty * lv.across + tx for tx in txs]
        offs = lv.offsets[idx].tolist()
        counts = lv.counts[idx].tolist()
        lo, hi = min(offs), max(o + c for o, c in zip(offs, counts, strict=True))
        if hi - lo <= 2 * sum(counts) + (64 << 10):
            spans = [(lo, hi)]
        else:
            spans = sorted((o, o + c) for o, c in zip(offs, counts, strict=True))
        buf = memoryview(self._scratch("bytes", (sum(b - a for a, b in spans),)))
        views: list[tuple[int, memoryview]] = []
        at = 0
        for a, b in spans:
            view = buf[at:at + b - a]
            got = os.preadv(fd, [view], a)
            if got != b - a:
                raise TiffReadError(f"frames of row {ty} of level {lv.page} are truncated: "
                                    f"read {got} of {b - a} bytes at offset {a}")
            views.append((a, view))
            at += b - a
        out: list[memoryview | None] = []
        for o, c in zip(offs, counts, strict=True):
            for a, view in reversed(views):
                if a <= o:
                    out.append(view[o - a:o - a + c])
                    break
        return out

    def close(self) -> None:
        """Release the descriptors of every level's instance; safe to call more than once."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        super().close()


def open_dicom_reader(path: str, slide: openslide.AbstractSlide, levels: Sequence[int], *,
                      dct_factor: int = 1) -> tuple[DicomReader | None, str]:
    """A fast reader for ``levels`` of an OpenSlide-opened DICOM WSI series, or (None, why)."""
    from pipeline.readers.tiff import verified

    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR)
    if vendor != VENDOR:
        return None, f"vendor {vendor!r} is not DICOM"
    try:
        instances = _instances(path)
    except Exception as err:  # noqa: BLE001 - pydicom cannot parse it: OpenSlide did
        return None, f"pydicom cannot read the series ({type(err).__name__}: {err})"
    by_size: dict[tuple[int, int], list[tuple[str, object]]] = {}
    for f, ds in instances:
        dims = (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))  # type: ignore[attr-defined]
        by_size.setdefault(dims, []).append((f, ds))
    found: list[_DicomLevel | None] = [None] * slide.level_count
    for level in levels:
        dims = tuple(int(v) for v in slide.level_dimensions[level])
        match = by_size.get(dims, [])  # type: ignore[arg-type]
        if len(match) != 1:
            return None, (f"level {level} {dims}: {len(match)} VOLUME instances of that size "
                          "in the series")
        lv, why = _level(*match[0], level)
        if lv is None:
            return None, why
        found[level] = lv
    reader = DicomReader(path, found)
    got, why = verified(reader, slide, levels, dct_factor)
    assert got is None or isinstance(got, DicomReader)
    return got, why
