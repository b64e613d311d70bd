"""What every pixel reader is: the :class:`Reader` base that tiling talks to, and the
:class:`DamageLog` readers fill.

Tiling never asks which reader it holds: each reader answers for the levels it serves, sizes
and drops its own caches (:meth:`Reader.prepare`, :meth:`Reader.clear_caches`) and reports
damaged tiles in :attr:`Reader.damage`. A new format's reader subclasses :class:`Reader`,
overrides what it does better than the defaults, and registers an opener in
:mod:`pipeline.readers`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from pipeline.geometry import ReadGeometry
    from pipeline.tissue import TileGrid

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in level pixels


class ReadError(Exception):
    """A strict read found the file's data corrupt or cut short (tiling names the slide)."""


class DamageLog:
    """File tiles (or, through OpenSlide, pieces of a level) whose pixels did not decode.

    Readers record each one as a level-pixel box with the decoder's complaint and deliver it
    as white (glass) instead of failing the slide; tiling flags the tiles that overlap one
    (:func:`pipeline.tiling._read_region`). Thread-safe: a reader's threads share one log.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[int, ...], str] = {}  # (level, x0, y0, x1, y1) -> why
        self._boxes: dict[int, np.ndarray] = {}  # level -> (n, 4) int64, rebuilt on add

    def add(self, level: int, box: tuple[int, int, int, int], reason: str) -> None:
        """Record level-pixel box (x0, y0, x1, y1) of ``level`` as damaged, and why."""
        key = (level, *(int(v) for v in box))
        with self._lock:
            if key in self._items:
                return
            self._items[key] = reason
            mine = [k[1:] for k in self._items if k[0] == level]
            self._boxes[level] = np.asarray(mine, np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self._items)

    def boxes(self, level: int) -> np.ndarray:
        """(n, 4) x0, y0, x1, y1 of the damaged boxes of ``level``."""
        with self._lock:
            return self._boxes.get(level, np.zeros((0, 4), np.int64))

    def notes(self, levels: Sequence[int] | None = None, limit: int = 8) -> list[str]:
        """Up to ``limit`` damaged boxes (of ``levels``; all when None) with their reasons."""
        with self._lock:
            items = sorted(self._items.items())
        if levels is not None:
            items = [(k, r) for k, r in items if k[0] in levels]
        return [f"level {k[0]} px {k[1]},{k[2]}-{k[3]},{k[4]}: {r}" for k, r in items[:limit]]

    def count(self, levels: Sequence[int] | None = None) -> int:
        """Damaged boxes of ``levels`` (all when None)."""
        with self._lock:
            return sum(1 for k in self._items if levels is None or k[0] in levels)


class ByteSource(Protocol):
    """Where a reader's tile bytes come from when not from its local file (``os.pread``):
    e.g. ranged GETs of the slide in object storage (:mod:`pipeline.remote`)."""

    def get(self, offsets: list[int], counts: list[int]) -> list[memoryview | None]:
        """The bytes of each (offset, count) range (count 0: None); thread-safe."""
        ...

    def plan(self, offsets: np.ndarray, counts: np.ndarray) -> None:
        """The file tiles about to be read, in reading order (to fetch them ahead)."""
        ...


class Reader:
    """Integer RGB boxes of a slide's pyramid levels, composited on white.

    Defaults describe the plainest reader: every level served, no reduced reads, no caches.
    """

    name = "reader"  # recorded in the slides row: which reader delivered the pixels

    def __init__(self) -> None:
        self.damage = DamageLog()  # file tiles delivered white, and why
        self.note = ""  # why a faster way (of this reader, or another) is not used

    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]:
        raise NotImplementedError

    def has_level(self, level: int) -> bool:
        """Whether this reader serves ``level`` (a fast reader may serve only some)."""
        return 0 <= level < len(self.level_dimensions)

    def read_rgb(self, level: int, x: int, y: int, w: int, h: int,
                 need: Sequence[Box] | None = None) -> np.ndarray:
        """RGB of the integer box (x, y, w, h) of ``level``. ``need``: the level-pixel boxes
        that matter; a reader may skip decoding the rest (it reads as white)."""
        raise NotImplementedError

    def can_reduce(self, level: int, x: int, y: int, w: int, h: int, k: int) -> bool:
        """Whether :meth:`read_reduced` can area-average this box by ``k`` itself."""
        return False

    def read_reduced(self, level: int, x: int, y: int, w: int, h: int, k: int,
                     need: Sequence[Box] | None = None, *, scratch: bool = False
                     ) -> np.ndarray:
        """The box area-averaged by ``k``; ``scratch``: may be a view of a per-thread buffer
        that the thread's next scratch read overwrites."""
        raise NotImplementedError

    def dct_ok(self, level: int, k: int) -> bool:
        """Whether a box reduced by ``k`` comes out of the JPEG decoder's scaled IDCT."""
        return False

    def read_from(self, source: ByteSource) -> None:
        """Take the file's bytes from ``source`` rather than the local file (whose holes
        ``source`` fills); readers that cannot refuse."""
        raise ReadError(f"the {self.name} reader reads local files only")

    def prepare(self, grid: TileGrid, geo: ReadGeometry) -> None:
        """Size caches for reading ``grid`` at ``geo`` (called once, before the tiles)."""

    def clear_caches(self) -> None:
        """Drop cached pixels (after the thumbnail: its level is not read again)."""

    def close(self) -> None:
        """Release what the reader opened; safe to call more than once."""
