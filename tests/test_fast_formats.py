"""Fast paths beyond Aperio: generated slides in other vendors' layouts, read directly.

Each format's slide is written by tests/wsigen_formats.py, opened by OpenSlide (the reader of
record) and, where it can, by opentile (an independent reader of the same layout); the fast
reader must give OpenSlide's pixels, deliver a damaged tile as white and record it, be the one
tiling picks, and give way to OpenSlide with a note when its self-check fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from wsigen_formats import write_ndpi

from pipeline.config import TilingConfig
from pipeline.readers.ndpi import NdpiReader, open_ndpi_reader
from pipeline.readers.openslide_reader import read_rgb
from pipeline.readers.tiff import CHECK_MAX, CHECK_MEAN
from pipeline.tiling import tile_slide

W, H = 3072, 2048  # level 0; NDPI levels 1 and 1/4 (OpenSlide adds 1/2, 1/8, ... by IDCT)
STRIPE = 256


@pytest.fixture(scope="session")
def ndpi_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """clean: tissue on glass; damaged: one restart interval of page 0 with an early EOI;
    wrecked: one interval of every level-0 file tile damaged (no clean check tile)."""
    d = tmp_path_factory.mktemp("ndpi")
    across, rows = W // STRIPE, H // 8
    centre = (rows // 2) * across + across // 2
    wrecked = [(0, r * across + c) for r in range(4, rows, 64) for c in range(across)]
    return {
        "clean": write_ndpi(d / "clean.ndpi", width=W, height=H, levels=(1, 4),
                            stripe=STRIPE, seed=3),
        "damaged": write_ndpi(d / "damaged.ndpi", width=W, height=H, levels=(1, 4),
                              stripe=STRIPE, seed=3, damage=[(0, centre + 1)]),
        "wrecked": write_ndpi(d / "wrecked.ndpi", width=W, height=H, levels=(1, 4),
                              stripe=STRIPE, seed=3, damage=wrecked),
    }


def _cfg(**kw: object) -> TilingConfig:
    return TilingConfig(**{"tile_size": 224, "mpp": 0.5, **kw})  # type: ignore[arg-type]


def _assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.mean() <= CHECK_MEAN and diff.max() <= CHECK_MAX, (diff.mean(), diff.max())


def test_generated_ndpi_is_read_by_openslide_and_opentile(ndpi_slides: dict[str, Path]) -> None:
    path = ndpi_slides["clean"]
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "hamamatsu"
        assert slide.dimensions == (W, H)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.2265)
        assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "40"
        assert int(slide.properties["openslide.level[0].tile-width"]) == STRIPE
        assert (W // 4, H // 4) in slide.level_dimensions
        assert "macro" in slide.associated_images
        region = read_rgb(slide, 0, 1024, 512, 512, 512)
    opentile = pytest.importorskip("opentile")
    try:
        tiler = opentile.OpenTile.open(path, 512)
    except FileNotFoundError as err:  # opentile's NDPI tiler needs the system libturbojpeg
        pytest.skip(f"opentile cannot crop NDPI here: {err}")
    with tiler:
        import simplejpeg

        assert type(tiler).__name__ == "NdpiTiler"
        tile = simplejpeg.decode_jpeg(tiler.get_level(0).get_tile((2, 1)))
    # opentile decodes 512 px wide frames (chroma blends across the stripe seams): close, and
    # identical away from the seams
    seams = np.r_[STRIPE - 1:STRIPE + 1]
    keep = np.setdiff1d(np.arange(512), seams)
    assert np.array_equal(tile[:, keep], region[:, keep])


def test_ndpi_reader_gives_openslides_pixels_on_every_level(ndpi_slides: dict[str, Path]) -> None:
    path = str(ndpi_slides["clean"])
    with openslide.OpenSlide(path) as slide:
        for level in range(slide.level_count):
            reader, why = open_ndpi_reader(path, slide, [level])
            assert reader is not None, why
            with reader:
                w, h = slide.level_dimensions[level]
                _assert_close(reader.read_rgb(level, 0, 0, w, h),
                              read_rgb(slide, level, 0, 0, w, h))
                # a box across file-tile seams, not aligned to them
                x, y = w // 3 + 5, h // 3 + 3
                _assert_close(reader.read_rgb(level, x, y, w // 3, h // 3),
                              read_rgb(slide, level, x, y, w // 3, h // 3))


def test_ndpi_reduced_decoding_is_openslides_reduced_level(ndpi_slides: dict[str, Path]) -> None:
    """Level 0 halved in the IDCT is the level OpenSlide itself makes that way (level 1)."""
    path = str(ndpi_slides["clean"])
    with openslide.OpenSlide(path) as slide:
        reader, why = open_ndpi_reader(path, slide, [0], dct_factor=2)
        assert reader is not None, why
        with reader:
            assert reader.dct_downscale and reader.dct_ok(0, 2)
            ours = reader.read_reduced(0, 512, 1024, 1024, 512, 2)
        _assert_close(ours, read_rgb(slide, 1, 256, 512, 512, 256))


def test_tiling_picks_the_ndpi_reader(ndpi_slides: dict[str, Path]) -> None:
    path = str(ndpi_slides["clean"])
    plan, fast = tile_slide(path, mpp_override=None, cfg=_cfg())
    with fast:
        assert fast.reader == NdpiReader.name
        ours = np.concatenate([c.tiles for c in fast])
    plan2, slow = tile_slide(path, mpp_override=None, cfg=_cfg(reader="openslide"))
    with slow:
        assert slow.reader == "openslide"
        theirs = np.concatenate([c.tiles for c in slow])
    assert plan.num_tiles == plan2.num_tiles > 0
    _assert_close(ours, theirs)


def test_ndpi_damaged_tile_is_white_and_recorded(ndpi_slides: dict[str, Path]) -> None:
    path = str(ndpi_slides["damaged"])
    with openslide.OpenSlide(path) as slide:
        reader, why = open_ndpi_reader(path, slide, [0])
        assert reader is not None, why  # the self-check picks a clean tile
        with reader:
            img = reader.read_rgb(0, 0, 0, W, H)
            assert len(reader.damage) == 1
            (x0, y0, x1, y1), = reader.damage.boxes(0).tolist()
            note, = reader.damage.notes()
        assert "premature end" in note
        assert (x1 - x0, y0 % 512) == (STRIPE, 0)
        assert (img[y0:y1, x0:x1] == 255).all()
        assert not (img[:y0] == 255).all()
        _assert_close(img[:y0], read_rgb(slide, 0, 0, 0, W, y0))
    plan, chunks = tile_slide(path, mpp_override=None, cfg=_cfg(max_damaged_fraction=0.5))
    with chunks:
        assert chunks.reader == NdpiReader.name
        tiles = np.concatenate([c.tiles for c in chunks])
    assert chunks.report.damaged, "the tiles over the damaged stripe are flagged"
    for i in chunks.report.damaged:
        assert (tiles[i] == 255).all()
    assert "premature end" in (chunks.report.damage_text() or "")


def test_ndpi_self_check_failure_falls_back_to_openslide(ndpi_slides: dict[str, Path]) -> None:
    path = str(ndpi_slides["wrecked"])
    with openslide.OpenSlide(path) as slide:
        reader, why = open_ndpi_reader(path, slide, [0])
    assert reader is None
    assert "decodes cleanly" in why
    plan, chunks = tile_slide(path, mpp_override=None, cfg=_cfg(reader="auto", mpp=0.2265))
    with chunks:
        assert chunks.reader == "openslide"
        assert "decodes cleanly" in chunks.report.note
