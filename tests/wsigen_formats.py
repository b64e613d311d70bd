"""Generated slides in other vendors' JPEG layouts: Hamamatsu NDPI, OME-TIFF, Philips TIFF
(DICOM WSI: tests/wsigen_dicom.py; here only the frame damage).

Content is :mod:`slidegen`'s (a renderer: real H&E tissue pieces on glass); only the file
layout differs, and each layout is what the vendor's reader in OpenSlide 4 and opentile 0.22
accept (checked in tests/test_fast_formats.py):

NDPI (:func:`write_ndpi`): a classic little-endian TIFF whose IFD "next" pointers are 64-bit,
followed by the high 32 bits of each entry (how Hamamatsu files are laid out, and how OpenSlide
and tifffile detect them); one strip per pyramid level holding one baseline JPEG of the whole
level with a restart marker after every ``stripe`` pixels of each 8-pixel MCU row (4:2:2
chroma, 16x8 MCUs, like the scanners); the offsets of those restart intervals in tag 65426
(McuStarts); and Hamamatsu's tags: 65420 format flag, 65421 source lens (objective; -1 for the
macro image), 65422/65423 offsets from the slide centre, 65424 focal plane, 65427 reference,
65449 property map. The JPEG is encoded a block of MCU rows at a time (OpenCV, restart interval
set) and the blocks' restart intervals joined and renumbered: each interval resets the DC
predictors, so the bytes are those of encoding the level at once, while memory holds one block.

"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import tifffile
from slidegen import Renderer, tissue_renderer

# TIFF field types
_ASCII, _SHORT, _LONG, _RATIONAL, _SLONG, _FLOAT = 2, 3, 4, 5, 9, 11
_SIZES = {_ASCII: 1, _SHORT: 2, _LONG: 4, _RATIONAL: 8, _SLONG: 4, _FLOAT: 4}
_FMT = {_SHORT: "H", _LONG: "I", _SLONG: "i", _FLOAT: "f"}
MCU_W, MCU_H = 16, 8  # 4:2:2 chroma subsampling, as Hamamatsu scanners write
_RST = re.compile(rb"\xff[\xd0-\xd7]")
ROWS_PER_BLOCK = 256  # level rows rendered and encoded per call (a multiple of MCU_H)


def _segment_end(jpeg: bytes, marker: int) -> tuple[int, int]:
    """(start, end) of the first segment ``marker`` (e.g. 0xC0 SOF0, 0xDA SOS) in a JPEG."""
    i = 2
    while i + 4 <= len(jpeg):
        if jpeg[i] != 0xFF:
            raise ValueError(f"not a JPEG marker at {i}")
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if jpeg[i + 1] == marker:
            return i, i + 2 + length
        i += 2 + length
    raise ValueError(f"no marker {marker:#x}")


def _encode_block(rgb: np.ndarray, interval_mcus: int, quality: int) -> tuple[bytes, list[bytes]]:
    """JPEG header (SOI..SOS) and the restart intervals' entropy-coded data of one block."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_RST_INTERVAL, interval_mcus,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG block")
    data = buf.tobytes()
    _, sos_end = _segment_end(data, 0xDA)
    if not data.endswith(b"\xff\xd9"):
        raise ValueError("JPEG block does not end with EOI")
    body = data[sos_end:-2]
    cuts = [m.start() for m in _RST.finditer(body)]
    starts = [0] + [c + 2 for c in cuts]
    ends = cuts + [len(body)]
    return data[:sos_end], [body[a:b] for a, b in zip(starts, ends, strict=True)]


def ndpi_level_jpeg(render: Renderer, ds: int, width: int, height: int, stripe: int,
                    quality: int) -> tuple[bytes, list[int]]:
    """One NDPI level: its JPEG (restart interval ``stripe`` px) and the byte offset in it of
    every restart interval (McuStarts), row-major."""
    if width % stripe or stripe % MCU_W or height % MCU_H:
        raise ValueError(f"level {width}x{height} is not whole stripes of {stripe}x{MCU_H}")
    interval = stripe // MCU_W
    header = b""
    parts: list[bytes] = []
    for y0 in range(0, height, ROWS_PER_BLOCK):
        h = min(ROWS_PER_BLOCK, height - y0)
        block = render(0, y0 * ds, width, h, ds)
        head, intervals = _encode_block(block, interval, quality)
        if len(intervals) != (width // stripe) * (h // MCU_H):
            raise ValueError(f"block at row {y0}: {len(intervals)} restart intervals")
        if not header:
            s, _ = _segment_end(head, 0xC0)
            header = head[:s + 5] + struct.pack(">HH", height, width) + head[s + 9:]
        elif head[_segment_end(head, 0xC0)[1]:] != header[_segment_end(header, 0xC0)[1]:]:
            raise ValueError("JPEG tables differ between blocks")
        parts.extend(intervals)
    out = bytearray(header)
    starts = []
    for i, part in enumerate(parts):
        starts.append(len(out))
        out += part
        out += bytes([0xFF, 0xD0 + i % 8]) if i < len(parts) - 1 else b"\xff\xd9"
    return bytes(out), starts


class _TiffBuilder:
    """Minimal little-endian TIFF writer for layouts tifffile cannot write (NDPI)."""

    def __init__(self, path: Path, *, ndpi: bool) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed by finish()
        self.ndpi = ndpi
        # header; NDPI: the first-IFD offset is read as 64 bits, so 4 more zero bytes
        self.f.write(b"II*\x00" + b"\0" * (8 if ndpi else 4))
        self._link = 4  # where the next IFD's offset goes
        self._link_size = 8 if ndpi else 4

    def data(self, payload: bytes) -> int:
        """Append ``payload`` (word aligned); its offset."""
        at = self.f.seek(0, 2)
        if at % 2:
            self.f.write(b"\0")
            at += 1
        self.f.write(payload)
        return at

    def ifd(self, tags: dict[int, tuple[int, object]]) -> None:
        """Append an IFD of ``tags`` {code: (type, value(s))} and link it from the previous."""
        entries = []
        for code in sorted(tags):
            typ, value = tags[code]
            if typ == _ASCII:
                raw = str(value).encode() + b"\0"
                count = len(raw)
            elif typ == _RATIONAL:
                num, den = value  # type: ignore[misc]
                raw, count = struct.pack("<II", num, den), 1
            else:
                vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
                raw, count = struct.pack(f"<{len(vals)}{_FMT[typ]}", *vals), len(vals)
            if len(raw) > 4:
                raw = struct.pack("<I", self.data(raw))
            entries.append(struct.pack("<HHI", code, typ, count) + raw.ljust(4, b"\0"))
        body = struct.pack("<H", len(entries)) + b"".join(entries) + b"\0" * self._link_size
        if self.ndpi:  # after the next-IFD pointer: the high 32 bits of each entry's value
            body += b"\0" * (4 * len(entries))
        at = self.data(body)
        self.f.seek(self._link)
        self.f.write(struct.pack("<Q" if self.ndpi else "<I", at))
        self._link = at + 2 + 12 * len(entries)
        self.f.seek(0, 2)

    def finish(self) -> None:
        self.f.close()


def write_ndpi(path: str | Path, render: Renderer | None = None, *, width: int, height: int,
               mpp: float = 0.2265, lens: float = 40.0, levels: Sequence[int] = (1, 4, 16),
               stripe: int = 256, quality: int = 85, macro: bool = True, seed: int = 0,
               damage: Sequence[tuple[int, int]] = ()) -> Path:
    """A Hamamatsu NDPI slide of ``render``'s content (tissue pieces on glass by default).

    ``width``/``height`` are rounded up to whole stripes of the smallest level (scanners pad
    the same way; the padding renders as glass). ``stripe``: restart interval in pixels
    (a multiple of 16 dividing every level's width): OpenSlide's and tifffile's tile width.

    ``damage``: (page, restart interval) pairs whose entropy-coded data gets an end-of-image
    marker in its middle (same length: every offset stays valid; libjpeg warns "premature
    end"); OpenSlide fails on that piece of the level, the fast path delivers it white.
    """
    path = Path(path)
    top = max(levels)
    width = math.ceil(width / (stripe * top)) * stripe * top
    height = math.ceil(height / (MCU_H * top)) * MCU_H * top
    if render is None:
        render = tissue_renderer(width, height, seed=seed)
    if width > 65500 or height > 65500:
        raise ValueError("levels past JPEG's 65500 px need Hamamatsu's oversized-JPEG trick")
    res = (round(10_000 / mpp * 1000), 1000)  # pixels per cm, as a rational
    props = (f"Magnification={lens:g}\r\nSlideName=generated\r\nScannerSerialNumber=000000\r\n"
             f"Objective.Lens.Magnificant={lens:g}\r\n")
    tb = _TiffBuilder(path, ndpi=True)
    try:
        for i, ds in enumerate(levels):
            lw, lh = width // ds, height // ds
            jpeg, starts = ndpi_level_jpeg(render, ds, lw, lh, stripe, quality)
            hurt = bytearray(jpeg)
            for page, k in damage:
                if page == i:
                    mid = (starts[k] + (starts[k + 1] if k + 1 < len(starts) else len(jpeg))) // 2
                    hurt[mid:mid + 2] = b"\xff\xd9"
            jpeg = bytes(hurt)
            at = tb.data(jpeg)
            rx = (round(res[0] / ds), res[1])
            tags: dict[int, tuple[int, object]] = {
                256: (_LONG, lw), 257: (_LONG, lh), 258: (_SHORT, [8, 8, 8]),
                259: (_SHORT, 7), 262: (_SHORT, 6), 271: (_ASCII, "Hamamatsu"),
                272: (_ASCII, "C13210"), 273: (_LONG, at), 277: (_SHORT, 3),
                278: (_LONG, lh), 279: (_LONG, len(jpeg)), 282: (_RATIONAL, rx),
                283: (_RATIONAL, rx), 296: (_SHORT, 3), 305: (_ASCII, "NDP.scan 3.3.0"),
                65420: (_LONG, 1), 65421: (_FLOAT, lens), 65422: (_SLONG, 0),
                65423: (_SLONG, 0), 65424: (_SLONG, 0), 65426: (_LONG, starts),
                65427: (_ASCII, "generated-by-tests"),
            }
            if i == 0:
                tags[65449] = (_ASCII, props)
            tb.ifd(tags)
        if macro:
            mh, mw = 256, 768
            step = min(64, 2 ** math.ceil(math.log2(max(1.0, width / mw))))  # divides 64
            img = render(0, 0, mw, mh, step)
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]),
                                   [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            at = tb.data(buf.tobytes())
            tb.ifd({256: (_LONG, mw), 257: (_LONG, mh), 258: (_SHORT, [8, 8, 8]),
                    259: (_SHORT, 7), 262: (_SHORT, 6), 271: (_ASCII, "Hamamatsu"),
                    273: (_LONG, at), 277: (_SHORT, 3), 278: (_LONG, mh),
                    279: (_LONG, len(buf)), 282: (_RATIONAL, (1000, 1)),
                    283: (_RATIONAL, (1000, 1)), 296: (_SHORT, 3),
                    65420: (_LONG, 1), 65421: (_FLOAT, -1.0), 65422: (_SLONG, 0),
                    65423: (_SLONG, 0), 65424: (_SLONG, 0)})
    finally:
        tb.finish()
    return path


def ndpi_stripe_offsets(path: str | Path, level_page: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, byte counts) of each restart interval of an NDPI page, from its McuStarts."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level_page]
        return (np.asarray(page.dataoffsets, np.int64),  # type: ignore[union-attr]
                np.asarray(page.databytecounts, np.int64))  # type: ignore[union-attr]


def _tiles(render: Renderer, ds: int, lw: int, lh: int, tile: int):  # noqa: ANN202
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            yield render(tx * ds, ty * ds, tile, tile, ds)


def _hurt(path: Path, ranges: Sequence[tuple[int, int]]) -> None:
    """An end-of-image marker in the middle of each (offset, count) JPEG stream, in place
    (same length: every offset stays valid; libjpeg warns "premature end")."""
    with open(path, "r+b") as f:
        for off, n in ranges:
            f.seek(off)
            stream = f.read(n)
            _, sos_end = _segment_end(stream, 0xDA)  # the entropy-coded data's middle
            f.seek(off + (sos_end + n - 2) // 2)
            f.write(b"\xff\xd9")


def write_ome_tiff(path: str | Path, render: Renderer | None = None, *, width: int,
                   height: int, mpp: float = 0.25, unit: str = "µm",
                   levels: Sequence[int] = (1, 4, 16), tile: int = 256, quality: int = 85,
                   seed: int = 0, magnification: float | None = 40.0,
                   damage: Sequence[tuple[int, int]] = ()) -> Path:
    """An OME-TIFF pyramid as Bio-Formats/QuPath write it: full resolution in the main IFD,
    reduced levels in its SubIFDs (tifffile's writer), JPEG tiles, OME-XML with PhysicalSizeX/Y
    in ``unit`` (``mpp`` is in microns, converted). ``damage``: (level, tile index) pairs whose
    JPEG stream gets an early end-of-image marker."""
    path = Path(path)
    if render is None:
        render = tissue_renderer(width, height, seed=seed)
    per_um = {"µm": 1.0, "nm": 1e3, "mm": 1e-3}[unit]
    md: dict[str, object] = {"axes": "YXS", "PhysicalSizeX": mpp * per_um,
                             "PhysicalSizeXUnit": unit, "PhysicalSizeY": mpp * per_um,
                             "PhysicalSizeYUnit": unit}
    ox = tifffile.OmeXml()
    ox.addimage(np.uint8, (height, width, 3), (1, 1, 1, height, width, 3), **md)
    xml = ox.tostring()
    if magnification is not None:  # tifffile's OmeXml writes no Instrument: added here
        inst = (f'<Instrument ID="Instrument:0"><Objective ID="Objective:0" '
                f'NominalMagnification="{magnification:g}"/></Instrument>')
        xml = xml.replace("<Image ", inst + "<Image ", 1)
    bigtiff = width * height * 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=False) as tw:
        for i, ds in enumerate(levels):
            lw, lh = math.ceil(width / ds), math.ceil(height / ds)
            extra: dict[str, object] = {"subfiletype": 1, "metadata": None}
            if i == 0:  # tifffile's own OME writer would add no Instrument
                extra = {"subifds": len(levels) - 1, "description": xml.encode(),
                         "metadata": None}
            tw.write(_tiles(render, ds, lw, lh, tile), shape=(lh, lw, 3), dtype=np.uint8,
                     tile=(tile, tile), photometric="rgb", compression="jpeg",
                     compressionargs={"level": quality}, **extra)  # type: ignore[arg-type]
    if damage:
        with tifffile.TiffFile(path) as tif:
            pages = [lv.keyframe for lv in tif.series[0].levels]
            _hurt(path, [(int(pages[lv].dataoffsets[k]), int(pages[lv].databytecounts[k]))
                         for lv, k in damage])
    return path


PHILIPS_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<DataObject ObjectType="DPUfsImport">
<Attribute Name="DICOM_MANUFACTURER" Group="0x0008" Element="0x0070" PMSVR="IString">\
PHILIPS</Attribute>
<Attribute Name="PIM_DP_UFS_BARCODE" Group="0x301D" Element="0x1002" PMSVR="IString">\
Z2VuZXJhdGVk</Attribute>
<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" \
PMSVR="IDataObjectArray"><Array>
<DataObject ObjectType="DPScannedImage">
<Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" PMSVR="IString">WSI\
</Attribute>
<Attribute Name="DICOM_DERIVATION_DESCRIPTION" Group="0x0008" Element="0x2111" \
PMSVR="IString">tiff-useBigTIFF=1-useRgb=0-levels={levels}-processing=0-q80-\
sourceFilename="generated"</Attribute>
<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">\
&quot;{s0:.6g}&quot; &quot;{s0:.6g}&quot;</Attribute>
<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" \
PMSVR="IDataObjectArray"><Array>
{reps}
</Array></Attribute>
</DataObject>
</Array></Attribute>
</DataObject>
"""
PHILIPS_REP = """<DataObject ObjectType="PixelDataRepresentation">
<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_NUMBER" Group="0x1001" Element="0x8B02" \
PMSVR="IUInt16">{i}</Attribute>
<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">\
&quot;{s:.6g}&quot; &quot;{s:.6g}&quot;</Attribute>
</DataObject>"""


def write_philips_tiff(path: str | Path, render: Renderer | None = None, *, width: int,
                       height: int, mpp: float = 0.25, levels: Sequence[int] = (1, 4, 16),
                       tile: int = 256, quality: int = 85, seed: int = 0,
                       damage: Sequence[tuple[int, int]] = ()) -> Path:
    """A Philips TIFF export as OpenSlide's philips driver reads it: Software "Philips...",
    the DPUfsImport XML (pixel spacing in mm of the slide and of every level) as the first
    page's ImageDescription, tiled JPEG pages of successive levels, every page padded to
    whole tiles (OpenSlide clips the levels below the first to level 0 / downsample).
    ``damage``: (level, tile index) pairs whose JPEG stream gets an early end-of-image marker.
    """
    path = Path(path)
    if render is None:
        render = tissue_renderer(width, height, seed=seed)
    s0 = mpp / 1000.0  # mm
    reps = "\n".join(PHILIPS_REP.format(i=i, s=s0 * ds) for i, ds in enumerate(levels))
    xml = PHILIPS_XML.format(levels=",".join(str(round(40 / ds)) for ds in levels), s0=s0,
                             reps=reps)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw:
        for i, ds in enumerate(levels):
            lw = math.ceil(math.ceil(width / ds) / tile) * tile  # padded to whole tiles
            lh = math.ceil(math.ceil(height / ds) / tile) * tile
            tw.write(_tiles(render, ds, lw, lh, tile), shape=(lh, lw, 3), dtype=np.uint8,
                     tile=(tile, tile), photometric="rgb", compression="jpeg",
                     compressionargs={"level": quality}, metadata=None,
                     software="Philips DP v1.0", description=xml if i == 0 else None,
                     subfiletype=0 if i == 0 else 1)
    if damage:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            _hurt(path, [(int(pages[lv].dataoffsets[k]), int(pages[lv].databytecounts[k]))  # type: ignore[union-attr]
                         for lv, k in damage])
    return path


def dicom_frame_ranges(path: str | Path) -> list[tuple[int, int]]:
    """(file offset, bytes) of each JPEG frame of a DICOM WSI instance, found with pydicom's
    own frame parser (independent of the reader's item walk): each frame's bytes located in
    the file."""
    import pydicom
    from pydicom.encaps import generate_fragmented_frames

    ds = pydicom.dcmread(path)
    blob = Path(path).read_bytes()
    out, at = [], 0
    for parts in generate_fragmented_frames(ds.PixelData,
                                            number_of_frames=int(ds.NumberOfFrames)):
        frame = b"".join(parts)
        at = blob.index(frame, at)
        out.append((at, len(frame)))
        at += len(frame)
    return out


def damage_dicom_frames(path: str | Path, frames: Sequence[int]) -> Path:
    """Give frames ``frames`` of a DICOM instance an early end-of-image marker, in place."""
    path = Path(path)
    ranges = dicom_frame_ranges(path)
    _hurt(path, [ranges[i] for i in frames])
    return path
