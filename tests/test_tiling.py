"""Slides, tissue mask, tile grid and the CPU tiling stage, on real and generated slides."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from slidegen import BOXES_GENERIC, CMU_SMALL

from pipeline.config import StorageConfig, TilingConfig
from pipeline.geometry import choose_level, needs_upsampling
from pipeline.slides import SlideError, open_slide, resolve_mpp
from pipeline.storage import fingerprint
from pipeline.tiling import SlidePlan, TileChunk, tile_slide, tiling_stage
from pipeline.tissue import (
    MIN_CHROMA,
    close_open,
    otsu_threshold,
    plan_grid,
    thumbnail_size,
    tissue_mask,
)

STD_TILING = TilingConfig(mpp=0.5, tile_size=224)


def _rgb(slide: openslide.OpenSlide, xy: tuple[int, int], level: int, size: int) -> np.ndarray:
    """Independent reference read: OpenSlide RGBA composited on white."""
    rgba = np.asarray(slide.read_region(xy, level, (size, size)))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


def _all(path: Path | str, cfg: TilingConfig,
         mpp: float | None = None) -> tuple[SlidePlan, list[TileChunk]]:
    plan, chunks = tile_slide(str(path), mpp_override=mpp, cfg=cfg)
    return plan, list(chunks)


# ---------------------------------------------------------------- generated slides themselves


def test_generated_pyramid_opens_as_aperio(generated_slides: dict[str, Path]) -> None:
    with openslide.OpenSlide(str(generated_slides["pyramid_025"])) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.dimensions == (4096, 3072)
        assert s.level_count == 3
        assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert float(s.properties["openslide.mpp-x"]) == 0.25
        assert float(s.properties["openslide.objective-power"]) == 40
        # Real tissue on glass: both present, and JPEG tiles decode to sane colours.
        thumb = np.asarray(s.get_thumbnail((512, 384)).convert("RGB")).astype(np.float32)
        sat = (thumb.max(-1) - thumb.min(-1)) / np.maximum(thumb.max(-1), 1)
        assert 0.05 < (sat > 0.15).mean() < 0.7


def test_generated_generic_tiff_has_no_mpp(generated_slides: dict[str, Path]) -> None:
    with openslide.OpenSlide(str(generated_slides["generic_nompp"])) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == 2 and s.level_downsamples == pytest.approx((1.0, 4.0))
        assert "openslide.mpp-x" not in s.properties


def test_generated_pixels_round_trip(tmp_path: Path) -> None:
    from slidegen import tissue_source, write_pyramid_svs

    rgb = np.ascontiguousarray(tissue_source()[:600, :700])
    path = write_pyramid_svs(tmp_path / "rt.svs", rgb=rgb, mpp=0.5, levels=(1, 4), quality=90)
    with openslide.OpenSlide(str(path)) as s:
        assert s.dimensions == (700, 600)
        back = _rgb(s, (0, 0), 0, 600)[:, :600]
    assert np.abs(back.astype(int) - rgb[:, :600]).mean() < 4  # JPEG q90 only


# ---------------------------------------------------------------- open / mpp / level


def test_slide_error_is_its_reason_and_pickles() -> None:
    err = SlideError("mpp", "add an mpp column")
    assert str(err) == "add an mpp column" and err.stage == "mpp"
    back = pickle.loads(pickle.dumps(err))
    assert (back.stage, back.reason, str(back)) == ("mpp", "add an mpp column", "add an mpp column")


@pytest.mark.parametrize("name", ["not_a_slide", "truncated"])
def test_unreadable_files_fail_at_open(generated_slides: dict[str, Path], name: str) -> None:
    with pytest.raises(SlideError) as info:
        open_slide(generated_slides[name])
    assert info.value.stage == "open"
    if name == "not_a_slide":
        assert str(info.value).startswith(
            "not a readable slide or image (OpenSlideUnsupportedFormatError")
    else:  # cut in half: said so, with the sizes, not "unsupported or missing image file"
        assert re.match(r"slide file is truncated: [\d,]+ bytes, but TIFF page \d+ places "
                        r"image data up to byte [\d,]+; copy it again", str(info.value))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="not found") as info:
        open_slide(tmp_path / "nope.svs")
    assert info.value.stage == "open"
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(tmp_path / "empty.svs")


def test_resolve_mpp_file_manifest_and_missing(generated_slides: dict[str, Path]) -> None:
    with open_slide(generated_slides["pyramid_025"]) as s:
        assert resolve_mpp(s, None) == (0.25, "file")
        assert resolve_mpp(s, 0.5) == (0.5, "manifest")  # the manifest wins
        with pytest.raises(SlideError, match="plausible") as info:
            resolve_mpp(s, 250.0)  # nanometres by mistake
        assert info.value.stage == "mpp"
    with open_slide(generated_slides["generic_nompp"]) as s:
        with pytest.raises(SlideError) as info:
            resolve_mpp(s, None)
        assert info.value.stage == "mpp"
        assert "openslide.mpp-x missing" in str(info.value)
        assert "add an `mpp` column" in str(info.value)
        assert resolve_mpp(s, 0.5) == (0.5, "manifest")


def test_default_dpi_tiff_mpp_is_rejected() -> None:
    # boxes-generic.tiff carries 72 dpi resolution tags, which OpenSlide turns into 352.8 um/px.
    with open_slide(BOXES_GENERIC) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(352.78, rel=1e-3)
        with pytest.raises(SlideError, match="`mpp` column") as info:
            resolve_mpp(s, None)
        assert info.value.stage == "mpp"


@pytest.mark.parametrize(
    ("target", "level"),
    [(0.5, 0), (0.25, 0), (1.0, 1), (0.99, 1), (0.97, 0), (2.0, 1), (4.0, 2), (8.0, 2)],
)
def test_choose_level(target: float, level: int) -> None:
    assert choose_level([1.0, 4.0, 16.0], 0.25, target, 0.02) == level


def test_choose_level_upsampling_uses_level_zero() -> None:
    assert choose_level([1.0, 4.0, 16.0], 0.25, 0.2, 0.02) == 0
    assert needs_upsampling(0.25, 0.2, 0.02)
    assert not needs_upsampling(0.25, 0.25, 0.02)
    assert not needs_upsampling(0.504, 0.5, 0.02)


# ---------------------------------------------------------------- grid geometry (no pixels)


def test_grid_full_mask_row_major_and_edges() -> None:
    mask = np.ones((80, 105), bool)  # 10 mask px per 100 level-0 px
    grid = plan_grid(mask, width=1050, height=799, tile_l0=100.0, min_tissue=0.5, mpp0=0.5)
    assert (grid.rows, grid.cols) == (7, 10)  # partial 11th column and 8th row excluded
    assert grid.num_tiles == 70
    assert np.array_equal(grid.row, np.repeat(np.arange(7), 10))
    assert np.array_equal(grid.col, np.tile(np.arange(10), 7))
    assert np.array_equal(grid.x, grid.col.astype(np.int64) * 100)
    assert np.array_equal(grid.y, grid.row.astype(np.int64) * 100)
    assert grid.x.dtype == np.int64 and grid.tissue.dtype == np.float32
    assert np.all(grid.tissue == 1.0)
    assert grid.tissue_area_mm2 == pytest.approx(1050 * 799 * 0.25 / 1e6)
    assert np.all(grid.x + grid.tile_l0 <= 1050) and np.all(grid.y + grid.tile_l0 <= 799)


def test_grid_min_tissue_and_fractions() -> None:
    mask = np.zeros((40, 40), bool)  # 10 mask px per tile of 100 level-0 px; 4x4 grid
    mask[:, :15] = True  # column 0 full, column 1 half
    mask[0:10, 30:31] = True  # one tenth of tile (0, 3)
    grid = plan_grid(mask, 400, 400, 100.0, min_tissue=0.5, mpp0=1.0)
    assert list(zip(grid.row.tolist(), grid.col.tolist(), strict=True)) == [
        (r, c) for r in range(4) for c in (0, 1)
    ]
    assert grid.tissue.tolist() == [1.0, 0.5] * 4
    low = plan_grid(mask, 400, 400, 100.0, min_tissue=0.1, mpp0=1.0)
    assert (0, 3) in list(zip(low.row.tolist(), low.col.tolist(), strict=True))
    assert low.tissue[(low.row == 0) & (low.col == 3)][0] == pytest.approx(0.1)
    none = plan_grid(mask, 400, 400, 100.0, min_tissue=0.51, mpp0=1.0)
    assert none.num_tiles == 4 and np.all(none.col == 0)
    assert grid.tissue_area_mm2 == pytest.approx(mask.sum() * 100 / 1e6)


def test_grid_fractional_tile_and_coarse_mask() -> None:
    # 0.499 um/px slide, 224 px tiles at 0.5 um/px -> 224.45 level-0 px per tile; mask at
    # ~3.3 px per tile with different x/y scales from thumbnail rounding.
    tile_l0 = 224 * 0.5 / 0.499
    mask = np.ones((41, 33), bool)
    grid = plan_grid(mask, 2220, 2967, tile_l0, 0.25, 0.499)
    assert (grid.rows, grid.cols) == (13, 9)
    assert grid.num_tiles == 117
    assert np.array_equal(grid.x[:9], np.floor(np.arange(9) * tile_l0 + 0.5).astype(np.int64))
    assert np.all(grid.x + tile_l0 <= 2220) and np.all(grid.y + tile_l0 <= 2967)
    # order is row-major: sorting by (row, col) changes nothing
    order = np.lexsort((grid.col, grid.row))
    assert np.array_equal(order, np.arange(grid.num_tiles))


def test_grid_tile_smaller_than_mask_pixel_and_too_small_slide() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True
    grid = plan_grid(mask, 400, 400, 25.0, 0.5, 1.0)  # 16x16 tiles, 4 per mask pixel edge
    assert grid.num_tiles == 16
    assert set(grid.row.tolist()) == {4, 5, 6, 7} and set(grid.col.tolist()) == {8, 9, 10, 11}
    empty = plan_grid(mask, 20, 400, 25.0, 0.0, 1.0)
    assert (empty.cols, empty.num_tiles) == (0, 0)


def test_thumbnail_size_and_cap() -> None:
    assert thumbnail_size(2240, 1120, 224.0, 8) == (80, 40)
    w, h = thumbnail_size(200_000, 100_000, 224.0, 8)
    assert (w, h) == (4096, 2048)


# ---------------------------------------------------------------- tissue mask


def test_mask_blank_glass_has_no_tissue() -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.normal(0, 3, (100, 120, 3)), 0, 255).astype(np.uint8)
    mask, threshold = tissue_mask(glass)
    assert not mask.any()
    # the chroma threshold rises above the glass's own noise (sigma 3 per channel here)
    assert threshold > MIN_CHROMA


def test_mask_finds_tissue_and_skips_black() -> None:
    img = np.full((100, 100, 3), 240, np.uint8)
    img[20:60, 30:80] = (200, 110, 180)  # H&E pink/purple
    img[70:90, 10:30] = (230, 190, 215)  # pale eosin (chroma ~0.17 over the glass)
    img[:, :5] = (10, 5, 8)  # scanner border: dark, "saturated" by noise
    mask, _ = tissue_mask(img)
    assert mask[20:60, 30:80].all()
    assert mask[72:88, 12:28].all()
    assert not mask[:, :5].any()
    assert mask.sum() == 40 * 50 + 20 * 20


def test_morphology_and_otsu() -> None:
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    m[9, 9] = False  # pinhole
    m[2, 17] = True  # speck
    out = close_open(m)
    assert out[5:15, 5:15].all() and not out[1, 18] and out.sum() == 100
    values = np.concatenate([np.full(100, 0.1), np.full(100, 0.6)])
    assert 0.1 < otsu_threshold(values) <= 0.6


# ---------------------------------------------------------------- tiling: pixels and chunks


def test_exact_level0_tiles_equal_read_region(generated_slides: dict[str, Path]) -> None:
    cfg = TilingConfig(mpp=0.5, tile_size=224, chunk_tiles=10, region_tiles=4)
    plan, chunks = _all(generated_slides["flat_050"], cfg)
    assert (plan.level, plan.tile_l0, plan.read_mpp, plan.upsampled) == (0, 224.0, 0.5, False)
    assert plan.num_tiles == 9 * 6  # tissue everywhere, partial tiles excluded
    with openslide.OpenSlide(str(generated_slides["flat_050"])) as s:
        for chunk in chunks:
            for tile, x, y in zip(chunk.tiles, chunk.x, chunk.y, strict=True):
                assert np.array_equal(tile, _rgb(s, (int(x), int(y)), 0, 224))


def test_chunks_are_contiguous_row_major(generated_slides: dict[str, Path]) -> None:
    cfg = TilingConfig(mpp=0.5, tile_size=224, chunk_tiles=7, region_tiles=2)
    plan, chunks = _all(generated_slides["flat_050"], cfg)
    sizes = [len(c.tiles) for c in chunks]
    assert sizes == [7] * (plan.num_tiles // 7) + ([plan.num_tiles % 7] if plan.num_tiles % 7
                                                    else [])
    index = np.concatenate([c.index for c in chunks])
    assert np.array_equal(index, np.arange(plan.num_tiles))
    x = np.concatenate([c.x for c in chunks])
    y = np.concatenate([c.y for c in chunks])
    assert np.array_equal(np.lexsort((x, y)), np.arange(len(x)))  # sorted by (y, x)
    for c in chunks:
        assert c.tiles.dtype == np.uint8 and c.tiles.shape[1:] == (224, 224, 3)
        assert c.x.dtype == c.y.dtype == c.index.dtype == np.int64
        assert c.tissue.dtype == np.float32 and np.all(c.tissue >= cfg.min_tissue)


def test_resampled_tiles_match_reference(generated_slides: dict[str, Path]) -> None:
    # the exact box filter (the default halves inside the JPEG IDCT: test_tiffread bounds it)
    cfg = TilingConfig(mpp=0.5, tile_size=128, chunk_tiles=64, region_tiles=4,
                       dct_downscale=False)
    plan, chunks = _all(generated_slides["pyramid_025"], cfg)
    # level 1 (1.0 um/px) is too coarse for 0.5: read level 0 and halve
    assert (plan.level, plan.level_downsample, plan.tile_l0, plan.read_mpp) == (0, 1.0, 256.0, 0.5)
    assert plan.vendor == "aperio" and plan.objective_power == 40.0 and plan.mpp_source == "file"
    tiles = np.concatenate([c.tiles for c in chunks])
    x = np.concatenate([c.x for c in chunks])
    y = np.concatenate([c.y for c in chunks])
    assert len(tiles) == plan.num_tiles > 20
    with openslide.OpenSlide(str(generated_slides["pyramid_025"])) as s:
        for i in np.linspace(0, len(tiles) - 1, 12).astype(int):
            # an exact 2x: 256 level-0 px area-averaged 2x2 into 128 (box filter, exact)
            big = Image.fromarray(_rgb(s, (int(x[i]), int(y[i])), 0, 256))
            assert np.array_equal(tiles[i], np.asarray(big.reduce(2)))


def test_region_size_does_not_change_pixels(generated_slides: dict[str, Path]) -> None:
    path = generated_slides["pyramid_025"]
    base = dict(mpp=0.5, tile_size=128)
    _, a = _all(path, TilingConfig(**base, region_tiles=1, chunk_tiles=5))
    _, b = _all(path, TilingConfig(**base, region_tiles=8, chunk_tiles=64))
    ta, tb = np.concatenate([c.tiles for c in a]), np.concatenate([c.tiles for c in b])
    assert ta.shape == tb.shape
    for key in ("x", "y", "index"):
        assert np.array_equal(np.concatenate([getattr(c, key) for c in a]),
                              np.concatenate([getattr(c, key) for c in b]))
    assert np.abs(ta.astype(int) - tb.astype(int)).max() <= 1  # seams: float rounding only


def test_coarser_level_read_without_resampling(generated_slides: dict[str, Path]) -> None:
    cfg = TilingConfig(mpp=1.0, tile_size=64, chunk_tiles=1000)
    plan, chunks = _all(generated_slides["pyramid_025"], cfg)
    assert (plan.level, plan.level_downsample, plan.tile_l0, plan.read_mpp) == (1, 4.0, 256.0, 1.0)
    (chunk,) = chunks
    with openslide.OpenSlide(str(generated_slides["pyramid_025"])) as s:
        for i in range(0, len(chunk.tiles), 5):
            ref = _rgb(s, (int(chunk.x[i]), int(chunk.y[i])), 1, 64)
            assert np.array_equal(chunk.tiles[i], ref)


def test_real_cmu_slide() -> None:
    cfg = TilingConfig(mpp=0.5, tile_size=224)
    plan, chunks = _all(CMU_SMALL, cfg)
    # 0.499 um/px is within tolerance of 0.5: level-0 pixels as they are, 224 px apart
    assert (plan.width, plan.height, plan.mpp, plan.read_mpp) == (2220, 2967, 0.499, 0.499)
    assert (plan.level, plan.tile_l0, plan.upsampled) == (0, 224.0, False)
    grid_tiles = (2220 // 224) * (2967 // 224)
    assert 20 < plan.num_tiles < grid_tiles
    assert 0.3 < plan.tissue_area_mm2 < 1.6  # the image is 1.6 mm2, mostly glass
    x = np.concatenate([c.x for c in chunks])
    y = np.concatenate([c.y for c in chunks])
    assert len(x) == plan.num_tiles
    assert np.all((x >= 0) & (x + 224 <= 2220) & (y >= 0) & (y + 224 <= 2967))
    # tissue tiles are coloured: mean saturation well above glass
    tiles = np.concatenate([c.tiles for c in chunks]).astype(np.float32)
    sat = (tiles.max(-1) - tiles.min(-1)) / np.maximum(tiles.max(-1), 1)
    assert sat.mean() > 0.15


def test_upsampling_is_flagged() -> None:
    cfg = TilingConfig(mpp=0.25, tile_size=224)
    plan, chunks = tile_slide(str(CMU_SMALL), mpp_override=None, cfg=cfg)
    with chunks:
        first = next(chunks)
    assert plan.upsampled and plan.level == 0 and plan.read_mpp == 0.25
    assert plan.tile_l0 == pytest.approx(224 * 0.25 / 0.499)
    assert first.tiles.shape[1:] == (224, 224, 3)
    assert next(chunks, None) is None  # closed: no more chunks, slide released


# ---------------------------------------------------------------- tiling: errors


def test_no_tissue(generated_slides: dict[str, Path]) -> None:
    with pytest.raises(SlideError) as info:
        tile_slide(str(generated_slides["blank"]), mpp_override=None, cfg=STD_TILING)
    assert info.value.stage == "no_tissue"
    assert str(info.value).startswith("no tissue found: 0 of ")
    assert "min_tissue=0.25" in str(info.value)


def test_too_small(generated_slides: dict[str, Path]) -> None:
    with pytest.raises(SlideError) as info:
        tile_slide(str(generated_slides["tiny"]), mpp_override=None, cfg=STD_TILING)
    assert info.value.stage == "too_small"
    assert "16x16" in str(info.value) and "224" in str(info.value)


@pytest.mark.parametrize(("name", "stage"), [("not_a_slide", "open"), ("truncated", "open"),
                                             ("generic_nompp", "mpp")])
def test_errors_before_plan(generated_slides: dict[str, Path], name: str, stage: str) -> None:
    with pytest.raises(SlideError) as info:
        tile_slide(str(generated_slides[name]), mpp_override=None, cfg=STD_TILING)
    assert info.value.stage == stage


def test_corrupt_tiles_fail_while_reading(generated_slides: dict[str, Path]) -> None:
    # The directory is intact, so the plan succeeds; decoding damaged tiles must surface as a
    # SlideError("read"), never as a raw OpenSlideError.
    plan, chunks = tile_slide(str(generated_slides["corrupt_tiles"]), mpp_override=None,
                              cfg=TilingConfig(mpp=0.5, tile_size=224))
    assert plan.num_tiles > 0
    with pytest.raises(SlideError) as info:
        list(chunks)
    assert info.value.stage == "read"
    assert "corrupt or truncated" in str(info.value)


def test_no_mpp_slides_tile_with_manifest_override(generated_slides: dict[str, Path]) -> None:
    plan, chunks = _all(generated_slides["generic_nompp"], STD_TILING, mpp=0.5)
    assert plan.mpp_source == "manifest" and plan.vendor == "generic-tiff"
    assert plan.num_tiles == (1024 // 224) * (768 // 224)
    assert sum(len(c.tiles) for c in chunks) == plan.num_tiles
    # boxes-generic.tiff: 300x250 synthetic boxes, bogus 72 dpi mpp overridden. Its pure red,
    # green and blue are marker-ink colours to the tissue mask, not stain: keep every tile.
    plan, chunks = _all(BOXES_GENERIC, TilingConfig(mpp=0.5, tile_size=64, min_tissue=0.0), mpp=0.5)
    assert plan.mpp_source == "manifest" and plan.level == 0
    assert 0 < plan.num_tiles <= (300 // 64) * (250 // 64)
    assert sum(len(c.tiles) for c in chunks) == plan.num_tiles


def _batch(path: Path, fp: str) -> dict[str, np.ndarray]:
    return {"slide_id": np.array(["s"], object), "uri": np.array([str(path)], object),
            "mpp": np.array([np.nan]), "models": np.array(["m"], object),
            "fingerprint": np.array([fp], object)}


def _rewrite(path: Path) -> None:
    """The same bytes written again: the fingerprint (size, mtime) is a new one."""
    data = path.read_bytes()
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_a_slide_changed_after_planning_fails_as_changed(tmp_path: Path) -> None:
    path = shutil.copy(CMU_SMALL, tmp_path / "s.svs")
    planned = str(fingerprint(LocalFileSystem(), str(path)))
    _rewrite(Path(path))
    cfg = TilingConfig(mpp=0.5, tile_size=224, chunk_tiles=8)
    (row,) = list(tiling_stage(_batch(path, planned), tiling=cfg, storage=StorageConfig()))
    assert row["error_stage"][0] == "changed"
    assert "changed during the run (before tiling)" in row["error"][0]
    assert planned in row["error"][0]


def test_a_slide_changed_while_tiled_never_completes(tmp_path: Path) -> None:
    path = Path(shutil.copy(CMU_SMALL, tmp_path / "s.svs"))
    cfg = TilingConfig(mpp=0.5, tile_size=224, chunk_tiles=8)
    planned = str(fingerprint(LocalFileSystem(), str(path)))
    store = StorageConfig()
    whole = list(tiling_stage(_batch(path, planned), tiling=cfg, storage=store))
    assert len(whole) > 2 and not any(r["error"][0] for r in whole)

    rows = tiling_stage(_batch(path, planned), tiling=cfg, storage=store)
    first = next(rows)
    _rewrite(path)  # replaced while its first chunk is on its way
    rest = list(rows)
    assert not first["error"][0]
    # one chunk short, then the error row: the slide can never complete at its writer
    assert len(rest) == len(whole) - 1
    assert rest[-1]["error_stage"][0] == "changed" and "while it was tiled" in rest[-1]["error"][0]
