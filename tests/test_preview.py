"""Previews and tile QC: pure functions, tested on masks and tiles with known answers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.preview import (
    MAX_BYTES,
    MAX_SIDE,
    MIN_SIDE,
    _jpeg_within_budget,
    geojson,
    make_preview,
    render_jpeg,
)
from pipeline.qc import QC_COLUMNS, slide_summary, tile_qc
from pipeline.tissue import plan_grid

TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles"


def ring_area(ring: list[list[float]]) -> float:
    pts = np.array(ring)
    return 0.5 * abs(float(np.dot(pts[:-1, 0], pts[1:, 1]) - np.dot(pts[1:, 0], pts[:-1, 1])))


@pytest.fixture
def donut() -> tuple[np.ndarray, np.ndarray]:
    """A 200 x 160 px thumbnail of a 20,000 x 16,000 px slide (100 level-0 px per mask px):
    one square region with a square hole, one separate blob."""
    mask = np.zeros((160, 200), bool)
    mask[20:100, 20:100] = True
    mask[50:70, 50:70] = False
    mask[120:140, 150:190] = True
    thumb = np.full((160, 200, 3), 235, np.uint8)
    thumb[mask] = (180, 90, 160)
    return thumb, mask


def test_geojson_has_regions_with_holes_and_every_tile_in_level0_pixels(donut) -> None:
    thumb, mask = donut
    grid = plan_grid(mask, 20_000, 16_000, tile_l0=1000.0, min_tissue=0.5, mpp0=0.5)
    fc = geojson(make_preview(thumb, mask, grid, 20_000, 16_000), "s")
    json.dumps(fc)  # plain JSON types only
    regions = [f for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
    squares = [f for f in fc["features"] if f["properties"]["objectType"] == "tile"]
    assert len(regions) == 2
    holed = next(r for r in regions if len(r["geometry"]["coordinates"]) == 2)
    outer, hole = holed["geometry"]["coordinates"]
    # mask px 20..100 -> level-0 2,000..10,000; the traced ring runs through the boundary
    # pixels' centres, so within one mask pixel (100 level-0 px) of the true edge
    assert np.abs(np.array(outer).min(0) - 2000).max() <= 100
    assert np.abs(np.array(outer).max(0) - 10000).max() <= 100
    assert ring_area(outer) == pytest.approx(8000 ** 2, rel=0.05)
    assert ring_area(hole) == pytest.approx(2000 ** 2, rel=0.25)
    assert all(r[0] == r[-1] for f in regions for r in f["geometry"]["coordinates"])
    assert len(squares) == grid.num_tiles
    for i, f in enumerate(squares):
        (x0, y0), _, (x1, y1), *_ = f["geometry"]["coordinates"][0]
        assert (x0, y0) == (grid.x[i], grid.y[i]) and x1 - x0 == y1 - y0 == 1000
        assert f["properties"]["measurements"] == {
            "tile_index": i, "tissue": pytest.approx(float(grid.tissue[i]), abs=1e-4)}


def test_preview_jpeg_shows_kept_tiles_and_stays_small(donut) -> None:
    thumb, mask = donut
    grid = plan_grid(mask, 20_000, 16_000, tile_l0=1000.0, min_tissue=0.5, mpp0=0.5)
    data = render_jpeg(make_preview(thumb, mask, grid, 20_000, 16_000))
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert len(data) <= MAX_BYTES and max(img.shape[:2]) == MIN_SIDE  # small thumbnail: enlarged
    s = img.shape[1] / 200  # preview px per mask px
    tile = grid.x[0] / 100, grid.y[0] / 100  # first kept tile, mask px
    centre = img[int((tile[1] + 5) * s), int((tile[0] + 5) * s)]
    far = img[int(150 * s), int(10 * s)]  # glass, no tile
    assert centre[1] > thumb[int(tile[1] + 5), int(tile[0] + 5)][1] + 10  # tinted green
    assert abs(far - 235).max() <= 8  # untouched glass


def test_large_thumbnails_are_downscaled_and_budgeted() -> None:
    """A thumbnail of tissue everywhere (real H&E tiles, mosaicked) fits the budget at the
    full preview size; pure noise (no slide looks like it) only at a smaller size."""
    thumb = np.tile(np.concatenate([real_tile("tiatoolbox_kather1.tif"),
                                    real_tile("tiatoolbox_kather2.tif")], axis=1),
                    (14, 6, 1))[:3000, :2400]
    mask = np.ones((3000, 2400), bool)
    grid = plan_grid(mask, 300_000, 240_000, tile_l0=800.0, min_tissue=0.25, mpp0=0.25)
    p = make_preview(thumb, mask, grid, 300_000, 240_000)
    assert max(p.image.shape[:2]) == MAX_SIDE
    data = render_jpeg(p)
    assert len(data) <= MAX_BYTES and max(Image.open(io.BytesIO(data)).size) == MAX_SIDE
    noise = np.random.default_rng(0).integers(0, 255, (1024, 820, 3), dtype=np.uint8)
    data = _jpeg_within_budget(noise)
    assert len(data) <= MAX_BYTES and max(Image.open(io.BytesIO(data)).size) < MAX_SIDE


def test_no_tissue_preview_is_the_thumbnail_alone() -> None:
    thumb = np.full((90, 120, 3), 240, np.uint8)
    mask = np.zeros((90, 120), bool)
    grid = plan_grid(mask, 12_000, 9_000, tile_l0=448.0, min_tissue=0.25, mpp0=0.25)
    p = make_preview(thumb, mask, grid, 12_000, 9_000)
    assert geojson(p, "blank")["features"] == []
    img = np.asarray(Image.open(io.BytesIO(render_jpeg(p))))
    assert abs(img.astype(int) - 240).max() <= 6


def real_tile(name: str) -> np.ndarray:
    with Image.open(TILES / name) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[:224, :224])


def test_qc_values_of_tiles_with_known_content() -> None:
    he = real_tile("tiatoolbox_kather2.tif")
    glass = np.full((224, 224, 3), (238, 236, 240), np.uint8)
    inked = he.copy()
    inked[:, :56] = (40, 150, 70)      # a green pen stroke over a quarter of the tile
    inked[:, 56:84] = (30, 70, 190)    # a blue one over an eighth
    inked[:, 84:112] = (28, 26, 30)    # black ink over another eighth
    blurred = cv2.GaussianBlur(he, (0, 0), 3)
    q = tile_qc(np.stack([he, glass, inked, blurred]), sharpness=True)
    assert set(q) == set(QC_COLUMNS) and all(v.dtype == np.float32 for v in q.values())
    assert q["qc_background"][1] == 1.0 and q["qc_background"][0] < 0.2
    assert q["qc_pen"][0] < 0.01 and q["qc_pen"][1] == 0.0
    assert q["qc_pen"][2] == pytest.approx(0.5, abs=0.02)
    assert q["qc_sharpness"][3] < 0.1 * q["qc_sharpness"][0]
    summary = slide_summary(q)
    assert summary["qc_sharpness"] == pytest.approx(float(np.median(q["qc_sharpness"])))
    assert summary["qc_pen"] == pytest.approx(float(np.mean(q["qc_pen"])))
    off = tile_qc(np.stack([he, inked]))  # the default: no sharpness, the same fractions
    assert np.isnan(off["qc_sharpness"]).all() and slide_summary(off)["qc_sharpness"] is None
    np.testing.assert_array_equal(off["qc_pen"], q["qc_pen"][[0, 2]])


@pytest.mark.parametrize("name", sorted(p.name for p in TILES.glob("*") if p.suffix in
                                        {".png", ".tif"}))
def test_stained_tissue_is_not_pen(name: str) -> None:
    """H&E of every bundled source (haematoxylin's blue-purple, eosin's pink): no ink."""
    assert tile_qc(real_tile(name)[None])["qc_pen"][0] < 0.01
