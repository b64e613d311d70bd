"""Rows as the stages hand them on, for tests that feed the writers or the sink directly."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.handoff import SlidePlan, TilingMeta


def example_plan(**fields: Any) -> SlidePlan:
    """The plan of a 40x slide read at 0.5 um/px from level 0 (448 level-0 px per tile)."""
    base: dict[str, Any] = dict(
        width=2048, height=1024, mpp=0.25, mpp_source="file", level=0, level_downsample=1.0,
        tile_px=224, tile_l0=448.0, target_mpp=0.5, num_tiles=0, tissue_area_mm2=1.5,
        vendor=None, objective_power=None, upsampled=False, read_mpp=0.5)
    return SlidePlan(**{**base, **fields})


PLAN = example_plan()


def meta_column(n: int, plan: SlidePlan = PLAN) -> np.ndarray:
    """The ``meta`` column of a slide's first ``n`` rows: its TilingMeta on the first."""
    return np.array([TilingMeta(1.0, plan).encode()] + [""] * (n - 1), dtype=object)
