"""Range reads of TIFF-family slides in object storage: the tiles under tissue, not the file.

Why: staging copies a whole slide to scratch before its first tile, though tiling decodes only
the file tiles under the kept tissue tiles of one level (plus a small thumbnail level). For
Aperio SVS and generic tiled TIFF read by the direct JPEG reader (:mod:`pipeline.readers.tiff`)
the rest of the file is never needed.

How (:func:`slide_bytes`):

1. The object's fingerprint is checked against the planned one (as staging does).
2. Its TIFF directory is walked remotely (a small block cache of ranged GETs): every IFD and
   out-of-line tag value (tile offsets and byte counts, JPEGTables, ImageDescription).
3. A sparse local *skeleton* of the object's full size is written holding only what OpenSlide
   and our code read before tiles are read: those directory bytes, the smallest level's tiles
   (OpenSlide's quickhash reads them at open), the first tile and the few tiles nearest the
   centre of every tiled page (the TIFF reader's colour sniff and self-check against
   OpenSlide), and the whole thumbnail level. Scratch is reserved for those bytes, not the
   file size. ``tile_slide(skeleton)`` then works unchanged: OpenSlide opens and
   fingerprints it, the fast reader self-checks on real bytes.
4. Before handing it over, the same reader choice tiling will make is tried on the skeleton;
   only a slide the fast reader takes (levels to read and thumbnail) is read this way, since
   OpenSlide reading the skeleton's holes would see zeros. Anything unexpected (not a TIFF,
   another vendor, OpenSlide refusing it, the fast reader declining, no mpp, ...) stages the
   whole file as before (:func:`pipeline.storage.staged_slide`), the reason in the read note.
5. While tiles are read, :class:`RangeSource` serves the reader's tile bytes: from the
   skeleton where it holds them, else from ranged GETs of coalesced runs of the planned tiles
   (neighbours within ``GAP_BYTES``, at most ``CHUNK_BYTES`` a request), ``FETCH_THREADS`` at
   once, ahead of the decoder in plan order within a window of ``WINDOW_BYTES`` not yet used.
6. After the last tile the fingerprint is checked again (:meth:`SlideBytes.verify`, called by
   the tiling stage before the slide's last chunk goes out): a slide rewritten while its tiles
   were read never commits, as with a local file.

Retries: every GET goes through :func:`pipeline.storage.with_retries` (transient errors,
``storage.retries`` / ``retry_budget_s``); a read that keeps failing fails the slide as a
staging error ("could not read ... (range reads)"), as a failed download does.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openslide

from pipeline import tiffdir
from pipeline.config import StorageConfig, TilingConfig
from pipeline.geometry import read_geometry
from pipeline.readers import tiff
from pipeline.slides import SlideError, open_slide, resolve_mpp
from pipeline.storage import (
    ScratchBudget,
    StagingError,
    StorageUnavailable,
    check_unchanged,
    default_scratch_dir,
    fingerprint_from_info,
    protocol_of,
    source_fingerprint,
    staged_slide,
    url_to_fs,
    with_retries,
)

log = logging.getLogger(__name__)

# Object stores where ranged GETs are cheap and concurrent (storage.range_reads applies here).
RANGE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
SUFFIXES = (".svs", ".tif", ".tiff")  # Aperio and generic tiled TIFF: the direct reader's
CHUNK_BYTES = 4 << 20  # most bytes of one ranged GET of tiles (20 ms + 40 ms at 100 MB/s)
GAP_BYTES = 40 << 10  # neighbouring tiles this close share a GET (two tissue tiles)
WINDOW_BYTES = 32 << 20  # fetched but not yet decoded, at most (worker memory)
GAP_EXTRA = 0.2  # coalescing may fetch at most this much more than the tiles themselves
# Chunks whose tiles were all handed out stay this long (oldest out first): a seam tile the
# reader's decoded-seam cache no longer holds is asked for again, usually soon after.
SPENT_BYTES = 16 << 20
FETCH_THREADS = 8  # GETs in flight: covers latency x bandwidth (20 ms x 100 MB/s = 2 MB)
BLOCK_BYTES = 64 << 10  # directory reads: one block per GET (kept in the skeleton)
CHECK_TILES = 8  # tiles nearest a page's centre kept for the reader's self-check
THUMB_MAX_BYTES = 64 << 20  # a thumbnail level larger than this: stage the file instead
LAG_CHUNKS = 64  # chunks this far behind the reading are dropped when the window is full


class Decline(Exception):
    """This slide is not read by ranges (the reason); it is staged whole instead."""


def wants_ranges(uri: str, storage: StorageConfig, tiling: TilingConfig) -> bool:
    """Whether ``uri`` is tried with range reads: on, an object store, a TIFF-family file
    name, and a reader choice that may use the direct TIFF reader."""
    return (storage.range_reads and protocol_of(uri) in RANGE_PROTOCOLS
            and uri.lower().endswith(SUFFIXES) and tiling.reader != "openslide")


class _Remote:
    """Ranged GETs of one object, with retries, counting what they fetched."""

    def __init__(self, uri: str, storage: StorageConfig, size: int) -> None:
        self.uri = uri
        self.storage = storage
        self.fs, self.path = url_to_fs(uri, storage)
        self.size = size
        self.bytes = 0
        self.requests = 0
        self._lock = threading.Lock()

    def fetch(self, a: int, b: int) -> bytes:
        """Bytes [a, b) of the object; a short body is retried as a transient error."""
        def get() -> bytes:
            data = self.fs.cat_file(self.path, start=a, end=b)
            if len(data) != b - a:
                raise ConnectionError(f"short read: {len(data)} of {b - a} bytes at {a}")
            return data

        data = with_retries(get, self.storage, what=f"read bytes {a}-{b} of {self.uri}")
        with self._lock:
            self.bytes += len(data)
            self.requests += 1
        return data


class _Blocks:
    """A block cache over a :class:`_Remote` for walking the TIFF directory."""

    def __init__(self, remote: _Remote, block: int = BLOCK_BYTES) -> None:
        self.remote = remote
        self.block = block
        self.blocks: dict[int, bytes] = {}

    def read(self, off: int, n: int) -> bytes:
        if n <= 0 or off >= self.remote.size:
            return b""
        end = min(off + n, self.remote.size)
        first, last = off // self.block, (end - 1) // self.block
        missing = [i for i in range(first, last + 1) if i not in self.blocks]
        if missing:
            a = missing[0] * self.block
            b = min((missing[-1] + 1) * self.block, self.remote.size)
            data = self.remote.fetch(a, b)
            for i in range(missing[0], missing[-1] + 1):
                self.blocks[i] = data[(i - missing[0]) * self.block:
                                      (i - missing[0] + 1) * self.block]
        raw = b"".join(self.blocks[i] for i in range(first, last + 1))
        return raw[off - first * self.block:end - first * self.block]


@dataclass
class _Page:
    """What the skeleton needs of one TIFF page (IFD of the main chain)."""

    width: int = 0
    length: int = 0
    tile_w: int = 0
    tile_h: int = 0
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def tiled(self) -> bool:
        return self.tile_w > 0 and self.tile_h > 0 and len(self.offsets) > 0

    @property
    def data_bytes(self) -> int:
        return int(self.counts.sum())

    def ranges(self, idx: np.ndarray | None = None) -> list[tuple[int, int]]:
        """[start, end) of the non-empty data of tiles ``idx`` (all when None)."""
        offs = self.offsets if idx is None else self.offsets[idx]
        counts = self.counts if idx is None else self.counts[idx]
        keep = counts > 0
        return list(zip(offs[keep].tolist(), (offs + counts)[keep].tolist(), strict=True))

    def centre_tiles(self, n: int) -> np.ndarray:
        """The non-empty tiles nearest the centre, in the order the TIFF reader's self-check
        tries them (``TiffJpegReader._clean_tiles``), and the first non-empty tile."""
        across = -(-self.width // self.tile_w)
        filled = np.nonzero(self.counts > 0)[0]
        if not len(filled):
            return filled
        down = len(self.counts) // across
        rows, cols = filled // across, filled % across
        order = filled[np.argsort(np.abs(rows - down // 2) + np.abs(cols - across // 2),
                                  kind="stable")]
        return np.unique(np.r_[filled[:1], order[:n]])


def _walk(blocks: _Blocks) -> tuple[list[_Page], list[tuple[int, int]]]:
    """The main IFD chain's pages and the byte ranges of the directory (header, IFDs and
    out-of-line tag values); raises Decline for a file that is not a TIFF we can walk."""
    try:
        dirs = tiffdir.walk(blocks.read, blocks.remote.size)
    except tiffdir.PastTheEnd as cut:
        raise Decline(f"truncated: {cut}") from None
    if dirs is None:
        raise Decline("not a TIFF file")
    extents = [(0, 16)]
    pages: list[_Page] = []
    for d in dirs:
        extents.append((d.start, d.end))
        extents += d.out_of_line
        page = _Page()
        page.width, page.length = d.first(256, blocks.read), d.first(257, blocks.read)
        page.tile_w, page.tile_h = d.first(322, blocks.read), d.first(323, blocks.read)
        found = d.data(blocks.read)
        if found is not None and (page.tile_w > 0) == (tiffdir.TILE_OFFSETS in d.tags):
            page.offsets, page.counts = found
        pages.append(page)
    return pages, extents


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _disk_bytes(extents: list[tuple[int, int]]) -> int:
    """Scratch a sparse file with these extents takes: each rounded out to 4 KiB blocks."""
    return sum(((b + 4095) // 4096 - a // 4096) * 4096 for a, b in extents)


@dataclass
class _Chunk:
    """One coalesced GET of planned tiles."""

    start: int
    end: int
    index: int
    pending: int = 0  # planned tiles of it not yet handed out
    taken: set[int] = field(default_factory=set)  # offsets of the tiles handed out
    submitted: bool = False
    freed: bool = False
    data: bytes | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        return self.end - self.start


def _coalesce(tiles: list[tuple[int, int]], gap: int) -> tuple[list[_Chunk], list[list[int]]]:
    """Runs of (offset, count) tiles in plan order, each a GET: neighbours at most ``gap``
    bytes apart, at most ``CHUNK_BYTES`` a run; and the tile offsets of each run."""
    chunks: list[_Chunk] = []
    members: list[list[int]] = []
    for o, c in tiles:
        last = chunks[-1] if chunks else None
        if (last is not None and 0 <= o - last.end <= gap
                and o + c - last.start <= CHUNK_BYTES):
            last.end = o + c
            members[-1].append(o)
        else:
            chunks.append(_Chunk(o, o + c, len(chunks)))
            members.append([o])
    return chunks, members


class RangeSource:
    """Tile bytes of a remote slide for :class:`pipeline.readers.tiff.TiffJpegReader`: from
    the local skeleton where it holds them, else ranged GETs prefetched in plan order."""

    def __init__(self, remote: _Remote, skeleton: str, extents: list[tuple[int, int]]) -> None:
        self.remote = remote
        self._fd: int | None = os.open(skeleton, os.O_RDONLY)
        self._starts = [a for a, _ in extents]
        self._ends = [b for _, b in extents]
        self._chunks: list[_Chunk] = []
        self._of: dict[int, _Chunk] = {}  # planned tile offset -> its chunk
        self._cond = threading.Condition()
        self._window = 0  # bytes fetched or in flight, not yet handed out
        self._frontier = 0  # highest chunk index handed out from
        self._spent: deque[_Chunk] = deque()  # all handed out, bytes kept (SPENT_BYTES)
        self._spent_bytes = 0
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._feeder: threading.Thread | None = None
        self.misses = 0  # tiles read outside the plan (fetched on demand)
        self.local_reads = 0  # tiles served from the skeleton

    def _local(self, o: int, c: int) -> bool:
        j = bisect.bisect_right(self._starts, o) - 1
        return j >= 0 and o + c <= self._ends[j]

    def plan(self, offsets: np.ndarray, counts: np.ndarray) -> None:
        """Coalesce the planned tiles into GETs and start fetching them ahead.

        The widest gap (``GAP_BYTES``, a quarter of it, ..., none) whose extra bytes stay
        within ``GAP_EXTRA`` of the tiles' own, and whose total with the skeleton stays under
        the file's size: fewer GETs (client CPU, request cost) without giving up the point.
        """
        tiles = [(o, c) for o, c in zip(offsets.tolist(), counts.tolist(), strict=True)
                 if c > 0 and not self._local(o, c)]
        tiles = list(dict(tiles).items())  # each tile once, in plan order
        own = sum(c for _, c in tiles)
        held = sum(b - a for a, b in zip(self._starts, self._ends, strict=True))
        for gap in (GAP_BYTES, GAP_BYTES // 4, GAP_BYTES // 16, 0):
            chunks, members = _coalesce(tiles, gap)
            total = sum(ch.size for ch in chunks)
            if gap == 0 or (total <= own * (1 + GAP_EXTRA)
                            and held + total < 0.95 * self.remote.size):
                break
        for ch, offs in zip(chunks, members, strict=True):
            ch.pending = len(offs)
            for o in offs:
                self._of[o] = ch
        with self._cond:
            self._chunks = chunks
        if not chunks:
            return
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="range-get")
        self._feeder = threading.Thread(target=self._feed, name="range-feed", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        """Submit the chunks in plan order while the window has room."""
        for ch in self._chunks:
            with self._cond:
                while (not self._closed and self._window > 0
                       and self._window + ch.size > WINDOW_BYTES):
                    if not self._evict_behind():
                        self._cond.wait(0.05)
                if self._closed:
                    return
                if ch.submitted:
                    continue
                self._submit(ch)

    def _evict_behind(self) -> bool:
        """Drop fetched chunks far behind the reading (tiles the plan had but the reader did
        not ask for): they would hold the window forever. Caller holds the lock."""
        freed = False
        for ch in self._chunks[:max(0, self._frontier - LAG_CHUNKS)]:
            if ch.submitted and ch.done.is_set() and not ch.freed:
                self._free(ch)
                freed = True
        return freed

    def _submit(self, ch: _Chunk) -> None:
        """Start fetching ``ch`` (caller holds the lock)."""
        ch.submitted = True
        self._window += ch.size
        assert self._pool is not None
        self._pool.submit(self._load, ch)

    def _load(self, ch: _Chunk) -> None:
        try:
            ch.data = self.remote.fetch(ch.start, ch.end)
        except BaseException as err:  # noqa: BLE001 - handed to the reader that waits on it
            ch.error = err
        ch.done.set()

    def _free(self, ch: _Chunk) -> None:
        """Out of the window; its bytes kept a while among the spent (caller holds the lock)."""
        ch.freed = True
        self._window -= ch.size
        self._cond.notify_all()
        if ch.data is None:
            return
        self._spent.append(ch)
        self._spent_bytes += ch.size
        while self._spent_bytes > SPENT_BYTES:
            old = self._spent.popleft()
            old.data = None
            self._spent_bytes -= old.size

    def get(self, offsets: list[int], counts: list[int]) -> list[memoryview | None]:
        """The bytes of each tile: skeleton, prefetched chunk, or fetched now. A row's tiles
        of one chunk are taken together (one wait, one lock: a row is ~10 tiles)."""
        out: list[memoryview | None] = [None] * len(offsets)
        missing: list[int] = []  # positions in out
        by_chunk: dict[int, tuple[_Chunk, list[int]]] = {}
        for i, (o, c) in enumerate(zip(offsets, counts, strict=True)):
            if c <= 0:
                continue
            if self._local(o, c):
                if self._fd is None:
                    raise ValueError("range source is closed")
                out[i] = memoryview(os.pread(self._fd, c, o))
                self.local_reads += 1
                continue
            ch = self._of.get(o)
            if ch is None:
                missing.append(i)
            else:
                by_chunk.setdefault(ch.index, (ch, []))[1].append(i)
        for ch, idx in by_chunk.values():
            views = self._take(ch, [(offsets[i], counts[i]) for i in idx])
            for i, view in zip(idx, views, strict=True):
                if view is None:
                    missing.append(i)
                out[i] = view
        if missing:
            missing.sort()
            self._fetch_now(offsets, counts, missing, out)
        return out

    def _take(self, ch: _Chunk, tiles: list[tuple[int, int]]) -> list[memoryview | None]:
        """Views of (offset, count) tiles in ``ch`` once it is fetched; None for each when
        it was already freed (evicted): the caller fetches those again."""
        with self._cond:
            if ch.freed:
                data = ch.data  # spent but maybe still kept
                if data is None:
                    return [None] * len(tiles)
                return [memoryview(data)[o - ch.start:o - ch.start + c] for o, c in tiles]
            if not ch.submitted:
                self._submit(ch)  # the reader got ahead of the prefetch: this one first
        ch.done.wait()
        if ch.error is not None:
            raise self._failed(ch.error)
        with self._cond:
            data = ch.data
            if data is None:  # freed meanwhile (evicted)
                return [None] * len(tiles)
            whole = memoryview(data)
            views: list[memoryview | None] = [whole[o - ch.start:o - ch.start + c]
                                              for o, c in tiles]
            self._frontier = max(self._frontier, ch.index)
            for o, _ in tiles:
                if o not in ch.taken:  # a seam tile may be asked for twice: count it once
                    ch.taken.add(o)
                    ch.pending -= 1
            if ch.pending <= 0:
                self._free(ch)  # the views keep the bytes alive while the reader uses them
        return views

    def _fetch_now(self, offsets: list[int], counts: list[int], missing: list[int],
                   out: list[memoryview | None]) -> None:
        """Tiles outside the plan (or asked again after use): one GET for the run."""
        self.misses += len(missing)
        spans = [(offsets[i], offsets[i] + counts[i]) for i in missing]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        try:
            if hi - lo <= 2 * sum(b - a for a, b in spans) + GAP_BYTES:
                blob = self.remote.fetch(lo, hi)
                for i, (a, b) in zip(missing, spans, strict=True):
                    out[i] = memoryview(blob)[a - lo:b - lo]
            else:
                for i, (a, b) in zip(missing, spans, strict=True):
                    out[i] = memoryview(self.remote.fetch(a, b))
        except Exception as err:
            raise self._failed(err) from err

    def _failed(self, err: BaseException) -> StagingError:
        return StagingError(f"could not read {self.remote.uri} (range reads): "
                            f"{type(err).__name__}: {err}")

    def close(self) -> None:
        """Stop prefetching and release the skeleton's descriptor; safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for ch in self._chunks:  # cancelled before they ran: wake anyone waiting on them
            if not ch.done.is_set():
                ch.error = ValueError("range source closed")
                ch.done.set()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class SlideBytes:
    """The local path tiling opens and how its bytes came: staged whole or range reads."""

    path: str
    uri: str
    storage: StorageConfig
    ranged: bool = False
    expected: str | None = None  # fingerprint the ranged bytes must still have at the end
    note: str = ""  # why staged whole although range reads were on
    source: RangeSource | None = None
    skeleton_bytes: int = 0

    def verify(self) -> None:
        """Range reads: raise SlideChanged when the object is no longer the one read (its
        tiles may mix two versions); staged bytes are one copy, nothing to do."""
        if self.ranged:
            check_unchanged(self.uri, self.expected, source_fingerprint(self.uri, self.storage),
                            "while its tiles were read")

    def read_note(self, note: str | None) -> str | None:
        """The slide row's read note: ``note`` plus which way the bytes came."""
        mine = self.note
        if self.ranged and self.source is not None:
            r = self.source.remote
            mine = (f"range reads: {r.bytes / 1e6:.1f} of {r.size / 1e6:.1f} MB fetched "
                    f"({100 * r.bytes / max(r.size, 1):.0f}%) in {r.requests} requests")
            if self.source.misses:
                mine += f", {self.source.misses} tiles outside the plan"
        return "; ".join(p for p in (note, mine) if p) or None


@contextlib.contextmanager
def slide_bytes(uri: str, storage: StorageConfig, expected: str | None,
                tiling: TilingConfig, mpp_override: float | None = None
                ) -> Iterator[SlideBytes]:
    """The slide's bytes for tiling: a skeleton read by ranges (see module doc) where
    :func:`wants_ranges` and the slide allows, else :func:`staged_slide` as before.
    Raises what staging raises (``StagingError``, ``SlideChanged``)."""
    if not wants_ranges(uri, storage, tiling):
        with staged_slide(uri, storage, expected) as local:
            yield SlideBytes(local, uri, storage)
        return
    with contextlib.ExitStack() as stack:
        try:
            got = _skeleton(uri, storage, expected, tiling, mpp_override, stack)
        except Decline as why:
            stack.close()
            log.info("staging %s whole, not range reads: %s", uri, why)
            got = None
            note = f"staged whole, not range reads: {why}"
        if got is not None:
            yield got
            return
    with staged_slide(uri, storage, expected) as local:
        yield SlideBytes(local, uri, storage, note=note)


def _skeleton(uri: str, storage: StorageConfig, expected: str | None, tiling: TilingConfig,
              mpp_override: float | None, stack: contextlib.ExitStack) -> SlideBytes:
    """Build and check the skeleton (steps 1-4 of the module doc); Decline when the slide is
    not for range reads. Cleanup goes on ``stack``."""
    fs, rpath = url_to_fs(uri, storage)
    try:
        info = with_retries(lambda: fs.info(rpath), storage, what=f"stat {uri}")
    except StorageUnavailable as err:
        raise StagingError(f"could not read {uri}: {err}") from err
    except Exception as err:  # noqa: BLE001 - not found, denied: staging says it as it does
        raise Decline(f"{type(err).__name__}: {err}") from None
    if info.get("type") == "directory":
        raise Decline("a folder")
    found = fingerprint_from_info(info, rpath)
    check_unchanged(uri, expected, found, "before reading")
    remote = _Remote(uri, storage, int(info["size"]))
    blocks = _Blocks(remote)
    try:
        pages, directory = _walk(blocks)
    except StorageUnavailable as err:
        raise StagingError(f"could not read {uri} (range reads): {err}") from err
    tiled = [p for p in pages if p.tiled]
    if not tiled:
        raise Decline("no tiled pages")
    smallest = min(tiled, key=lambda p: p.width * p.length)
    if smallest.data_bytes > THUMB_MAX_BYTES:
        raise Decline(f"smallest level holds {smallest.data_bytes / 1e6:.0f} MB")
    wanted = list(directory) + smallest.ranges()
    for p in tiled:
        wanted += p.ranges(p.centre_tiles(CHECK_TILES))
    scratch = storage.scratch_dir or default_scratch_dir()
    budget = ScratchBudget(scratch, int(storage.scratch_limit_gb * 2**30))
    path = os.path.join(scratch, f"{uuid.uuid4().hex}.skeleton{os.path.splitext(rpath)[1]}")
    # the directory's blocks were fetched anyway: keep them (tiles in them are then local)
    wanted += [(i * blocks.block, min((i + 1) * blocks.block, remote.size))
               for i in blocks.blocks]
    extents = _merge(wanted)
    stack.enter_context(budget.reserve(_disk_bytes(extents)))
    stack.callback(_remove, path)  # removed before its reservation is released
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, remote.size)
        _fill(fd, remote, blocks, extents)
    finally:
        os.close(fd)
    extents, why = _check(path, pages, extents, remote, blocks, budget, stack, tiling,
                          mpp_override, fill=True)
    if why:
        raise Decline(why)
    source = RangeSource(remote, path, extents)
    stack.callback(source.close)
    why = _check(path, pages, extents, remote, blocks, budget, stack, tiling, mpp_override,
                 fill=False)[1]
    if why:
        raise Decline(why)
    log.debug("range reads of %s: skeleton of %d bytes in %d extents", uri,
              sum(b - a for a, b in extents), len(extents))
    return SlideBytes(path, uri, storage, ranged=True, expected=expected or str(found),
                      source=source, skeleton_bytes=sum(b - a for a, b in extents))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _fill(fd: int, remote: _Remote, blocks: _Blocks, extents: list[tuple[int, int]]) -> None:
    """Write ``extents`` of the object into the skeleton: from the directory's blocks where
    cached, the rest in parallel GETs."""
    todo = []
    for a, b in extents:
        if all(i in blocks.blocks for i in range(a // blocks.block, (b - 1) // blocks.block + 1)):
            os.pwrite(fd, blocks.read(a, b - a), a)
        else:
            todo.append((a, b))
    if not todo:
        return
    try:
        with ThreadPoolExecutor(min(FETCH_THREADS, len(todo))) as pool:
            for (a, _), data in zip(todo, pool.map(lambda r: remote.fetch(*r), todo),
                                    strict=True):
                os.pwrite(fd, data, a)
    except StorageUnavailable as err:
        raise StagingError(f"could not read {remote.uri} (range reads): {err}") from err


def _check(path: str, pages: list[_Page], extents: list[tuple[int, int]], remote: _Remote,
           blocks: _Blocks, budget: ScratchBudget, stack: contextlib.ExitStack,
           tiling: TilingConfig, mpp_override: float | None, *, fill: bool
           ) -> tuple[list[tuple[int, int]], str]:
    """Open the skeleton as tiling will. ``fill``: add the thumbnail level's tiles (returns
    the new extents); else try the reader choice tiling makes. Returns why not, or ""."""
    try:
        slide = open_slide(path)
    except SlideError as err:
        return extents, f"OpenSlide: {err.reason}"
    try:
        vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR)
        if vendor not in tiff.VENDORS:
            return extents, f"vendor {vendor!r} is not read by the direct TIFF reader"
        try:
            mpp0, source = resolve_mpp(slide, mpp_override)
            width, height = slide.dimensions
            geo = read_geometry(width, height, [float(d) for d in slide.level_downsamples],
                                mpp0, source, tiling)
        except SlideError as err:
            return extents, f"{err.stage}: {err.reason}"
        if fill:
            dims = tuple(slide.level_dimensions[geo.thumb_level])
            match = [p for p in pages if p.tiled and (p.width, p.length) == dims]
            if len(match) != 1:
                return extents, f"thumbnail level {dims}: {len(match)} tiled pages"
            thumb = match[0]
            if thumb.data_bytes > THUMB_MAX_BYTES:
                return extents, f"thumbnail level holds {thumb.data_bytes / 1e6:.0f} MB"
            more = [r for r in _merge(thumb.ranges()) if not _covered(extents, r)]
            if more:
                stack.enter_context(budget.reserve(_disk_bytes(more)))
                fd = os.open(path, os.O_WRONLY)
                try:
                    _fill(fd, remote, blocks, more)
                finally:
                    os.close(fd)
            return _merge(extents + more), ""
        dct = (geo.whole_scale or 1) if tiling.dct_downscale else 1
        levels = [geo.level] if geo.thumb_level == geo.level else [geo.level, geo.thumb_level]
        reader, why = tiff.open_tiff_reader(path, slide, levels, dct_factor=dct)
        if reader is None and len(levels) > 1:
            reader, why = tiff.open_tiff_reader(path, slide, levels[:1], dct_factor=dct)
        if reader is None:
            return extents, why
        reader.close()
        return extents, ""
    finally:
        slide.close()


def _covered(extents: list[tuple[int, int]], r: tuple[int, int]) -> bool:
    j = bisect.bisect_right([a for a, _ in extents], r[0]) - 1
    return j >= 0 and r[1] <= extents[j][1]


def stats(got: SlideBytes) -> dict[str, Any]:
    """Bytes and requests of a ranged read (benchmarks and tests)."""
    if got.source is None:
        return {"ranged": False}
    r = got.source.remote
    return {"ranged": True, "bytes": r.bytes, "size": r.size, "requests": r.requests,
            "skeleton_bytes": got.skeleton_bytes, "misses": got.source.misses,
            "local_reads": got.source.local_reads}
