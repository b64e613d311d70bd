"""The tissue mask against ground truth: generated scenes (tests/tissuegen.py) and CMU-1.

Targets (issue 16): on tiles that are >= 25% tissue, recall >= 0.98; precision >= 0.95; pen,
dust, border and cover-slip tiles not kept; on H&E and on the IHC-like variant. The benchmark
(bench/tissue.py, seeds 0-3) measures them. The seeds here are others, not those the mask was
tuned on: from one set of 16 scenes to the next, pooled recall and precision move by about
+-0.01-0.02, so these tests hold the mask to the targets less that margin, and to the
targets themselves where scenes do not decide it (artefacts, blank glass, CMU-1).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import openslide
import pytest
import tissuegen as tg
from slidegen import BOXES_GENERIC, CMU_SMALL

from pipeline.config import TilingConfig
from pipeline.tiling import tile_slide
from pipeline.tissue import glass_colour, plan_grid, read_thumbnail, thumbnail_size, tissue_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tissue import hsv_mask  # noqa: E402  (the benchmark's CLAM/hs2p baseline)

SEEDS = (20, 21)  # scenes per condition and stain for the targets


@lru_cache(maxsize=64)
def _scene(condition: str, stain: str, seed: int = SEEDS[0]) -> tg.Scene:
    return tg.make_scene(condition, stain, seed)


def _score(scene: tg.Scene, mask: np.ndarray) -> dict[str, int]:
    tissue, artefact = scene.tile_fractions()
    return tg.counts(tg.kept_tiles(mask), tissue, artefact)


# ---------------------------------------------------------------- the generator's truth


def test_truth_matches_the_image() -> None:
    scene = _scene("clean", "he")
    assert scene.rgb.shape == (320, 448, 3) and scene.rgb.dtype == np.uint8
    assert scene.tissue.shape == scene.artefact.shape == (320, 448)
    assert 0.0 <= scene.tissue.min() and scene.tissue.max() <= 1.0
    assert 0.03 < scene.tissue.mean() < 0.5 and not scene.artefact.any()
    t = scene.rgb.astype(np.float32) / glass_colour(scene.rgb)
    coloured = t.max(axis=-1) - t.min(axis=-1) >= 0.03

    def agreement(truth: np.ndarray) -> tuple[float, float]:
        return float(coloured[truth >= 0.99].mean()), float((~coloured)[truth == 0].mean())

    # where the truth says tissue the image is stained, where it says glass it is glass...
    on_tissue, on_glass = agreement(scene.tissue)
    assert on_tissue > 0.99 and on_glass > 0.98  # (JPEG rings a little around tissue)
    # ...and two tiles off, it is not: the check can fail
    on_tissue, on_glass = agreement(np.roll(scene.tissue, (16, 16), axis=(0, 1)))
    assert on_tissue < 0.8 and on_glass < 0.96


def test_scenes_are_deterministic_and_conditions_differ() -> None:
    a, b = tg.make_scene("pen", "ihc", 3, size=(128, 96)), tg.make_scene("pen", "ihc", 3,
                                                                         size=(128, 96))
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.tissue, b.tissue)
    assert not np.array_equal(a.rgb, tg.make_scene("pen", "ihc", 4, size=(128, 96)).rgb)
    with pytest.raises(ValueError, match="unknown condition"):
        tg.make_scene("smudge", "he", 0)


@pytest.mark.parametrize("condition", tg.ARTEFACTS)
def test_artefacts_are_marked_and_not_tissue(condition: str) -> None:
    scene = _scene(condition, "he")
    art = scene.artefact > 0.5
    assert art.sum() > 20  # every distractor condition has some
    assert scene.tissue[art].max() < 0.5  # artefact is never counted on tissue
    if condition in ("pen", "border"):
        # ink and borders are visibly not glass where the truth puts them
        bright = scene.rgb.astype(np.float32).mean(axis=-1)
        assert np.median(bright[art]) < np.median(bright[scene.tissue == 0]) - 40


def test_ihc_is_brown_and_blue_not_pink() -> None:
    he, ihc = _scene("clean", "he"), _scene("clean", "ihc")
    mean_he = he.rgb[he.tissue > 0.9].astype(np.float32).mean(axis=0)
    mean_ihc = ihc.rgb[ihc.tissue > 0.9].astype(np.float32).mean(axis=0)
    assert mean_he[0] > mean_he[1] + 30  # eosin: red well above green
    assert abs(mean_ihc[0] - mean_ihc[1]) < 30  # no eosin left


def test_source_truth_of_cmu1() -> None:
    trans, frac = tg.source()
    assert 0.3 < frac.mean() < 0.45  # the section covers ~37% of the scan
    assert trans[frac == 0].mean() > 0.97  # glass in the source is glass


# ---------------------------------------------------------------- the mask against it


@pytest.mark.parametrize("stain", tg.STAINS)
def test_mask_meets_targets(stain: str) -> None:
    total: dict[str, int] = {}
    each = {}
    for condition in tg.CONDITIONS:
        per: dict[str, int] = {}
        for seed in SEEDS:
            scene = _scene(condition, stain, seed)
            for k, v in _score(scene, tissue_mask(scene.rgb)[0]).items():
                per[k] = per.get(k, 0) + v
                total[k] = total.get(k, 0) + v
        each[condition] = tg.rates(per)
    r = tg.rates(total)
    assert r["recall"] is not None and r["recall"] >= 0.98 - 0.01, (r, each)
    assert r["precision"] is not None and r["precision"] >= 0.95 - 0.02, (r, each)
    assert r["on_artefact"] is not None and r["on_artefact"] <= 0.01, (r, each)
    for condition, rc in each.items():  # no condition collapses
        assert rc["recall"] >= 0.9 and rc["precision"] >= 0.88, (condition, rc)


def test_baselines_miss_the_targets() -> None:
    # the same scenes and scoring fail the CLAM/hs2p HSV mask and our mask before issue 16:
    # the targets are not met by any mask
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from tissue import before  # noqa: PLC0415

    for fn in (hsv_mask, before):
        total: dict[str, int] = {}
        for condition in tg.CONDITIONS:
            for k, v in _score(_scene(condition, "ihc"), fn(_scene(condition, "ihc").rgb)).items():
                total[k] = total.get(k, 0) + v
        r = tg.rates(total)
        assert r["recall"] < 0.98 - 0.01 or r["precision"] < 0.95 - 0.02, (fn.__name__, r)


@pytest.mark.parametrize("stain", tg.STAINS)
@pytest.mark.parametrize("condition", tg.ARTEFACTS)
def test_pen_border_dust_coverslip_excluded(stain: str, condition: str) -> None:
    scene = _scene(condition, stain)
    c = _score(scene, tissue_mask(scene.rgb)[0])
    assert c["artefact_tiles"] > 0
    assert c["kept_artefact"] <= max(1, 0.05 * c["artefact_tiles"]), c
    assert c["kept_artefact"] <= 0.02 * c["kept"], c


def test_hsv_baseline_keeps_the_artefacts_ours_drops() -> None:
    # the scenes are hard where it matters: the HSV mask keeps ink and borders
    kept_hsv = kept_ours = 0
    for condition in ("pen", "border"):
        scene = _scene(condition, "he")
        kept_hsv += _score(scene, hsv_mask(scene.rgb))["kept_artefact"]
        kept_ours += _score(scene, tissue_mask(scene.rgb)[0])["kept_artefact"]
    assert kept_hsv >= 20 and kept_ours <= kept_hsv // 10


@pytest.mark.parametrize("seed", range(3))
def test_no_tissue_on_blank_glass(seed: int) -> None:
    # glass (tinted, vignetted, striped, JPEG) and nothing else: nothing is kept
    scene = tg.blank_scene(seed, artefacts=())
    assert not scene.tissue.any() and not scene.artefact.any()
    mask, _ = tissue_mask(scene.rgb)
    assert not mask.any()


@pytest.mark.parametrize("artefacts", [("pen",), ("coverslip",), ("border",), ("dust",),
                                       tg.ARTEFACTS])
def test_blank_glass_with_artefacts_keeps_almost_nothing(artefacts: tuple[str, ...]) -> None:
    # no tissue, only pen, dust, a cover-slip edge and borders: at most 1 tile in 1000 kept
    # (where artefacts meet, e.g. a cover-slip line running into a border, a tile may be)
    kept = tiles = 0
    for seed in range(3):
        scene = tg.blank_scene(seed, artefacts=artefacts)
        assert not scene.tissue.any() and scene.artefact.any()
        k = tg.kept_tiles(tissue_mask(scene.rgb)[0])
        kept, tiles = kept + int(k.sum()), tiles + k.size
    assert kept <= 0.001 * tiles, (kept, tiles)


def test_plain_glass_and_white_have_no_tissue() -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(238 + rng.normal(0, 1, (64, 80, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass)[0].any()
    white = np.full((64, 80, 3), 255, np.uint8)  # outside the scanned area
    white[:, :40] = glass[:, :40]
    assert not tissue_mask(white)[0].any()


def test_tissue_everywhere_is_all_tissue() -> None:
    # a thumbnail with no glass at all (flat_050-like): the mask falls back to neutral white
    trans, frac = tg.source()
    ys, xs = np.nonzero(frac > 0.999)
    y, x = int(np.median(ys)), int(np.median(xs))
    crop = np.clip(trans[y - 16:y + 16, x - 16:x + 16] * 243, 0, 255).astype(np.uint8)
    assert (frac[y - 16:y + 16, x - 16:x + 16] > 0.9).mean() > 0.9
    assert tissue_mask(crop)[0].mean() > 0.9


def test_colours_any_keeps_what_stains_calls_ink() -> None:
    # pure red, green and blue boxes: marker colours for "stains", tissue for "any"
    with openslide.OpenSlide(str(BOXES_GENERIC)) as s:
        thumb = read_thumbnail(s, thumbnail_size(*s.dimensions, 64.0, 8))
    stains, _ = tissue_mask(thumb)
    anything, _ = tissue_mask(thumb, colours="any")
    assert stains.mean() < 0.05 and anything.mean() > 0.5
    with pytest.raises(ValueError, match="colours"):
        tissue_mask(thumb, colours="rainbow")  # type: ignore[arg-type]


# ---------------------------------------------------------------- real and end to end


def test_cmu1_keeps_its_left_border() -> None:
    # the case: the old mask kept 53 tiles and missed the section's left border
    with openslide.OpenSlide(str(CMU_SMALL)) as s:
        w, h = s.dimensions
        mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
        tile_l0 = 224 * 0.5 / mpp
        thumb = read_thumbnail(s, thumbnail_size(w, h, tile_l0, 8))
    truth_full, _ = tg.source_truth_full(tg.tissue_source())
    truth = plan_grid(truth_full, w, h, tile_l0, 0.25, mpp)
    grid = plan_grid(tissue_mask(thumb)[0], w, h, tile_l0, 0.25, mpp)
    want = set(zip(truth.row.tolist(), truth.col.tolist(), strict=True))
    got = set(zip(grid.row.tolist(), grid.col.tolist(), strict=True))
    assert len(want) == 57
    assert len(want & got) >= 0.95 * len(want) and len(got - want) <= 3
    # the left border: in the rows the section spans, the leftmost tissue tile is kept
    for r in {r for r, _ in want}:
        left = min(c for rr, c in want if rr == r)
        if r >= 5:  # the section proper (above: the thin strand and wisps)
            assert (r, left) in got, r


def test_end_to_end_through_tile_slide(tmp_path: Path) -> None:
    # the scene as a pyramidal JPEG slide, tiled by the pipeline, keeps what its thumbnail
    # mask keeps and meets the truth
    scene = tg.make_scene("pen", "he", SEEDS[0], size=(320, 240), keep_hires=True)
    path = tg.write_scene_slide(tmp_path / "scene.svs", scene)
    cfg = TilingConfig(mpp=tg.SCENE_MPP, tile_size=tg.SCENE_TILE_PX, chunk_tiles=256)
    plan, chunks = tile_slide(str(path), mpp_override=None, cfg=cfg)
    assert plan.tile_l0 == tg.SCENE_TILE_PX and plan.level == 0
    kept = np.zeros((240 // 8, 320 // 8), bool)
    for c in chunks:
        kept[c.y // tg.SCENE_TILE_PX, c.x // tg.SCENE_TILE_PX] = True
    assert kept.sum() == plan.num_tiles
    assert (kept == tg.kept_tiles(tissue_mask(scene.rgb)[0])).mean() >= 0.99
    tissue, artefact = scene.tile_fractions()
    r = tg.rates(tg.counts(kept, tissue, artefact))
    assert r["recall"] >= 0.93 and r["precision"] >= 0.93, r
    assert r["on_artefact"] <= 0.02 and r["artefact_kept"] <= 0.02, r


def test_tissue_colours_any_reaches_the_mask_from_the_job_config(tmp_path: Path) -> None:
    """A blue-green special stain: marker ink to the default mask, tissue with
    tiling.tissue_colours=any (the job-config knob reaches tissue_mask)."""
    from slidegen import write_pyramid_svs

    from pipeline.slides import SlideError

    he = tmp_path / "he.svs"
    write_pyramid_svs(he, width=2400, height=2000, mpp=0.5, seed=5)
    with openslide.OpenSlide(str(he)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    # the same tissue recoloured cyan-blue (alcian-blue-like): glass stays glass
    od = -np.log(np.clip(rgb.astype(np.float32) / 240.0, 1e-3, 1.0)).mean(axis=2, keepdims=True)
    teal = np.array([0.9, 0.25, 0.3], np.float32)  # absorbs red most
    blue = (240.0 * np.exp(-od * teal / teal.mean())).clip(0, 255).astype(np.uint8)
    path = write_pyramid_svs(tmp_path / "alcian.svs", rgb=blue, mpp=0.5)
    spec = TilingConfig(mpp=0.5, tile_size=224)
    with pytest.raises(SlideError, match="no tissue"):
        tile_slide(str(path), mpp_override=None, cfg=spec)
    plan, chunks = tile_slide(str(path), mpp_override=None,
                              cfg=spec.model_copy(update={"tissue_colours": "any"}))
    chunks.close()
    assert plan.num_tiles > 0
