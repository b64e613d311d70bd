"""The TIFF directory chain, walked with plain byte reads from any source.

Two places need a TIFF's structure without trusting a library to parse a damaged or remote
file: the truncation check when a slide opens (:func:`pipeline.slides._tiff_cut`: does
anything point past the end?) and range reads (:mod:`pipeline.remote`: which bytes are the
directory, where are the tiles?). tifffile parses far more, but it reads a whole file's
structure through one file handle and reports a cut file in its own words; this walk reads
only the directories and tag values, through a ``read(offset, n)`` callable, and says
exactly where a file points past its end.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# TIFF field types -> bytes per value (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED,
# SSHORT, SLONG, SRATIONAL, FLOAT, DOUBLE, IFD, LONG8, SLONG8, IFD8)
FIELD_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
               13: 4, 16: 8, 17: 8, 18: 8}
STRIP_OFFSETS, STRIP_COUNTS, TILE_OFFSETS, TILE_COUNTS = 273, 279, 324, 325
DATA_TAGS = ((STRIP_OFFSETS, STRIP_COUNTS), (TILE_OFFSETS, TILE_COUNTS))
MAX_PAGES = 100_000  # a directory chain longer than this is a loop

Read = Callable[[int, int], bytes]


class PastTheEnd(Exception):
    """The file points past its end (cut short); the message says where."""


@dataclass
class Directory:
    """One IFD of the main chain: its byte range and where each tag's values lie."""

    index: int
    start: int
    end: int
    order: str  # struct byte order: "<" or ">"
    # tag -> (field type, count, byte offset of the values: in the entry or out of line)
    tags: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    out_of_line: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of values

    def ints(self, tag: int, read: Read) -> np.ndarray:
        """A SHORT, LONG or LONG8 tag's values as int64 (empty if absent or another type)."""
        if tag not in self.tags:
            return np.zeros(0, np.int64)
        typ, count, at = self.tags[tag]
        code = {3: "u2", 4: "u4", 16: "u8"}.get(typ)
        if code is None:
            return np.zeros(0, np.int64)
        dt = np.dtype(code).newbyteorder(self.order)
        return np.frombuffer(read(at, count * dt.itemsize), dt).astype(np.int64)

    def first(self, tag: int, read: Read) -> int:
        v = self.ints(tag, read)
        return int(v[0]) if len(v) else 0

    def data(self, read: Read) -> tuple[np.ndarray, np.ndarray] | None:
        """(offsets, byte counts) of the page's tiles, else of its strips; None if neither."""
        for offs_tag, counts_tag in (DATA_TAGS[1], DATA_TAGS[0]):
            if offs_tag in self.tags and counts_tag in self.tags:
                offs, counts = self.ints(offs_tag, read), self.ints(counts_tag, read)
                if len(offs) == len(counts):
                    return offs, counts
        return None


def walk(read: Read, size: int, *, data: bool = True) -> list[Directory] | None:
    """The main IFD chain of a classic or BigTIFF file of ``size`` bytes; None for a file
    that is not a TIFF. Raises :class:`PastTheEnd` where a directory, an out-of-line tag
    value or (``data``) a page's pixel data lies past the end.

    Only "past the end" is reported, never a guess about a structure it does not know
    (NDPI's 64-bit offset extension reads as smaller offsets, never as larger ones).
    """
    head = read(0, 16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None:
        return None
    if len(head) < 8:
        raise PastTheEnd(f"{size:,} bytes, less than a TIFF header")
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
    dirs: list[Directory] = []
    seen: set[int] = set()
    while ifd and ifd not in seen and len(dirs) < MAX_PAGES:
        seen.add(ifd)
        page = len(dirs)
        if ifd + count_len > size:
            raise PastTheEnd(f"{size:,} bytes, but TIFF directory {page} starts at byte {ifd:,}")
        n = struct.unpack(order + count_fmt, read(ifd, count_len))[0]
        end = ifd + count_len + n * entry + off_len
        if end > size:
            raise PastTheEnd(f"{size:,} bytes, but TIFF directory {page} (at byte {ifd:,}) "
                             f"ends at byte {end:,}")
        raw = read(ifd + count_len, n * entry + off_len)
        d = Directory(page, ifd, end, order)
        for i in range(n):
            e = raw[i * entry:(i + 1) * entry]
            tag, typ = struct.unpack(order + "HH", e[:4])
            cnt = struct.unpack(order + off_fmt, e[4:4 + off_len])[0]
            nbytes = FIELD_BYTES.get(typ, 1) * cnt
            at = ifd + count_len + i * entry + 4 + off_len  # the value sits in the entry
            if nbytes > off_len:
                at = struct.unpack(order + off_fmt, e[4 + off_len:4 + 2 * off_len])[0]
                if at + nbytes > size:
                    raise PastTheEnd(f"{size:,} bytes, but TIFF directory {page} places tag "
                                     f"{tag} up to byte {at + nbytes:,}")
                d.out_of_line.append((at, at + nbytes))
            d.tags[tag] = (typ, cnt, at)
        if data:
            for offs_tag, counts_tag in DATA_TAGS:
                if offs_tag in d.tags and counts_tag in d.tags:
                    offs, counts = d.ints(offs_tag, read), d.ints(counts_tag, read)
                    if len(offs) == len(counts) and (counts > 0).any():
                        # empty (sparse) tiles may carry any offset
                        last = int((offs + counts)[counts > 0].max())
                        if last > size:
                            raise PastTheEnd(f"{size:,} bytes, but TIFF page {page} places "
                                             f"image data up to byte {last:,}")
        dirs.append(d)
        ifd = struct.unpack(order + off_fmt, raw[n * entry:n * entry + off_len])[0]
    return dirs
