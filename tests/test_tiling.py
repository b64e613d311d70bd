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
    # the exact box filter (the default halves inside the JPEG IDCT: test_readers_tiff bounds it)
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


# ---------------------------------------------------------------- damaged JPEG tiles
# One damaged file tile among 192 (16 x 12 tiles of 256 px, tissue everywhere), read by both
# readers. 448 level-0 px tiles (0.5 um/px from 0.25): file tile (6, 6) lies inside tile 30.

DAMAGED_AT = (6, 6)


@pytest.fixture(scope="module")
def clean192(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slidegen import write_pyramid_svs

    return write_pyramid_svs(tmp_path_factory.mktemp("damage") / "clean.svs", width=4096,
                             height=3072, mpp=0.25, levels=(1, 4), tile=256, background=False)


def _read(path: Path, **kw: object) -> tuple[np.ndarray, np.ndarray, object]:
    cfg = TilingConfig(**{"mpp": 0.5, "tile_size": 224, "min_tissue": 0.0,  # type: ignore[arg-type]
                          "max_damaged_fraction": 0.2, **kw})
    _, chunks = tile_slide(str(path), mpp_override=None, cfg=cfg)
    with chunks:
        parts = list(chunks)
    xy = np.stack([np.concatenate([c.x for c in parts]), np.concatenate([c.y for c in parts])], 1)
    return np.concatenate([c.tiles for c in parts]), xy, chunks


def _over(xy: np.ndarray, file_tile: tuple[int, int], tile_l0: int = 448,
          file_px: int = 256) -> set[int]:
    """Tiles (level-0 boxes from their corners) that overlap a level-0 file tile."""
    fx, fy = file_tile[0] * file_px, file_tile[1] * file_px
    hit = ((xy[:, 0] < fx + file_px) & (xy[:, 0] + tile_l0 > fx) &
           (xy[:, 1] < fy + file_px) & (xy[:, 1] + tile_l0 > fy))
    return set(np.nonzero(hit)[0].tolist())


# (kind, seed): random_bytes seed 1 ends the entropy data early, as every decoder sees; seed 2
# leaves 69 bytes over, which only a decoder that finishes the stream sees (ours; OpenSlide
# stops after the last row and returns the garbage: see README, Guarantees).
SEEN_BY_BOTH = [("early_eoi", 0), ("no_soi", 0), ("random_bytes", 1), ("cut_short", 0)]
SEEN_BY_TIFF = [("extraneous_bytes", 0), ("random_bytes", 2)]


@pytest.mark.parametrize("reader", ["tiff", "openslide"])
@pytest.mark.parametrize(("kind", "seed"), SEEN_BY_BOTH + SEEN_BY_TIFF)
def test_a_damaged_tile_is_flagged_and_the_rest_untouched(clean192: Path, tmp_path: Path,
                                                          reader: str, kind: str,
                                                          seed: int) -> None:
    from slidegen import write_damaged_tiles

    bad = write_damaged_tiles(tmp_path / "bad.svs", clean192, [DAMAGED_AT], kind, seed=seed)
    ref, xy, _ = _read(clean192, reader=reader)
    tiles, xy_bad, chunks = _read(bad, reader=reader)
    assert chunks.reader == reader and np.array_equal(xy, xy_bad)
    expect = _over(xy, DAMAGED_AT)
    assert expect == {30}
    report = chunks.report
    if reader == "openslide" and (kind, seed) in SEEN_BY_TIFF:
        # OpenSlide does not see it: nothing flagged; extraneous bytes after the last MCU
        # leave the pixels intact, random bytes do not (the documented gap of that path)
        assert report.damaged == set()
        if kind == "extraneous_bytes":
            assert np.array_equal(tiles, ref)
        return
    assert report.damaged == expect
    assert (tiles[sorted(expect)] == 255).all()  # white, never the decoder's guess
    keep = [i for i in range(len(ref)) if i not in expect]
    assert np.array_equal(tiles[keep], ref[keep])  # every other tile bit-identical
    text = report.damage_text()
    assert text is not None and "level 0 px 1536,1536-1792,1792" in text


@pytest.mark.parametrize(("reader", "dct", "mpp"), [("tiff", True, 0.5), ("tiff", False, 0.5),
                                                    ("tiff", True, 0.25),
                                                    ("openslide", False, 0.5)])
def test_every_code_path_flags_the_same_tile(clean192: Path, tmp_path: Path, reader: str,
                                             dct: bool, mpp: float) -> None:
    # The same file must not pass on one decoder and fail on another: reduced-size IDCT,
    # full decode + box filter, full size without reduction, and OpenSlide all flag it
    # (an early end of image: the libjpeg warning every decoder reports).
    from slidegen import write_damaged_tiles

    bad = write_damaged_tiles(tmp_path / "bad.svs", clean192, [DAMAGED_AT], "early_eoi")
    tiles, xy, chunks = _read(bad, reader=reader, dct_downscale=dct, mpp=mpp)
    expect = _over(xy, DAMAGED_AT, tile_l0=448 if mpp == 0.5 else 224)
    assert chunks.report.damaged == expect and expect
    assert chunks.report.dct_downscale == (reader == "tiff" and dct and mpp == 0.5)


def test_openslide_recovers_with_threads(clean192: Path, tmp_path: Path) -> None:
    # A failed read_region spoils the shared OpenSlide handle for every thread: each thread
    # whose read fails re-reads its region piece by piece on a handle of its own, so only
    # the tiles on the damaged file tiles are flagged, whichever thread read them.
    from slidegen import write_damaged_tiles

    hits = [(6, 6), (2, 9), (13, 1)]
    bad = write_damaged_tiles(tmp_path / "bad.svs", clean192, hits, "no_soi")
    ref, xy, _ = _read(clean192, reader="openslide")
    tiles, _, chunks = _read(bad, reader="openslide", threads=2, region_tiles=2)
    expect = set().union(*(_over(xy, h) for h in hits))
    assert chunks.report.damaged == expect and len(expect) >= 3
    keep = [i for i in range(len(ref)) if i not in expect]
    assert np.array_equal(tiles[keep], ref[keep])


@pytest.mark.parametrize("reader", ["tiff", "openslide"])
def test_too_many_damaged_tiles_fail_the_slide(clean192: Path, tmp_path: Path,
                                               reader: str) -> None:
    from slidegen import write_damaged_tiles

    row = [(x, 3) for x in range(16)]  # a whole row of file tiles: 16 of the 54 tiles
    bad = write_damaged_tiles(tmp_path / "bad.svs", clean192, row, "early_eoi")
    with pytest.raises(SlideError) as info:
        _read(bad, reader=reader, max_damaged_fraction=0.05)
    msg = str(info.value)
    assert info.value.stage == "read"
    n = int(re.search(r"at least (\d+) of 54 tiles", msg).group(1))  # type: ignore[union-attr]
    assert 2 < n <= 18
    assert "max_damaged_fraction=0.05 allows (2)" in msg and "corrupt or truncated" in msg
    assert re.search(r"tiles (\d+, )+", msg) and "premature end of data segment" in msg
    # one damaged tile is within 0.02 of 54 tiles (1 allowed), not within 0
    one = write_damaged_tiles(tmp_path / "one.svs", clean192, [DAMAGED_AT], "early_eoi")
    _read(one, reader=reader, max_damaged_fraction=0.02)
    with pytest.raises(SlideError, match=r"at least 1 of 54 tiles .* allows \(0\)"):
        _read(one, reader=reader, max_damaged_fraction=0.0)


def test_the_slide_row_records_damage_and_the_settings_used(clean192: Path,
                                                            tmp_path: Path) -> None:
    # Through the Ray Data stage: the meta rides on the slide's last chunk (only then is the
    # damage known) and says which tiles, why, and how the pixels were read; past the
    # fraction the slide is one error row naming them.
    from slidegen import write_damaged_tiles

    from pipeline.coordinator import _read_values, _used
    from pipeline.handoff import TilingMeta

    bad = write_damaged_tiles(tmp_path / "bad.svs", clean192, [DAMAGED_AT], "early_eoi")
    planned = str(fingerprint(LocalFileSystem(), str(bad)))
    cfg = TilingConfig(mpp=0.5, tile_size=224, min_tissue=0.0, chunk_tiles=16,
                       max_damaged_fraction=0.05)
    rows = list(tiling_stage(_batch(bad, planned), tiling=cfg, storage=StorageConfig()))
    assert len(rows) == 4 and not any(r["error"][0] for r in rows)
    metas = [m for r in rows for m in r["meta"] if m]
    assert len(metas) == 1 and rows[-1]["meta"][0] == metas[0]
    meta = TilingMeta.decode(metas[0])
    assert meta.damaged == [30] and meta.reader == "tiff" and meta.dct_downscale is True
    assert meta.damage is not None and "tile 6,6 of page 0" in meta.damage
    assert meta.read_note is None
    values = _read_values(meta)
    assert values["damaged_tiles"] == 1 and values["damaged_tile_indices"] == [30]
    used = _used(cfg, meta)
    assert used["reader"] == "tiff" and used["dct_downscale"] is True
    # the tile as the encoders get it: white
    tile30 = rows[1]["tile"][30 - 16]
    assert rows[1]["index"][30 - 16] == 30 and (tile30 == 255).all()

    strict = cfg.model_copy(update={"max_damaged_fraction": 0.0})
    (row,) = list(tiling_stage(_batch(bad, planned), tiling=strict, storage=StorageConfig()))
    assert row["error_stage"][0] == "read"
    assert "1 of 54 tiles" in row["error"][0] and "tiles 30;" in row["error"][0]


def test_the_settings_used_say_when_the_reader_declined_the_dct(
        clean192: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The config asks for reduced-size decoding; a slide whose check says no is read with the
    # box filter, and its row must say so, not repeat the config's dct_downscale: true.
    import pipeline.readers.tiff as tr
    from pipeline.coordinator import _used
    from pipeline.handoff import TilingMeta

    monkeypatch.setattr(tr.TiffJpegReader, "_check_dct",
                        lambda *a: "modelled: differs from the box average")
    _, _, chunks = _read(clean192)
    rep = chunks.report
    assert chunks.reader == "tiff" and rep.dct_downscale is False
    assert rep.note == "box filter, not reduced-size decoding: modelled: differs from the " \
                       "box average"
    meta = TilingMeta(0.0, reader=chunks.reader, dct_downscale=rep.dct_downscale)
    assert _used(TilingConfig(mpp=0.5, tile_size=224), meta)["dct_downscale"] is False


def test_damaged_thumbnail_tiles_are_recorded(clean192: Path, tmp_path: Path) -> None:
    from slidegen import write_damaged_tiles

    bad = write_damaged_tiles(tmp_path / "bad.svs", clean192, [(1, 1)], "early_eoi", page=1)
    for reader in ("tiff", "openslide"):
        _, _, chunks = _read(bad, reader=reader)
        rep = chunks.report
        assert rep.thumbnail_damaged == 1 and rep.damaged == set()  # level 1: not a tile's
        assert "1 file tiles of the thumbnail read as white" in (rep.damage_text() or "")


@pytest.mark.parametrize("cut", ["header", "first_directory", "tag_values", "after_level0",
                                 "level0_data", "last_level"])
def test_a_file_cut_short_is_reported_as_truncated(clean192: Path, tmp_path: Path,
                                                   cut: str) -> None:
    # Wherever the copy stopped: OpenSlide says "unsupported or missing image file" for
    # some cuts, "cannot hash TIFF tiles" for others, and opens a file cut right after
    # level 0's pixels as a one-level slide. Each one must say truncated, with the sizes.
    import tifffile

    with tifffile.TiffFile(clean192) as tif:
        p0, p1 = tif.pages[0], tif.pages[1]
        at = {"header": 8, "first_directory": p0.offset + 40,
              "tag_values": p0.tags[324].valueoffset + 8,  # type: ignore[union-attr]
              "after_level0": p1.offset, "level0_data": p0.dataoffsets[100],  # type: ignore[union-attr]
              "last_level": p1.dataoffsets[3] + 10}[cut]  # type: ignore[union-attr]
    data = clean192.read_bytes()
    path = tmp_path / "cut.svs"
    path.write_bytes(data[:at])
    with pytest.raises(SlideError) as info:
        open_slide(path)
    assert info.value.stage == "open"
    assert re.match(rf"slide file is truncated: {at:,} bytes, but TIFF ", str(info.value)), \
        str(info.value)
