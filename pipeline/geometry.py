"""Where and how a slide's tiles are read, decided before any pixel is.

One frozen value (:class:`ReadGeometry`) from one pure function of the pyramid (level-0 size,
level downsamples, level-0 mpp) and the tiling spec, so every stage that needs the level, the
scale, the tile edge in level-0 pixels or the thumbnail reads the same numbers, and the rules
are tested without a slide.

Resolution rule: read the coarsest level still at least as fine as the target (within
``mpp_tolerance``), so that tiles are only ever downsampled; a whole number k of level pixels
within tolerance of one delivered pixel is area-averaged by k (delivered at k times the
level's mpp), any other scale is resampled to the target exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import TilingConfig
from pipeline.slides import SlideError
from pipeline.tissue import thumbnail_size


@dataclass(frozen=True)
class ReadGeometry:
    width: int                # level-0 pixels
    height: int
    mpp0: float               # level-0 microns per pixel
    mpp_source: str           # "file" or "manifest"
    level: int                # pyramid level the tiles are read from
    level_downsample: float
    scale: float              # level pixels per delivered pixel
    read_mpp: float           # microns per delivered pixel (the target, or k x level mpp)
    tile_px: int              # tile edge in delivered pixels
    tile_l0: float            # tile edge in level-0 pixels
    upsampled: bool           # level 0 is coarser than the target: tiles are interpolated
    thumb_size: tuple[int, int]  # (w, h) of the tissue-mask thumbnail
    thumb_level: int          # the level the thumbnail is read from

    @property
    def level_mpp(self) -> float:
        return self.mpp0 * self.level_downsample

    @property
    def whole_scale(self) -> int | None:
        """k when k whole level pixels make one delivered pixel (box-averaged), else None."""
        return int(self.scale) if self.scale == int(self.scale) else None


def choose_level(downsamples: Sequence[float], mpp0: float, target_mpp: float,
                 tolerance: float) -> int:
    """Coarsest level still at least as fine as the target (within tolerance); level 0 when
    even it is coarser (the tiles are then upsampled)."""
    limit = target_mpp * (1.0 + tolerance)
    mpps = [mpp0 * float(ds) for ds in downsamples]
    fine_enough = [i for i, mpp in enumerate(mpps) if mpp <= limit]
    return max(fine_enough, key=lambda i: mpps[i]) if fine_enough else 0


def needs_upsampling(mpp0: float, target_mpp: float, tolerance: float) -> bool:
    """True when level 0 is coarser than the target: tiles are interpolated, flag it."""
    return mpp0 > target_mpp * (1.0 + tolerance)


def read_scale(level_mpp: float, target: float, tolerance: float) -> tuple[float, float]:
    """(level px per delivered px, mpp of the delivered px) at a level of ``level_mpp``.

    A whole number k of level pixels within tolerance of the target is delivered as is
    (k = 1: the level's own pixels; k > 1: area-averaged by k), at mpp ``k * level_mpp``.
    """
    k = max(1, round(target / level_mpp))
    if abs(k * level_mpp / target - 1.0) <= tolerance:
        return float(k), k * level_mpp
    return target / level_mpp, target


def best_level_for_downsample(downsamples: Sequence[float], downsample: float) -> int:
    """OpenSlide's ``get_best_level_for_downsample``: the last level whose downsample is not
    above ``downsample`` (level 0 when all are)."""
    for i in range(1, len(downsamples)):
        if downsample < downsamples[i]:
            return i - 1
    return len(downsamples) - 1 if downsample >= downsamples[0] else 0


def read_geometry(width: int, height: int, downsamples: Sequence[float], mpp0: float,
                  mpp_source: str, cfg: TilingConfig) -> ReadGeometry:
    """The geometry of a slide with this pyramid under ``cfg`` (concrete: mpp and tile size
    set); raises ``SlideError("too_small")`` when not one tile fits."""
    if cfg.mpp is None or cfg.tile_size is None:
        raise ValueError("read_geometry needs a concrete tiling spec (TilingConfig.for_model)")
    level = choose_level(downsamples, mpp0, cfg.mpp, cfg.mpp_tolerance)
    ds = float(downsamples[level])
    scale, read_mpp = read_scale(mpp0 * ds, cfg.mpp, cfg.mpp_tolerance)
    # whole scales: exact in level-0 pixels, so the grid does not drift by float error
    tile_l0 = (cfg.tile_size * scale * ds if scale == int(scale)
               else cfg.tile_size * read_mpp / mpp0)
    if width < tile_l0 - 1e-6 or height < tile_l0 - 1e-6:
        raise SlideError(
            "too_small",
            f"slide is {width}x{height} px at level 0 ({width * mpp0:.1f}x{height * mpp0:.1f} "
            f"microns at {mpp0:.4g} um/px), smaller than one {cfg.tile_size} px tile at "
            f"{read_mpp:.4g} um/px ({tile_l0:.1f} level-0 px)",
        )
    thumb = thumbnail_size(width, height, tile_l0, cfg.thumbnail_px_per_tile)
    thumb_level = best_level_for_downsample(
        downsamples, min(width / thumb[0], height / thumb[1]))
    return ReadGeometry(
        width=int(width), height=int(height), mpp0=float(mpp0), mpp_source=mpp_source,
        level=int(level), level_downsample=ds, scale=float(scale), read_mpp=float(read_mpp),
        tile_px=int(cfg.tile_size), tile_l0=float(tile_l0),
        upsampled=needs_upsampling(mpp0, cfg.mpp, cfg.mpp_tolerance),
        thumb_size=thumb, thumb_level=thumb_level)
