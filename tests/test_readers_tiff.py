"""The TIFF JPEG fast path against OpenSlide: same pixels, and a fallback for everything else.

The one deliberate difference is ``dct_downscale`` (the default): 0.25 -> 0.5 um/px tiles are
halved inside libjpeg-turbo's IDCT, not box-averaged; ``DCT_BOUND`` is what the tests allow
for it (measured on the generated H&E: mean abs diff ~1.3, 99.9th percentile ~14, max ~45).
With ``dct_downscale=False`` the fast path is held to the same bound as everywhere else.

Measured on OpenSlide 4.0.1 (bundled libjpeg-turbo) and simplejpeg 1.9.0: level reads are
bit-identical on generated slides (YCbCr JPEG, JFIF tiles) and on the real CMU-1 Aperio scan
(raw-RGB JPEG with shared tables), so tiles from both readers are identical. The bound the
tests allow (``CHECK_MEAN``/``CHECK_MAX``: mean abs diff <= 0.5, max <= 8 levels) covers a
different libjpeg build's IDCT rounding, the only difference the design admits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from slidegen import BOXES_GENERIC, CMU_SMALL, array_renderer, write_pyramid_svs, write_slide

import pipeline.tiling as tiling
from pipeline.config import TilingConfig
from pipeline.readers import read_rgb
from pipeline.readers.tiff import CHECK_MAX, CHECK_MEAN, open_tiff_reader
from pipeline.slides import SlideError
from pipeline.tiling import tile_slide

# Reduced-size decoding against decode + box average: mean, 99th percentile of abs diff.
DCT_BOUND = (2.0, 24.0)


def _bounded(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.mean() <= CHECK_MEAN and diff.max() <= CHECK_MAX


def _dct_bounded(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert 0 < diff.mean() <= DCT_BOUND[0]  # not zero: the IDCT path really ran
    assert np.percentile(diff, 99) <= DCT_BOUND[1]


def _tiles(path: Path | str, **kw: object) -> tuple[str, np.ndarray, np.ndarray]:
    mpp = kw.pop("mpp_override", None)
    cfg = TilingConfig(**{"mpp": 0.5, "tile_size": 224, **kw})  # type: ignore[arg-type]
    plan, chunks = tile_slide(str(path), mpp_override=mpp, cfg=cfg)
    with chunks:
        parts = list(chunks)
    xy = np.stack([np.concatenate([c.x for c in parts]), np.concatenate([c.y for c in parts])])
    assert np.array_equal(np.concatenate([c.index for c in parts]), np.arange(plan.num_tiles))
    return chunks.reader, np.concatenate([c.tiles for c in parts]), xy


@pytest.fixture(scope="module")
def slide240(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Aperio-like: 240 px tiles (file tiles never align with 224/448 px tiles), q85."""
    d = tmp_path_factory.mktemp("tiffread")
    return write_pyramid_svs(d / "s240.svs", width=3000, height=2600, mpp=0.25,
                             levels=(1, 4, 16), tile=240, quality=85, seed=3)


@pytest.mark.parametrize("name", ["slide240", "cmu"])
def test_level_reads_equal_openslide(name: str, slide240: Path) -> None:
    path = str(slide240 if name == "slide240" else CMU_SMALL)
    with openslide.OpenSlide(path) as slide:
        levels = list(range(slide.level_count))
        reader, why = open_tiff_reader(path, slide, levels)
        assert reader is not None, why
        with reader:
            for level in levels:
                w, h = slide.level_dimensions[level]
                # an unaligned box crossing tile seams, and the whole level
                for box in ((7, 13, min(w - 7, 500), min(h - 13, 333)), (0, 0, w, h)):
                    _bounded(reader.read_rgb(level, *box), read_rgb(slide, level, *box))


def test_resampled_tiles_equal_openslide_path(slide240: Path) -> None:
    # 0.25 -> 0.5 um/px: 224 level-0 px area-averaged 2x, file tile by file tile (fast path)
    kw = dict(mpp=0.5, tile_size=112, chunk_tiles=16)
    name_t, fast, xy_t = _tiles(slide240, reader="tiff", dct_downscale=False, **kw)
    name_o, ref, xy_o = _tiles(slide240, reader="openslide", **kw)
    assert (name_t, name_o) == ("tiff", "openslide")
    assert np.array_equal(xy_t, xy_o) and len(fast) > 20
    _bounded(fast, ref)
    # the default halves inside the IDCT: same tiles, a bounded difference in pixels
    _, dct, xy_d = _tiles(slide240, reader="tiff", **kw)
    assert np.array_equal(xy_d, xy_o)
    _dct_bounded(dct, ref)


def test_dct_decode_matches_box_average_on_real_aperio() -> None:
    # CMU-1 is raw-RGB JPEG with shared tables: the rebuilt stream (SOI + Adobe marker +
    # tables + tile) must decode in RGB, full size identical to imagecodecs, halved bounded.
    from PIL import Image

    with openslide.OpenSlide(str(CMU_SMALL)) as slide:
        reader, why = open_tiff_reader(str(CMU_SMALL), slide, [0], dct_factor=2)
    assert reader is not None and reader.dct_downscale, why
    with reader:
        lv = reader._levels[0]
        assert lv is not None and lv.colorspace == "RGB" and lv.tables is not None
        tiles = [(tx, ty) for ty in range(2, 6) for tx in range(2, 6)]
        full = np.stack([reader.decode_tile(0, tx, ty) for tx, ty in tiles])
        half = np.stack([reader.decode_tile(0, tx, ty, scale=2) for tx, ty in tiles])
        box = np.stack([np.asarray(Image.fromarray(t).reduce(2)) for t in full])
        assert half.shape == (len(tiles), lv.tile_h // 2, lv.tile_w // 2, 3)
        _dct_bounded(half, box)
        # an odd factor is refused rather than silently decoded some other way
        with pytest.raises(ValueError, match="no reduced-size decoding by 3"):
            reader.decode_tile(0, 2, 2, scale=3)


def test_dct_check_keeps_box_filter_when_decoding_differs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A reduced-size decoder that strays from decode + box average (modelled: 40 levels off)
    # must fail the check: the reader keeps the exact box filter and says why, which the
    # slides row then records instead of the dct_downscale the config asked for
    import simplejpeg

    import pipeline.readers.tiff as tr

    real = simplejpeg.decode_jpeg

    def off(data: bytes, **kw: object) -> np.ndarray:
        img = real(data, **kw)  # type: ignore[arg-type]
        if kw.get("min_factor", 1) != 1:
            img[...] = np.minimum(img, 215) + 40
        return img

    monkeypatch.setattr(tr.simplejpeg, "decode_jpeg", off)
    with openslide.OpenSlide(str(CMU_SMALL)) as slide:
        reader, why = open_tiff_reader(str(CMU_SMALL), slide, [0], dct_factor=2)
    assert reader is not None, why
    with reader:
        assert not reader.dct_downscale
        assert "differs from the box average" in reader.dct_note
    monkeypatch.setattr(tr.simplejpeg, "decode_jpeg", real)
    with openslide.OpenSlide(str(CMU_SMALL)) as slide:
        reader, why = open_tiff_reader(str(CMU_SMALL), slide, [0], dct_factor=2)
    assert reader is not None and reader.dct_downscale and reader.dct_note == "", why
    reader.close()


def test_stacked_decoding_equals_tile_by_tile(slide240: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A run of tiles sharing one header decodes as one tall JPEG (one GIL release per run).
    # It must give exactly the pixels of decoding tile by tile, leave a tile with another
    # header to decode alone, and stay off where upsampling would blend across tile edges.
    import simplejpeg

    from pipeline.readers.tiff import TiffJpegReader

    stacked: list[int] = []
    real = TiffJpegReader._decode_stack

    def spy(self: TiffJpegReader, lv: object, datas: list[memoryview], *a: object) -> None:
        stacked.append(len(datas))
        real(self, lv, datas, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(TiffJpegReader, "_decode_stack", spy)
    with openslide.OpenSlide(str(slide240)) as slide:
        reader, _ = open_tiff_reader(str(slide240), slide, [0], dct_factor=2)
    assert reader is not None
    with reader:
        lv = reader._levels[0]
        assert lv is not None
        assert reader._stack_info(0, 1) is None  # 4:2:0 YCbCr at full size: edges blend
        stack = reader._stack_info(0, 2)
        assert stack is not None
        ty, txs = 4, list(range(lv.across))
        found = reader._fetch(lv, ty, txs)
        datas = [bytes(d) for d in found if d is not None]
        assert len(datas) == len(txs) >= 8
        datas[3] = simplejpeg.encode_jpeg(reader.decode_tile(0, 3, ty), quality=40)
        assert not stack.fits(memoryview(datas[3]))
        assert all(stack.fits(memoryview(d)) for i, d in enumerate(datas) if i != 3)
        out = np.empty((len(datas), lv.tile_h // 2, lv.tile_w // 2, 3), np.uint8)
        stacked.clear()
        reader._decode_row(lv, 0, [memoryview(d) for d in datas], txs, ty, 2, stack, out)
        assert stacked == [3, len(txs) - 4]  # the odd tile split the row in two runs
        alone = np.stack([reader._decode(lv, d, tx, ty, 2) for tx, d in zip(txs, datas,
                                                                             strict=True)])
        assert np.array_equal(out, alone)
    # CMU-1 (4:4:4 RGB) needs no upsampling: stacked at full size too, equal to OpenSlide
    with openslide.OpenSlide(str(CMU_SMALL)) as slide:
        reader, _ = open_tiff_reader(str(CMU_SMALL), slide, [0])
        assert reader is not None
        with reader:
            assert reader._stack_info(0, 1) is not None
            stacked.clear()
            w, h = slide.dimensions
            ours = reader.read_rgb(0, 0, 0, w, h)
            assert sum(stacked) > 0.5 * reader._levels[0].counts.size  # type: ignore[union-attr]
            _bounded(ours, read_rgb(slide, 0, 0, 0, w, h))


def test_no_full_size_stacking_of_subsampled_chroma_even_with_glass_at_the_centre(
        tmp_path: Path) -> None:
    # The stacking check decodes tiles near the centre both ways; on flat glass there the
    # chroma blend across tile edges is invisible, so 4:2:0 is ruled out by its sampling
    # factors, and every tile of a region equals its own decode.
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (1536, 1536, 3), np.uint8)
    rgb[256:1280, 256:1280] = (236, 232, 240)  # flat glass under the check tiles
    path = write_slide(tmp_path / "glass-centre.tif", array_renderer(rgb), width=1536,
                       height=1536, mpp=None, levels=(1, 4), tile=256)
    with openslide.OpenSlide(str(path)) as slide:
        reader, why = open_tiff_reader(str(path), slide, [0])
    assert reader is not None, why
    with reader:
        assert reader._stack_info(0, 1) is None
        region = reader.read_rgb(0, 0, 0, 1536, 256)
        alone = np.concatenate([reader.decode_tile(0, tx, 0) for tx in range(6)], axis=1)
        assert np.array_equal(region, alone)


def test_threads_and_short_bands_do_not_change_pixels(slide240: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(mpp=0.5, tile_size=112, region_tiles=4, chunk_tiles=10)
    _, box, _ = _tiles(slide240, reader="tiff", dct_downscale=False, **kw)
    _, one, xy1 = _tiles(slide240, reader="tiff", **kw)
    _, two, xy2 = _tiles(slide240, reader="tiff", threads=2, **kw)
    monkeypatch.setattr(tiling, "BAND_BYTES", 3 * 112 * 112 * 3)  # bands of a row or two
    _, short, xy3 = _tiles(slide240, reader="tiff", threads=2, **kw)
    assert np.array_equal(xy1, xy2) and np.array_equal(xy1, xy3)
    assert np.array_equal(one, two) and np.array_equal(one, short)
    assert not np.array_equal(one, box)  # the DCT path ran (it is the default)


def test_need_skips_tiles_without_tissue(slide240: Path) -> None:
    with openslide.OpenSlide(str(slide240)) as slide:
        reader, _ = open_tiff_reader(str(slide240), slide, [0])
        assert reader is not None
        with reader:
            before = reader.tiles_decoded
            out = reader.read_rgb(0, 0, 0, 960, 960, need=[(250.0, 250.0, 300.0, 300.0)])
            assert reader.tiles_decoded - before == 1  # only file tile (1, 1) of 16
            assert (out[:240] == 255).all() and (out[480:] == 255).all()
            _bounded(out[240:480, 240:480], read_rgb(slide, 0, 240, 240, 240, 240))


def test_falls_back_on_non_jpeg(tmp_path: Path) -> None:
    # boxes-generic.tiff is deflate-compressed: OpenSlide reads it, the fast path declines
    with openslide.OpenSlide(str(BOXES_GENERIC)) as slide:
        reader, why = open_tiff_reader(str(BOXES_GENERIC), slide, [0])
    assert reader is None and "not JPEG" in why
    # its pure red, green and blue boxes are ink colours to the tissue mask: keep every tile
    name, tiles, _ = _tiles(BOXES_GENERIC, reader="auto", tile_size=64, min_tissue=0.0,
                            mpp_override=0.5)
    assert name == "openslide" and len(tiles) > 0
    with pytest.raises(SlideError, match="reader=tiff cannot read"):
        tile_slide(str(BOXES_GENERIC), mpp_override=0.5,
                   cfg=TilingConfig(reader="tiff", mpp=0.5, tile_size=64))


def test_wrong_colour_space_is_caught() -> None:
    # CMU-1's raw-RGB streams decoded as YCbCr (a JFIF marker in the rebuilt header instead
    # of Adobe's: the generic-TIFF rule applied to an Aperio file) are ~48 levels off: the
    # self-check must fail, so such a file falls back to OpenSlide instead of bad colour.
    from pipeline.readers.tiff import _JFIF

    with openslide.OpenSlide(str(CMU_SMALL)) as slide:
        reader, _ = open_tiff_reader(str(CMU_SMALL), slide, [0])
        assert reader is not None
        with reader:
            lv = reader._levels[0]
            assert lv is not None and lv.colorspace == "RGB" and lv.tables is not None
            assert reader._check_against(slide, 0) == ""
            object.__setattr__(lv, "header", b"\xff\xd8" + _JFIF + lv.tables[2:-2])
            assert "decodes differently from OpenSlide" in reader._check_against(slide, 0)


def test_corrupt_tile_is_a_read_error(tmp_path: Path, slide240: Path) -> None:
    from slidegen import write_corrupt_tiles

    bad = write_corrupt_tiles(tmp_path / "bad.svs", slide240, every=7)
    with tifffile.TiffFile(bad) as tif:
        assert tif.pages[0].compression == 7
    _, chunks = tile_slide(str(bad), mpp_override=None,
                           cfg=TilingConfig(reader="auto", mpp=0.5, tile_size=224))
    with pytest.raises(SlideError) as info:
        list(chunks)
    assert info.value.stage == "read" and "corrupt or truncated" in str(info.value)


@pytest.fixture(scope="module")
def slide256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 x 12 file tiles of 256 px, tissue everywhere: the check tile is (8, 6)."""
    d = tmp_path_factory.mktemp("tiffread256")
    return write_pyramid_svs(d / "s256.svs", width=4096, height=3072, mpp=0.25,
                             levels=(1, 4), tile=256, background=False)


def test_every_decoder_call_treats_a_warning_as_damage(slide256: Path, tmp_path: Path) -> None:
    # Bytes after the last MCU: libjpeg only warns ("extraneous bytes"). imagecodecs'
    # full-size decoder used to pass it while the reduced-size one failed it: now full size,
    # reduced size, alone and stacked in a run all refuse it, and a region read delivers the
    # tile white and records it, with every other file tile decoded as in the clean file.
    from slidegen import write_damaged_tiles

    from pipeline.readers.tiff import TiffReadError

    bad = write_damaged_tiles(tmp_path / "bad.svs", slide256, [(3, 2)], "extraneous_bytes")
    with openslide.OpenSlide(str(bad)) as slide:
        reader, why = open_tiff_reader(str(bad), slide, [0], dct_factor=2)
    with openslide.OpenSlide(str(slide256)) as slide:
        clean, _ = open_tiff_reader(str(slide256), slide, [0], dct_factor=2)
    assert reader is not None and clean is not None, why
    with reader, clean:
        for scale in (1, 2):
            with pytest.raises(TiffReadError, match="extraneous bytes before marker"):
                reader.decode_tile(0, 3, 2, scale=scale)
        assert reader._stack_info(0, 2) is not None  # row 2 goes in runs: one fails
        for k in (1, 2):
            box = (0, 512, 4096, 256)  # file tile row 2
            ours, ref = reader.read_reduced(0, *box, k), clean.read_reduced(0, *box, k)
            t = 256 // k
            assert (ours[:, 3 * t:4 * t] == 255).all()
            assert np.array_equal(np.delete(ours, np.s_[3 * t:4 * t], axis=1),
                                  np.delete(ref, np.s_[3 * t:4 * t], axis=1))
        assert len(reader.damage) == 1 and reader.damage.boxes(0).tolist() == \
            [[768, 512, 1024, 768]]
        assert "extraneous bytes before marker" in reader.damage.notes()[0]
        assert len(clean.damage) == 0


@pytest.mark.parametrize("kind", ["early_eoi", "no_soi", "extraneous_bytes"])
def test_the_self_check_picks_a_clean_tile(slide256: Path, tmp_path: Path, kind: str) -> None:
    # The tile nearest the centre is the one checked against OpenSlide (and for the DCT and
    # stacking checks). Damaged, it used to fail the slide ("unexpected OpenSlideError", no
    # path) or turn reduced-size decoding off; now the checks skip it.
    from slidegen import write_damaged_tiles


    with openslide.OpenSlide(str(slide256)) as slide:
        reader, _ = open_tiff_reader(str(slide256), slide, [0], dct_factor=2)
    assert reader is not None
    with reader:
        centre = reader._clean_tiles(0).clean[0]
    assert centre == (8, 6)
    bad = write_damaged_tiles(tmp_path / "bad.svs", slide256, [centre], kind)
    with openslide.OpenSlide(str(bad)) as slide:
        reader, why = open_tiff_reader(str(bad), slide, [0], dct_factor=2)
        assert reader is not None, why
        with reader:
            picked = reader._clean_tiles(0)
            assert centre not in picked.clean and len(picked.clean) == 4
            assert len(picked.damaged) == 1 and "tile 8,6 of page 0" in picked.damaged[0]
            assert reader.dct_downscale and reader.dct_note == ""
            assert reader._stack_info(0, 2) is not None
        # the handle OpenSlide opened is still usable: it never read the damaged tile
        assert slide.properties["openslide.vendor"] == "aperio"
    name, tiles, _ = _tiles(bad, reader="auto", min_tissue=0.0, max_damaged_fraction=0.1)
    assert name == "tiff" and len(tiles) == 54
