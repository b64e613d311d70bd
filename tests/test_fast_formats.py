"""Fast paths beyond Aperio: generated slides in other vendors' layouts, read directly.

Each format's slide is written by tests/wsigen_formats.py, opened by OpenSlide (the reader of
record) and, where it can, by opentile (an independent reader of the same layout); the fast
reader must give OpenSlide's pixels, deliver a damaged tile as white and record it, be the one
tiling picks, and give way to OpenSlide with a note when its self-check fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    _, ours, theirs = _fast_and_openslide(str(ndpi_slides["clean"]), NdpiReader.name)
    _assert_close(ours, theirs)


def _fast_and_openslide(path: str, reader: str) -> tuple[Any, np.ndarray, np.ndarray]:
    """The slide tiled as ``auto`` picks (which must be ``reader``) and by OpenSlide: the
    fast path's plan and both tile stacks (same tile count)."""
    plan, fast = tile_slide(path, mpp_override=None, cfg=_cfg())
    with fast:
        assert fast.reader == reader, fast.report.note
        ours = np.concatenate([c.tiles for c in fast])
    plan2, slow = tile_slide(path, mpp_override=None, cfg=_cfg(reader="openslide"))
    with slow:
        assert slow.reader == "openslide"
        theirs = np.concatenate([c.tiles for c in slow])
    assert plan.num_tiles == plan2.num_tiles > 0
    return plan, ours, theirs


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


# --- OME-TIFF, Philips TIFF, DICOM WSI ------------------------------------------------------
# One generated slide per format and variant: clean; damaged (one level-0 tile with an early
# end-of-image marker); wrecked (every level-0 tile within 4 tiles of the centre damaged, so no
# self-check tile decodes cleanly). 2048 x 1536 at 0.5 um/px (read at level 0 by the 0.5 um/px
# tiling below), levels 1 and 1/4, 128 px tiles (16 x 12 at level 0).

FW, FH, FT = 2048, 1536, 128
ACROSS, DOWN = FW // FT, FH // FT
DAMAGED = 2 * ACROSS + 10  # tile 10,2: tissue (seed 5)
WRECKED = [r * ACROSS + c for r in range(DOWN) for c in range(ACROSS)
           if abs(r - DOWN // 2) + abs(c - ACROSS // 2) <= 4]
FORMATS = ("ome", "philips", "dicom")
READER = {"ome": "ome-tiff", "philips": "philips", "dicom": "dicom"}


def _write(fmt: str, d: Path, name: str, damage: list[int]) -> Path:
    from wsigen_formats import damage_dicom_frames, write_ome_tiff, write_philips_tiff

    kw = {"width": FW, "height": FH, "mpp": 0.5, "levels": (1, 4), "tile": FT, "seed": 5}
    if fmt == "ome":
        return write_ome_tiff(d / f"{name}.ome.tif", damage=[(0, k) for k in damage], **kw)
    if fmt == "philips":
        return write_philips_tiff(d / f"{name}.tiff", damage=[(0, k) for k in damage], **kw)
    from wsigen_dicom import write_dicom_wsi

    first = write_dicom_wsi(d / name, **kw)[0]  # type: ignore[arg-type]
    if damage:
        damage_dicom_frames(first, damage)
    return first


@pytest.fixture(scope="session")
def format_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Built on first use per format: {fmt: {clean, damaged, wrecked: path tiling opens}}."""
    return {}


@pytest.fixture(params=FORMATS)
def slides(request: pytest.FixtureRequest, format_slides: dict[str, dict[str, Path]],
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Path]]:
    fmt = request.param
    if fmt not in format_slides:
        d = tmp_path_factory.mktemp(fmt)
        format_slides[fmt] = {name: _write(fmt, d, name, damage) for name, damage in
                              (("clean", []), ("damaged", [DAMAGED]), ("wrecked", WRECKED))}
    return fmt, format_slides[fmt]


def _open_fast(fmt: str, path: Path, slide: openslide.AbstractSlide, levels: list[int]
               ) -> tuple[object, str]:
    from pipeline.readers.dicom import open_dicom_reader
    from pipeline.readers.formats import open_philips_reader
    from pipeline.readers.ome import open_ome_reader

    opener = {"ome": open_ome_reader, "philips": open_philips_reader,
              "dicom": open_dicom_reader}[fmt]
    return opener(str(path), slide, levels)  # type: ignore[operator]


def _reference(fmt: str, path: Path, slide: openslide.AbstractSlide, level: int,
               rows: int | None = None) -> np.ndarray:
    """The level's first ``rows`` (all: None) from the format's reader of record: OpenSlide
    for Philips and DICOM, tifffile's decoder (imagecodecs' libjpeg, not our path) for
    OME-TIFF."""
    w, h = slide.level_dimensions[level]
    if fmt == "ome":
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tif.series[0].levels[level].asarray()[:rows or h]
    return read_rgb(slide, level, 0, 0, w, rows or h)


def test_ome_tiff_is_a_slide_with_its_pyramid_and_mpp(tmp_path: Path) -> None:
    """OpenSlide sees one level and no mpp; open_slide gives the SubIFD pyramid, the
    OME-XML mpp converted from its unit, the objective."""
    from wsigen_formats import write_ome_tiff

    from pipeline.readers.ome import OmeSlide
    from pipeline.slides import open_slide, resolve_mpp

    path = write_ome_tiff(tmp_path / "nm.ome.tif", width=1024, height=768, mpp=0.25,
                          unit="nm", levels=(1, 4, 16), tile=128)
    with openslide.OpenSlide(str(path)) as plain:
        assert plain.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert plain.level_count == 1
    with open_slide(path) as slide:
        assert isinstance(slide, OmeSlide)
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "ome-tiff"
        assert slide.level_dimensions == ((1024, 768), (256, 192), (64, 48))
        assert slide.level_downsamples == (1.0, 4.0, 16.0)
        assert slide.properties["ome-tiff.PhysicalSizeXUnit"] == "nm"
        assert resolve_mpp(slide, None) == (pytest.approx(0.25), "file")
        assert float(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 40
        assert slide.get_best_level_for_downsample(5) == 1
        # a region across tiles and past the right edge: transparent outside, as OpenSlide
        rgba = np.asarray(slide.read_region((960, 0), 0, (128, 64)))
        assert (rgba[:, :64, 3] == 255).all() and (rgba[:, 64:, 3] == 0).all()


def test_format_geometry(slides: tuple[str, dict[str, Path]]) -> None:
    """The level geometry the fast reader relies on, as OpenSlide (or OmeSlide) reports it."""
    from pipeline.slides import open_slide

    fmt, paths = slides
    path = paths["clean"]
    with open_slide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == {
            "ome": "ome-tiff", "philips": "philips", "dicom": "dicom"}[fmt]
        assert slide.level_dimensions[:2] == ((FW, FH), (FW // 4, FH // 4))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    if fmt == "philips":  # pages padded to whole tiles; OpenSlide clips to level 0 / 4
        import tifffile
        from wsigen_formats import write_philips_tiff

        from pipeline.readers.formats import open_philips_reader

        padded = write_philips_tiff(path.with_name("padded.tiff"), width=2000, height=1500,
                                    levels=(1, 4), tile=256)
        with tifffile.TiffFile(padded) as tif:
            assert [(p.imagewidth, p.imagelength) for p in tif.pages] == [  # type: ignore[union-attr]
                (2048, 1536), (512, 512)]
        with openslide.OpenSlide(str(padded)) as slide:
            assert slide.level_dimensions == ((2048, 1536), (512, 384))
            reader, why = open_philips_reader(str(padded), slide, [1])
            assert reader is not None, why
            with reader:
                _assert_close(reader.read_rgb(1, 0, 0, 512, 384),
                              read_rgb(slide, 1, 0, 0, 512, 384))
    if fmt == "dicom":  # the reader's item walk finds the frames pydicom's parser finds
        import pydicom
        from wsigen_formats import dicom_frame_ranges

        from pipeline.readers.dicom import frame_ranges

        raw = pydicom.dcmread(path, defer_size=256).get_item(0x7FE00010, keep_deferred=True)
        offs, counts = frame_ranges(path, raw.value_tell, ACROSS * DOWN)
        assert list(zip(offs.tolist(), counts.tolist(), strict=True)) == \
            dicom_frame_ranges(path)


def test_format_fast_reader_gives_the_reference_pixels(
        slides: tuple[str, dict[str, Path]]) -> None:
    from pipeline.slides import open_slide

    fmt, paths = slides
    path = paths["clean"]
    with open_slide(path) as slide:
        reader, why = _open_fast(fmt, path, slide, [0, 1])
        assert reader is not None, why
        with reader:  # type: ignore[attr-defined]
            assert reader.name == READER[fmt]  # type: ignore[attr-defined]
            for level in (0, 1):
                w, h = slide.level_dimensions[level]
                ref = _reference(fmt, path, slide, level)
                _assert_close(reader.read_rgb(level, 0, 0, w, h), ref)  # type: ignore[attr-defined]
                x, y = w // 3 + 5, h // 3 + 3  # across file-tile seams, not aligned to them
                _assert_close(reader.read_rgb(level, x, y, w // 3, h // 3),  # type: ignore[attr-defined]
                              ref[y:y + h // 3, x:x + w // 3])


def test_dicom_fast_reader_agrees_with_wsidicom(
        format_slides: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
        ) -> None:
    """A second, independent DICOM reader (wsidicom, pydicom underneath) of the same frames."""
    wsidicom = pytest.importorskip("wsidicom")
    if "dicom" not in format_slides:
        d = tmp_path_factory.mktemp("dicom")
        format_slides["dicom"] = {n: _write("dicom", d, n, dmg) for n, dmg in
                                  (("clean", []), ("damaged", [DAMAGED]),
                                   ("wrecked", WRECKED))}
    from pipeline.readers.dicom import open_dicom_reader

    path = format_slides["dicom"]["clean"]
    with openslide.OpenSlide(str(path)) as slide:
        reader, why = open_dicom_reader(str(path), slide, [0])
    assert reader is not None, why
    with reader, wsidicom.WsiDicom.open(path.parent) as wsi:
        theirs = np.asarray(wsi.read_region((600, 400), 0, (500, 300)).convert("RGB"))
        _assert_close(reader.read_rgb(0, 600, 400, 500, 300), theirs)


def test_tiling_picks_the_format_reader(slides: tuple[str, dict[str, Path]]) -> None:
    fmt, paths = slides
    plan, ours, theirs = _fast_and_openslide(str(paths["clean"]), READER[fmt])
    assert plan.mpp == pytest.approx(0.5) and plan.vendor == {
        "ome": "ome-tiff", "philips": "philips", "dicom": "dicom"}[fmt]
    _assert_close(ours, theirs)


def test_format_damaged_tile_is_white_and_recorded(slides: tuple[str, dict[str, Path]]) -> None:
    from pipeline.slides import open_slide

    fmt, paths = slides
    path = paths["damaged"]
    x0, y0 = (DAMAGED % ACROSS) * FT, (DAMAGED // ACROSS) * FT
    with open_slide(path) as slide:
        reader, why = _open_fast(fmt, path, slide, [0])
        assert reader is not None, why  # the self-check picks a clean tile
        with reader:  # type: ignore[attr-defined]
            img = reader.read_rgb(0, 0, 0, FW, FH)  # type: ignore[attr-defined]
            assert len(reader.damage) == 1  # type: ignore[attr-defined]
            assert reader.damage.boxes(0).tolist() == [[x0, y0, x0 + FT, y0 + FT]]  # type: ignore[attr-defined]
            note, = reader.damage.notes()  # type: ignore[attr-defined]
        assert "premature end" in note.lower(), note
        assert (img[y0:y0 + FT, x0:x0 + FT] == 255).all()
        _assert_close(img[:y0], _reference(fmt, path, slide, 0, y0))
    plan, chunks = tile_slide(str(path), mpp_override=None, cfg=_cfg(max_damaged_fraction=0.5))
    with chunks:
        assert chunks.reader == READER[fmt]
        tiles = np.concatenate([c.tiles for c in chunks])
    assert chunks.report.damaged, "the tissue tiles over the damaged file tile are flagged"
    for i in chunks.report.damaged:
        assert (tiles[i] == 255).all()
    assert "premature end" in (chunks.report.damage_text() or "").lower()


def test_format_self_check_failure_falls_back_to_openslide(
        slides: tuple[str, dict[str, Path]]) -> None:
    from pipeline.slides import open_slide

    fmt, paths = slides
    path = paths["wrecked"]
    with open_slide(path) as slide:
        reader, why = _open_fast(fmt, path, slide, [0])
    assert reader is None
    assert "decodes cleanly" in why
    plan, chunks = tile_slide(str(path), mpp_override=None,
                              cfg=_cfg(reader="auto", max_damaged_fraction=0.9))
    with chunks:
        assert chunks.reader == "openslide"
        assert "decodes cleanly" in chunks.report.note
        tiles = np.concatenate([c.tiles for c in chunks])
    # OpenSlide (OmeSlide for OME-TIFF) fails on the damaged tiles too: they come back white,
    # recorded, the rest of the slide read
    assert chunks.report.damaged and len(tiles) == plan.num_tiles
    for i in chunks.report.damaged:
        assert (tiles[i] == 255).all()
