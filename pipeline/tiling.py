"""The CPU stage's pure logic: one slide file in, a plan and chunks of uint8 tiles out.

No Ray here: ``pipeline.run`` wraps :func:`tile_slide` in a task. Every check that can reject
a slide (unreadable, no mpp, too small, no tissue) runs before :func:`tile_slide` returns, so
the caller knows the tile count before any tile pixels are decoded.

Resampling: each region is read from the chosen level and resampled once. When a whole
number k of level pixels makes one delivered pixel within ``mpp_tolerance`` (0.25 -> 0.5,
0.2527 -> 0.5054, like reading 448 px and halving), the region is area-averaged by k with
``Image.reduce``: a box filter, antialiased by construction, ~9x cheaper than a filtered
resize, and it needs no margin so regions decode only their own file tiles. Other scales
resize once from the exact fractional source box with Pillow's BILINEAR filter (widened by the
scale when downsampling: an antialiased triangle filter, no ringing at tissue/glass edges).

Readers (:mod:`pipeline.readers`): a fast reader where one recognises the file (the direct
JPEG-tile readers: tissue-free file tiles skipped), OpenSlide otherwise. ``threads`` regions
are read and resampled at once (JPEG decode, OpenSlide and Pillow release the GIL).

Damaged JPEG tiles: every reader delivers a file tile that does not decode cleanly as white and
records it (:class:`pipeline.readers.DamageLog`); a region that read over one flags its tiles
that overlap it, which are then emitted white (never the decoder's garbage) and listed in the
slide's meta (``damaged``). The tile count stays the plan's: writers wait for exactly that
many rows. Past ``tiling.max_damaged_fraction`` of the slide's tiles the slide fails
(``SlideError('read')`` naming how many and which). Clean regions pay one length check.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import openslide
from PIL import Image

from pipeline.config import StorageConfig, TilingConfig
from pipeline.geometry import ReadGeometry, read_geometry
from pipeline.handoff import (
    ERROR,
    ERROR_STAGE,
    INDEX,
    META,
    MODELS_COLUMN,
    NUM_TILES,
    RSS_MB,
    SLIDE_ID,
    T_CHUNK,
    TILE_COLUMN,
    TISSUE,
    SlidePlan,
    TilingMeta,
    X,
    Y,
)
from pipeline.placement import ray_node_id
from pipeline.preview import Preview, geojson_bytes, make_preview, render_jpeg
from pipeline.qc import QC_COLUMNS, tile_qc
from pipeline.readers import (
    ByteSource,
    DamageLog,
    OpenSlideReader,
    Reader,
    ReadError,
    choose_reader,
    integer_factor,
    read_resampled,
)
from pipeline.remote import slide_bytes
from pipeline.sink import Lake
from pipeline.slides import (
    SlideError,
    objective_power,
    open_slide,
    resolve_mpp,
    vendor,
)
from pipeline.storage import (
    SlideChanged,
    StagingError,
    check_unchanged,
    is_local,
    source_fingerprint,
)
from pipeline.tissue import (
    TileGrid,
    plan_grid,
    read_thumbnail,
    tissue_mask,
)

log = logging.getLogger(__name__)
RESAMPLE = Image.Resampling.BILINEAR
# Kept tiles one band may buffer before it is split into shorter bands: row-major order needs
# a whole band read before its first row is emitted, and a 100k px wide slide has ~220 tiles
# per row. Shorter bands re-decode a few file tiles on their seams; memory stays flat.
BAND_BYTES = 12 << 20
# Regions in flight per thread (plus one queued): each costs a region of chunk memory. With
# regions up to REGION_BYTES wide, 1 ran as fast as 2 on the 100k px slide (within noise)
# and peaked ~17 MB lower.
READ_AHEAD = 1
# Delivered pixels of one region in a short band: each thread's region buffers scale with
# it (1 x 64 tiles cost ~45 MB more peak RSS on a 100k px wide slide than 1 x 27).
REGION_BYTES = 4 << 20


@dataclass
class TileChunk:
    """Consecutive tiles of one slide in row-major tiling order."""

    tiles: np.ndarray  # uint8 (N, T, T, 3) RGB
    x: np.ndarray  # int64 level-0 left edge
    y: np.ndarray  # int64 level-0 top edge
    tissue: np.ndarray  # float32 tissue fraction
    index: np.ndarray  # int64 position in the slide's row-major tiling order


@dataclass
class ReadReport:
    """What reading a slide found and used; complete once its chunks are exhausted."""

    dct_downscale: bool = False  # the tiles came out of libjpeg-turbo's reduced-size IDCT
    note: str = ""  # why the fast path, or its reduced-size decoding, was not used
    damaged: set[int] = field(default_factory=set)  # tile indices delivered white
    thumbnail_damaged: int = 0  # file tiles the thumbnail read as white (the mask saw glass)
    logs: list[DamageLog] = field(default_factory=list)  # the readers' (their complaints)

    def damage_text(self) -> str | None:
        """The decoders' complaints for a person (a few of them), or None: nothing damaged."""
        if not self.damaged and not self.thumbnail_damaged:
            return None
        parts = []
        if self.thumbnail_damaged:
            parts.append(f"{self.thumbnail_damaged} file tiles of the thumbnail read as white "
                         "(the tissue mask saw glass there)")
        n = sum(len(log_) for log_ in self.logs)
        notes = [note for log_ in self.logs for note in log_.notes(limit=5)][:5]
        if n:
            parts.append(f"{n} damaged file tiles: " + "; ".join(notes)
                         + ("; ..." if n > len(notes) else ""))
        return "; ".join(parts) or None


class TileChunks(Iterator[TileChunk]):
    """Iterator of chunks that owns the open slide and closes it when done or closed.

    A plain generator would leak the slide when the caller never starts iterating (its
    ``finally`` only runs once started), so the handle lives here.
    """

    def __init__(self, slide: openslide.OpenSlide, gen: Iterator[TileChunk],
                 closers: tuple[Callable[[], object], ...] = ()) -> None:
        self._slide: openslide.OpenSlide | None = slide
        self._gen = gen
        self._closers = closers
        self.reader = "openslide"  # which reader delivers the pixels ("openslide" or "tiff")
        self.preview: Preview | None = None  # made from the planning thumbnail (tiling.previews)
        self.report = ReadReport()  # filled in while the chunks are read

    def __iter__(self) -> TileChunks:
        return self

    def __next__(self) -> TileChunk:
        if self._slide is None:
            raise StopIteration
        try:
            return next(self._gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reading and release the slide; safe to call more than once."""
        gen = self._gen
        if hasattr(gen, "close"):
            gen.close()
        if self._slide is not None:
            for close in self._closers:
                close()
            self._slide.close()
            self._slide = None

    def __enter__(self) -> TileChunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_malloc_tuned = False
MMAP_THRESHOLD = 16 << 20


def tune_worker_malloc() -> None:
    """Fix glibc's mmap threshold at 16 MB (Linux/glibc only) so RSS does not ratchet up.

    By default glibc raises the threshold to the largest block freed so far (a thumbnail can
    be 40 MB), after which such buffers live on the heap, where freed memory stays resident: a
    worker would keep the high-water mark of everything it ever planned. Fixed, big one-off
    buffers keep their own mappings (returned on free) while chunk-sized ones (~10 MB) are
    recycled from the heap instead of page-faulted in afresh for every chunk. Process-wide:
    called by the tiling tasks' entry point (:func:`tiling_stage`), not by :func:`tile_slide`,
    so a process that also runs models (tests, benchmarks) keeps glibc's defaults.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def tile_slide(path: str, *, mpp_override: float | None, cfg: TilingConfig,
               source: ByteSource | None = None) -> tuple[SlidePlan, TileChunks]:
    """Plan a slide and return its chunks iterator; raises ``SlideError`` before any tile read.

    ``source``: where the file's bytes come from when ``path`` is only a skeleton of them
    (range reads of a remote slide, :mod:`pipeline.remote`); the chosen reader must take it.

    ``cfg.reader`` ("auto", "openslide", "tiff") and ``cfg.threads`` choose how pixels are
    read; "tiff" fails the slide instead of falling back, for benchmarks and tests.
    """
    path = str(path)
    slide = open_slide(path)
    closers: list[Callable[[], object]] = []
    try:
        geo = slide_geometry(slide, mpp_override, cfg)
        # Read before any pixels: a failed OpenSlide read spoils the handle for every call.
        facts = vendor(slide), objective_power(slide)
        backup = OpenSlideReader(slide, path)  # reopens itself after a failed read
        closers.append(backup.close)
        # The fast reader also serves the thumbnail level when it can: planning is serial
        # work in front of every slide, and OpenSlide is the slow part of it.
        dct = (geo.whole_scale or 1) if cfg.dct_downscale else 1
        reader = choose_reader(slide, path, geo.level, cfg.reader, dct_factor=dct,
                               also=geo.thumb_level, backup=backup)
        if reader is not backup:
            closers.insert(0, reader.close)
        if source is not None:
            try:
                reader.read_from(source)
            except ReadError as err:
                raise SlideError("open", f"{path!r}: {err}") from None
        threads = cfg.threads
        pool = ThreadPoolExecutor(threads, thread_name_prefix="tiling") if threads > 1 else None
        if pool is not None:
            closers.insert(0, lambda: pool.shutdown(wait=True, cancel_futures=True))
        logs = [reader.damage] if reader is not backup else []
        report = ReadReport(note=reader.note, logs=[*logs, backup.damage])
        plan, grid, preview = _plan(slide, path, geo, cfg, reader=reader, pool=pool,
                                    backup=backup, facts=facts, report=report)
    except BaseException:
        for close in closers:
            close()
        slide.close()
        raise
    reader.prepare(grid, geo)
    k = geo.whole_scale or 1
    report.dct_downscale = k > 1 and reader.dct_ok(geo.level, k)
    gen = _chunks(reader, path, grid, geo.level, geo.scale, cfg, pool, report)
    chunks = TileChunks(slide, gen, tuple(closers))
    chunks.reader = reader.name
    chunks.preview = preview
    chunks.report = report
    return plan, chunks


def slide_geometry(slide: openslide.OpenSlide, mpp_override: float | None,
                   cfg: TilingConfig) -> ReadGeometry:
    """:func:`pipeline.geometry.read_geometry` of an open slide."""
    mpp0, source = resolve_mpp(slide, mpp_override)
    width, height = slide.dimensions
    return read_geometry(width, height, [float(d) for d in slide.level_downsamples], mpp0,
                         source, cfg)


def _plan(slide: openslide.OpenSlide, path: str, geo: ReadGeometry, cfg: TilingConfig, *,
          reader: Reader | None = None, pool: ThreadPoolExecutor | None = None,
          backup: OpenSlideReader | None = None,
          facts: tuple[str | None, float | None] | None = None,
          report: ReadReport | None = None) -> tuple[SlidePlan, TileGrid, Preview | None]:
    """Thumbnail, tissue mask and tile grid. ``backup`` reads the thumbnail when ``reader``
    does not serve its level (the bare ``slide`` otherwise: strict, a damaged tile fails);
    ``facts``: vendor and objective power, read before any pixel; ``report`` learns how many
    thumbnail tiles were damaged."""
    if reader is None or not reader.has_level(geo.thumb_level):
        reader = backup  # OpenSlide reads the thumbnail
    if facts is None:
        facts = vendor(slide), objective_power(slide)
    damage = reader.damage if reader is not None else None
    before = damage.count([geo.thumb_level]) if damage is not None else 0
    try:
        # a self-check OpenSlide failed spoils ``slide``: the backup's handle is good
        thumb = read_thumbnail(backup.healthy() if backup is not None else slide,
                               geo.thumb_size, path=path, reader=reader, pool=pool,
                               level=geo.thumb_level)
    except ReadError as err:
        raise SlideError("read", f"failed reading the thumbnail of {path!r}: the file is "
                                 f"corrupt or truncated ({err})") from None
    finally:
        if reader is not None:
            reader.clear_caches()
    if damage is not None and report is not None:
        report.thumbnail_damaged = damage.count([geo.thumb_level]) - before
    mask, threshold = tissue_mask(thumb, colours=cfg.tissue_colours)
    grid = plan_grid(mask, geo.width, geo.height, geo.tile_l0, cfg.min_tissue, geo.mpp0)
    preview = make_preview(thumb, mask, grid, geo.width, geo.height) if cfg.previews else None
    del thumb
    if grid.num_tiles == 0:
        raise SlideError(
            "no_tissue",
            f"no tissue found: 0 of {grid.grid_tiles} tiles reach min_tissue={cfg.min_tissue} "
            f"(mask threshold: chroma >= {threshold:.3f} over the glass, mask tissue area "
            f"{grid.tissue_area_mm2:.3f} mm2); check the slide, or lower tiling.min_tissue",
            preview=preview,
        )
    plan = SlidePlan(
        width=geo.width, height=geo.height, mpp=geo.mpp0, mpp_source=geo.mpp_source,
        level=geo.level, level_downsample=geo.level_downsample, tile_px=geo.tile_px,
        tile_l0=geo.tile_l0, target_mpp=float(cfg.mpp), num_tiles=grid.num_tiles,
        tissue_area_mm2=float(grid.tissue_area_mm2), vendor=facts[0],
        objective_power=facts[1], upsampled=geo.upsampled,
        read_mpp=geo.read_mpp,
    )
    return plan, grid, preview


@dataclass
class _Region:
    """One region read: kept tiles ``sel`` (band positions) inside a box of level pixels."""

    band: int
    sel: np.ndarray
    r0: int
    c0: int
    box: tuple[float, float, float, float]
    size: tuple[int, int]
    need: list[tuple[float, float, float, float]]


def _bands(grid: TileGrid, rt: int, tile_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, stop) grid rows of each band: ``rt`` rows, fewer where that would buffer more
    than ``BAND_BYTES`` of kept tiles (wide slides), so memory does not grow with width."""
    starts = np.searchsorted(grid.row, np.arange(0, grid.rows + rt, rt))
    for r in range(0, grid.rows, rt):
        kept = int(starts[r // rt + 1] - starts[r // rt])
        if kept == 0:
            continue
        step = rt
        if kept * tile_bytes > BAND_BYTES:
            step = max(1, rt * BAND_BYTES // (kept * tile_bytes))
        for r0 in range(r, min(r + rt, grid.rows), step):
            yield r0, min(r0 + step, r + rt, grid.rows)


def _regions(grid: TileGrid, scale: float, cfg: TilingConfig) -> Iterator[tuple[int, int, int,
                                                                                 list[_Region]]]:
    """(band, first tile, end tile, regions) per band of at most ``region_tiles`` grid rows.

    A region is ``region_tiles`` grid cells wide, or wider in the short bands of wide slides
    (up to ``REGION_BYTES`` of tiles: 1 x 27 rather than 1 x 8 at 224 px), so that a region's
    fixed costs (futures, geometry, reads and decoder calls per row of file tiles) are spread
    over more tiles.
    """
    t = cfg.tile_size
    rt = cfg.region_tiles
    for b, (row0, row1) in enumerate(_bands(grid, rt, t * t * 3)):
        lo, hi = (int(v) for v in np.searchsorted(grid.row, [row0, row1]))
        if lo == hi:
            continue
        rows, cols = grid.row[lo:hi], grid.col[lo:hi]
        region_of = cols // max(rt, REGION_BYTES // ((row1 - row0) * t * t * 3))
        regions = []
        for reg in np.unique(region_of):
            sel = np.nonzero(region_of == reg)[0]
            r0, r1 = int(rows[sel].min()), int(rows[sel].max()) + 1
            c0, c1 = int(cols[sel].min()), int(cols[sel].max()) + 1
            # Delivered pixel u maps to level pixel u * scale; tile (r, c) starts at c * t.
            box = (c0 * t * scale, r0 * t * scale, c1 * t * scale, r1 * t * scale)
            s = t * scale
            need = [(float(c) * s, float(r) * s, (float(c) + 1) * s, (float(r) + 1) * s)
                    for r, c in zip(rows[sel].tolist(), cols[sel].tolist(), strict=True)]
            regions.append(_Region(b, sel, r0, c0, box, ((c1 - c0) * t, (r1 - r0) * t), need))
        yield b, lo, hi, regions


def _read_region(reader: Reader, path: str, level: int, reg: _Region, rows: np.ndarray,
                 cols: np.ndarray, t: int, store: dict[int, np.ndarray], lo: int,
                 per_chunk: int, scale: float = 1.0) -> list[int]:
    """Cut the kept tiles of one region straight into their chunk slots (disjoint per region,
    so threads share the chunks without a lock); the region's pixels are freed here.

    Returns the slide positions of its tiles that lie on a damaged file tile: those slots are
    filled white (the reader's substitute for what did not decode is no tile's pixels).
    """
    try:
        pixels = read_resampled(reader, level, reg.box, reg.size, RESAMPLE, path=path,
                                need=reg.need, scratch=True)
    except ReadError as err:
        raise SlideError(
            "read", f"failed reading pixels of level {level} from {path!r}: the file is corrupt "
                    f"or truncated ({err})") from None
    # The region as a grid of tiles; kept tiles side by side in one row go out in one copy
    # (each numpy call is a GIL round trip the other threads may have to wait for).
    grid = pixels.reshape(pixels.shape[0] // t, t, pixels.shape[1] // t, t, 3)
    sel = reg.sel.tolist()
    rr = (rows[reg.sel] - reg.r0).tolist()
    cc = (cols[reg.sel] - reg.c0).tolist()
    i, n = 0, len(sel)
    while i < n:
        g = lo + sel[i]  # position in the slide's tiling order
        chunk, slot = divmod(g, per_chunk)
        j = i + 1
        while (j < n and rr[j] == rr[i] and cc[j] == cc[j - 1] + 1 and sel[j] == sel[j - 1] + 1
               and slot + j - i < per_chunk):
            j += 1
        store[chunk][slot:slot + j - i] = grid[rr[i], :, cc[i]:cc[i] + j - i].transpose(1, 0, 2, 3)
        i = j
    damage = reader.damage
    if not len(damage):  # the whole cost on a clean slide
        return []
    bad = damage.boxes(level)
    if not len(bad):
        return []
    # A resize reads a margin around each tile (see read_resampled): widen by it.
    pad = 0 if integer_factor(reg.box, reg.size) else math.ceil(max(scale, 1.0)) + 1
    need = np.asarray(reg.need, np.float64).reshape(-1, 4) + np.array([-pad, -pad, pad, pad])
    hit = ((need[:, None, 0] < bad[None, :, 2]) & (need[:, None, 2] > bad[None, :, 0]) &
           (need[:, None, 1] < bad[None, :, 3]) & (need[:, None, 3] > bad[None, :, 1])).any(1)
    flagged = [lo + sel[i] for i in np.nonzero(hit)[0].tolist()]
    for g in flagged:
        chunk, slot = divmod(g, per_chunk)
        store[chunk][slot] = 255
    return flagged


def _chunks(reader: Reader, path: str, grid: TileGrid, level: int, scale: float,
            cfg: TilingConfig, pool: ThreadPoolExecutor | None,
            report: ReadReport | None = None) -> Iterator[TileChunk]:
    """Read bands of ``region_tiles`` grid rows, region by region, and emit chunks in order.

    Regions write their tiles straight into the chunk arrays that will be emitted (no copy
    between reading and emitting); a chunk goes out, in row-major order, once all its tiles
    are read. Memory: the chunks under the regions in flight (at most a band of
    ``BAND_BYTES``), never the slide. With a pool, regions are read ahead in order,
    ``READ_AHEAD`` per thread. Damaged tiles go to ``report.damaged``; once more than
    ``cfg.max_damaged_fraction`` of the slide's tiles are, the slide fails at once (no
    point decoding the rest of a file that far gone).
    """
    t = cfg.tile_size
    n = grid.num_tiles
    per_chunk = cfg.chunk_tiles
    store: dict[int, np.ndarray] = {}  # chunk number -> its tiles, until emitted
    emitted = 0  # chunks emitted so far
    workers = pool._max_workers if pool is not None else 1  # noqa: SLF001
    inflight: deque[tuple[int | None, Future[list[int]]]] = deque()
    report = report if report is not None else ReadReport()
    allowed = math.floor(cfg.max_damaged_fraction * n + 1e-9)

    def allocate(lo: int, hi: int) -> None:
        for c in range(lo // per_chunk, (hi - 1) // per_chunk + 1):
            if c not in store:
                store[c] = np.empty((min(per_chunk, n - c * per_chunk), t, t, 3), np.uint8)

    def ready(done: int) -> Iterator[TileChunk]:
        """The chunks whose tiles all lie before ``done`` (tiles [0, done) are read)."""
        nonlocal emitted
        while emitted * per_chunk < n and min(n, (emitted + 1) * per_chunk) <= done:
            yield _chunk(grid, store.pop(emitted), emitted * per_chunk)
            emitted += 1

    def damaged(found: list[int]) -> None:
        if not found:
            return
        report.damaged.update(found)
        if len(report.damaged) > allowed:
            raise SlideError("read", _too_damaged(path, report, n, cfg.max_damaged_fraction,
                                                  allowed))

    try:
        for _, lo, hi, regions in _regions(grid, scale, cfg):
            rows, cols = grid.row[lo:hi], grid.col[lo:hi]
            one_row = bool(rows[0] == rows[-1])
            for j, reg in enumerate(regions):
                first, end = lo + int(reg.sel[0]), lo + int(reg.sel[-1]) + 1
                # the chunks this region's tiles land in, no more: in a band one tile row
                # high, regions read ahead cover a few chunks, not the next band's all
                allocate(first, end)
                # Tiles read once this region is: the band's when it is the last; in a one-row
                # band, regions are consecutive runs of tiles, so all up to its end.
                done = hi if j == len(regions) - 1 else end if one_row else None
                args = (reader, path, level, reg, rows, cols, t, store, lo, per_chunk, scale)
                if pool is None:
                    damaged(_read_region(*args))
                    if done is not None:
                        yield from ready(done)
                    continue
                inflight.append((done, pool.submit(_read_region, *args)))
                while len(inflight) > READ_AHEAD * workers:
                    done_at, fut = inflight.popleft()
                    damaged(fut.result())
                    if done_at is not None:
                        yield from ready(done_at)
        while inflight:
            done_at, fut = inflight.popleft()
            damaged(fut.result())
            if done_at is not None:
                yield from ready(done_at)
    finally:
        for _, fut in inflight:
            fut.cancel()
    if emitted * per_chunk < n:  # a bug in the band bookkeeping; never emit a partial slide
        raise SlideError("tiling", f"internal error: emitted {emitted} chunks of {n} tiles")


def _too_damaged(path: str, report: ReadReport, n: int, fraction: float, allowed: int) -> str:
    """The error row's reason: how many tiles are damaged, which, and what the decoder said."""
    bad = sorted(report.damaged)
    shown = ", ".join(str(i) for i in bad[:20]) + (", ..." if len(bad) > 20 else "")
    return (f"at least {len(bad)} of {n} tiles of {path!r} lie on damaged JPEG tiles, more "
            f"than tiling.max_damaged_fraction={fraction:g} allows ({allowed}): the file is "
            f"corrupt or truncated (copy or export it again; or raise the fraction to keep "
            f"the slide with those tiles white and listed); tiles {shown}; "
            f"{report.damage_text()}")


def _chunk(grid: TileGrid, tiles: np.ndarray, start: int) -> TileChunk:
    sl = slice(start, start + len(tiles))
    return TileChunk(
        tiles=tiles, x=grid.x[sl].copy(), y=grid.y[sl].copy(),
        tissue=grid.tissue[sl].copy(), index=np.arange(sl.start, sl.stop, dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------------
# The Ray Data stage: a batch of slides in, chunks of uint8 tiles (or one error row) out.
# Kept free of torch imports so tiling workers stay small.


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rows(slide_id: str, models: str, tiles: np.ndarray, *, x: np.ndarray, y: np.ndarray,
          tissue: np.ndarray, index: np.ndarray, num_tiles: int, meta: str = "",
          error: str = "", stage: str = "", qc: bool = False, sharpness: bool = False
          ) -> dict[str, np.ndarray]:
    n = len(tiles)
    metas = np.full(n, "", dtype=object)
    if n:
        metas[0] = meta
    values = (tile_qc(tiles, sharpness) if qc else
              {c: np.full(n, np.nan, np.float32) for c in QC_COLUMNS})
    return {
        SLIDE_ID: np.full(n, slide_id, dtype=object),
        TILE_COLUMN: tiles,
        X: x.astype(np.int64), Y: y.astype(np.int64),
        TISSUE: tissue.astype(np.float32),
        INDEX: index.astype(np.int64),
        **values,
        NUM_TILES: np.full(n, num_tiles, np.int64),
        MODELS_COLUMN: np.full(n, models, dtype=object),
        ERROR: np.full(n, error, dtype=object),
        ERROR_STAGE: np.full(n, stage, dtype=object),
        META: metas,
        T_CHUNK: np.full(n, time.time(), np.float64),
        RSS_MB: np.full(n, _rss_mb(), np.float32),
    }


def tiling_stage(batch: dict[str, np.ndarray], *, tiling: TilingConfig,
                storage: StorageConfig | None = None, output: str | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
    """Tile each slide of the batch; a failing slide becomes one error row, never an exception.

    ``output``: the lake its previews go to (none written without it)."""
    tune_worker_malloc()
    cfg = tiling
    store = storage or StorageConfig()
    t = cfg.tile_size
    lake = Lake(output, store) if output and cfg.previews else None
    spec = cfg.spec_hash()
    n_slides = len(batch[SLIDE_ID])
    planned = batch.get("fingerprint", [None] * n_slides)
    cohorts = batch.get("cohort", ["default"] * n_slides)
    for slide_id, uri, mpp, models, expected, cohort in zip(
            batch[SLIDE_ID], batch["uri"], batch["mpp"], batch[MODELS_COLUMN], planned, cohorts,
            strict=True):
        expected = str(expected) if expected else None
        mpp_override = None if mpp is None or np.isnan(mpp) else float(mpp)
        started = time.time()
        shown: dict[str, str] = {}  # preview_path / geojson_path once written

        def failure(stage: str, reason: str, slide_id: str = slide_id,
                    started: float = started, shown: dict[str, str] = shown
                    ) -> dict[str, np.ndarray]:
            one = np.zeros(1, np.int64)
            return _rows(slide_id, "", np.zeros((1, t, t, 3), np.uint8), x=one, y=one,
                         tissue=np.zeros(1), index=one - 1, num_tiles=0, error=reason,
                         stage=stage, meta=TilingMeta(started, **shown).encode())

        def show(preview: Preview | None, slide_id: str = slide_id, cohort: str = cohort,
                 shown: dict[str, str] = shown) -> None:
            if lake is not None and preview is not None:
                shown.update(_write_preview(lake, spec, str(cohort), str(slide_id), preview))

        try:
            # staged whole, or read by ranges where the slide allows (pipeline.remote)
            with slide_bytes(str(uri), store, expected, cfg, mpp_override) as got:
                # a skeleton's holes are filled by its source: only a reader that takes it
                # reads the slide (never OpenSlide, which would read the holes as pixels)
                try:
                    plan, chunks = tile_slide(got.path, mpp_override=mpp_override, cfg=cfg,
                                              source=got.source)
                except SlideError as err:
                    show(err.preview)
                    raise
                show(chunks.preview)
                chunks.preview = None  # its thumbnail is not needed while tiles are read
                node, pid = ray_node_id(), os.getpid()
                held = None  # the last chunk waits for the check below: without it the
                for chunk in chunks:  # slide is incomplete and its writer never writes it
                    if held is not None:
                        yield held
                    held = _rows(str(slide_id), str(models), chunk.tiles, x=chunk.x, y=chunk.y,
                                 tissue=chunk.tissue, index=chunk.index,
                                 num_tiles=plan.num_tiles, qc=cfg.qc,
                                 sharpness=cfg.qc_sharpness)
                if is_local(str(uri)):  # a staged copy cannot change; a local file can
                    check_unchanged(str(uri), expected, source_fingerprint(str(uri), store),
                                    "while it was tiled")
                got.verify()  # range reads: the object is still the one read
                if held is not None:
                    # the meta rides on the last chunk: only now is it known what was damaged
                    rep = chunks.report
                    held[META][0] = TilingMeta(
                        started, plan, node, pid, chunks.reader, **shown,
                        dct_downscale=rep.dct_downscale, read_note=got.read_note(rep.note),
                        damaged=sorted(rep.damaged), damage=rep.damage_text()).encode()
                    yield held
        except SlideChanged as err:
            yield failure("changed", str(err))
        except SlideError as err:
            yield failure(err.stage, err.reason)
        except StagingError as err:
            yield failure("stage", str(err))
        except Exception as err:  # noqa: BLE001 - one bad slide must not fail the job
            log.exception("tiling %s failed", slide_id)
            yield failure("tiling", f"unexpected {type(err).__name__}: {err}")


def _write_preview(lake: Lake, spec: str, cohort: str, slide_id: str,
                   preview: Preview) -> dict[str, str]:
    """The slide's preview files; a preview that cannot be written costs a log line, not the
    slide (its rows then record no preview path)."""
    try:
        jpg, geo = lake.write_preview(spec, cohort, slide_id, render_jpeg(preview),
                                      geojson_bytes(preview, slide_id))
    except Exception as err:  # noqa: BLE001 - the embeddings matter more than the picture
        log.warning("could not write the preview of %s: %s: %s", slide_id,
                    type(err).__name__, err)
        return {}
    return {"preview_path": jpg, "geojson_path": geo}
