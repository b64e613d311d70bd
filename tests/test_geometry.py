"""The read geometry: one pure function of the pyramid and the tiling spec, no slide needed."""

from __future__ import annotations

from pathlib import Path

import openslide
import pytest

from pipeline.config import TilingConfig
from pipeline.geometry import best_level_for_downsample, read_geometry, read_scale
from pipeline.slides import SlideError
from pipeline.tiling import slide_geometry

SLIDES = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
SPEC = TilingConfig(mpp=0.5, tile_size=224)


def test_40x_slide_is_read_at_level_0_and_halved_exactly() -> None:
    g = read_geometry(100_000, 80_000, [1.0, 4.0, 16.0], 0.25, "file", SPEC)
    assert (g.level, g.scale, g.whole_scale, g.read_mpp) == (0, 2.0, 2, 0.5)
    assert g.tile_l0 == 448.0 and g.level_mpp == 0.25 and not g.upsampled
    # 8 mask px per 448 level-0 px, capped at 4096 on the long side
    assert g.thumb_size == (1786, 1429) and g.thumb_level == 2


def test_near_whole_scales_read_at_k_times_the_level_mpp() -> None:
    """0.2527 um/px is within 2% of 0.25: 2 pixels make one, at 0.5054 um/px, not 0.5."""
    g = read_geometry(50_000, 40_000, [1.0, 4.0], 0.2527, "file", SPEC)
    assert (g.scale, g.read_mpp) == (2.0, pytest.approx(0.5054))
    assert g.tile_l0 == 448.0


def test_fractional_scales_resample_to_the_target() -> None:
    g = read_geometry(30_000, 30_000, [1.0, 4.0], 0.3, "manifest", SPEC)
    assert g.whole_scale is None and g.read_mpp == 0.5
    assert g.scale == pytest.approx(0.5 / 0.3) and g.tile_l0 == pytest.approx(224 * 0.5 / 0.3)
    assert g.mpp_source == "manifest"


def test_coarse_scans_are_upsampled_from_level_0_and_flagged() -> None:
    g = read_geometry(8_000, 8_000, [1.0, 4.0], 1.0, "file", SPEC)
    assert (g.level, g.upsampled, g.read_mpp) == (0, True, 0.5) and g.scale == 0.5


def test_a_slide_smaller_than_a_tile_is_refused() -> None:
    with pytest.raises(SlideError, match="smaller than one 224 px tile") as info:
        read_geometry(400, 5_000, [1.0], 0.25, "file", SPEC)
    assert info.value.stage == "too_small"


def test_read_scale_rule() -> None:
    assert read_scale(0.25, 0.5, 0.02) == (2.0, 0.5)
    assert read_scale(0.5, 0.5, 0.02) == (1.0, 0.5)
    assert read_scale(0.26, 0.5, 0.02) == (pytest.approx(0.5 / 0.26), 0.5)  # 4% off


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "boxes-generic.tiff"])
def test_thumbnail_level_matches_openslide(name: str) -> None:
    with openslide.OpenSlide(str(SLIDES / name)) as s:
        ds = [float(d) for d in s.level_downsamples]
        for want in (0.5, 1.0, 1.5, 3.9, 4.0, 4.1, 15.9, 16.0, 17.0, 100.0):
            assert best_level_for_downsample(ds, want) == s.get_best_level_for_downsample(want)
        g = slide_geometry(s, 0.5 if "boxes" in name else None, SPEC)
        w, h = s.dimensions
        assert g.thumb_level == s.get_best_level_for_downsample(
            min(w / g.thumb_size[0], h / g.thumb_size[1]))


def test_best_level_on_synthetic_pyramids() -> None:
    ds = [1.0, 4.0, 16.0, 64.0]
    assert [best_level_for_downsample(ds, d) for d in (0.5, 1, 3.99, 4, 63, 64, 500)] == \
        [0, 0, 0, 1, 2, 3, 3]
