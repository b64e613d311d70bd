"""Thumbnail scenes with known tissue, for measuring tissue detectors against ground truth.

A scene is what the tissue mask sees: a slide thumbnail at ``thumbnail_px_per_tile`` (8) pixels
per tile edge, here 14 µm per pixel (224 px tiles at 0.5 µm/px). It is composed at 4x that
resolution (3.5 µm/px) in optical density (Beer-Lambert: stains and inks multiply the light,
so their densities add) and area-averaged down, as ``tissue.read_thumbnail`` averages a slide:

- **tissue**: real H&E of the bundled CMU-1-Small-Region scan (0.5 µm/px, reduced 7x), as
  irregular pieces cut from a rotated, mirror-extended copy of it. Its truth comes from the
  source at full resolution, where glass and tissue are unambiguous: a pixel is tissue when
  its optical density over the glass (3x3-smoothed, strongest channel) exceeds 0.04, gaps up
  to ~8 µm inside tissue are closed and specks under 2000 px (500 µm²) dropped. The truth
  therefore includes the section's real pale fringes, wisps and thin strands;
- **stain variants**: ``he`` as scanned, ``ihc``: the same tissue recoloured by colour
  deconvolution (Ruifrok-Johnston H&E vectors) into haematoxylin counterstain (a weaker
  haematoxylin plus a little of the eosin density: stroma stays faint) and DAB brown in
  patches (from the eosin and haematoxylin densities where a smooth random field is positive);
- **tissue that is hard but counts**: ``faint`` pieces (densities x0.3-0.5: under-stained or
  thin sections) and ``fat`` (adipose: empty cells of 50-110 µm whose 3.5 µm membranes are
  pale pink: near-white at thumbnail scale, all of it tissue);
- **artefacts that are not tissue**: ``pen`` (blue, green, black and red marker: rings
  around pieces and free strokes on the glass, ink over tissue hides it), ``dust`` (grey and
  brownish specks, fibres, a few larger crumbs), ``coverslip`` (the cover-slip edge: a dark
  line, a glass tint change past it and often a yellowish band of mounting medium),
  ``border`` (black or dark-grey scanner borders on one or two sides);
- **glass**: warm-to-cool white, slight vignetting, scanner stripes of ±0.7% and noise;
- **the scanner's file**: the scene is stored as a JPEG level (quality 80, 4:2:0) at twice
  the thumbnail's resolution, which the thumbnail averages, so ringing and chroma bleeding
  around ink and borders are there as in a real thumbnail.

``make_scene(condition, stain, seed)`` returns the thumbnail and, per thumbnail pixel, the
fraction of its area that is tissue and the fraction that is artefact (off tissue), so tile
fractions are exact areas. ``write_scene_slide`` writes the full-resolution scene as a
pyramidal Aperio-like TIFF (3.5 µm/px) for end-to-end checks through ``tile_slide``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from slidegen import tissue_source, write_pyramid_svs

from pipeline.tissue import plan_grid

SUPERSAMPLE = 4  # scene pixels per thumbnail pixel edge
SOURCE_STEP = 7  # CMU-1 pixels (0.499 µm) per scene pixel edge: 3.5 µm
THUMB_UM = SUPERSAMPLE * SOURCE_STEP * 0.5  # µm per thumbnail pixel (nominal): 14
PX_PER_TILE = 8  # thumbnail pixels per tile edge, as tiling.thumbnail_px_per_tile
SCENE_MPP = SOURCE_STEP * 0.5  # µm per scene pixel, the mpp of write_scene_slide's slides
SCENE_TILE_PX = PX_PER_TILE * SUPERSAMPLE  # tile edge in scene pixels (32: 112 µm)

CONDITIONS = ("clean", "faint", "fat", "pen", "dust", "coverslip", "border", "all")
STAINS = ("he", "ihc")
ARTEFACTS = ("pen", "dust", "coverslip", "border")

# Ruifrok & Johnston (2001) optical-density vectors, unit length.
_H = np.array([0.650, 0.704, 0.286])
_E = np.array([0.072, 0.990, 0.105])
_DAB = np.array([0.268, 0.570, 0.776])
STAIN_OD = {name: v / np.linalg.norm(v) for name, v in (("H", _H), ("E", _E), ("DAB", _DAB))}

# Marker inks: transmittance of a dense stroke (per channel), as they scan on glass.
INKS = {
    "blue": (0.16, 0.30, 0.68),
    "green": (0.22, 0.58, 0.38),
    "black": (0.09, 0.09, 0.12),
    "red": (0.85, 0.16, 0.22),
}
PEN_COLOURS = tuple(INKS)

# Scoring: a tile is truly tissue when >= MIN_TISSUE of it is (the pipeline's default
# tiling.min_tissue); an artefact tile is one that is not and is >= ARTEFACT_TILE artefact.
MIN_TISSUE = 0.25
ARTEFACT_TILE = 0.10


@dataclass
class Scene:
    """One thumbnail with its truth (see the module docstring)."""

    rgb: np.ndarray  # (h, w, 3) uint8 thumbnail
    tissue: np.ndarray  # (h, w) float32: fraction of each pixel's area that is tissue
    artefact: np.ndarray  # (h, w) float32: fraction that is pen/dust/cover-slip/border
    condition: str
    stain: str
    seed: int
    hires: np.ndarray | None = None  # (4h, 4w, 3) uint8 full-resolution scene, if kept

    @property
    def truth(self) -> np.ndarray:
        """Boolean tissue mask: pixels that are at least half tissue."""
        return self.tissue >= 0.5

    def tile_fractions(self, px_per_tile: int = PX_PER_TILE) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, artefact) area fraction of each tile of the ``px_per_tile`` grid."""
        return tile_means(self.tissue, px_per_tile), tile_means(self.artefact, px_per_tile)


def kept_tiles(mask: np.ndarray, px_per_tile: int = PX_PER_TILE) -> np.ndarray:
    """(rows, cols) bool: the tiles the pipeline's grid rule keeps for a thumbnail mask."""
    tile_l0 = 224.0  # any scale: the mask has px_per_tile pixels per tile edge
    h, w = mask.shape
    scale = tile_l0 / px_per_tile
    grid = plan_grid(mask, round(w * scale), round(h * scale), tile_l0, MIN_TISSUE, 0.5)
    kept = np.zeros((grid.rows, grid.cols), bool)
    kept[grid.row, grid.col] = True
    return kept


def counts(kept: np.ndarray, tissue: np.ndarray, artefact: np.ndarray) -> dict[str, int]:
    """Tile counts of a kept-tile map against tile truth fractions (see ``rates``)."""
    truth = tissue >= MIN_TISSUE
    art = (~truth) & (artefact >= ARTEFACT_TILE)
    return {
        "tiles": int(truth.size), "truth": int(truth.sum()), "kept": int(kept.sum()),
        "tp": int((kept & truth).sum()), "artefact_tiles": int(art.sum()),
        "kept_artefact": int((kept & art).sum()),
    }


def rates(c: dict[str, int]) -> dict[str, float | None]:
    """recall (truth tiles kept), precision (kept tiles that are truth tiles), on_artefact
    (kept tiles that are artefact tiles), artefact_kept (artefact tiles kept)."""
    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "recall": ratio(c["tp"], c["truth"]), "precision": ratio(c["tp"], c["kept"]),
        "on_artefact": ratio(c["kept_artefact"], c["kept"]),
        "artefact_kept": ratio(c["kept_artefact"], c["artefact_tiles"]),
    }


def tile_means(values: np.ndarray, px_per_tile: int = PX_PER_TILE) -> np.ndarray:
    """Mean of ``values`` over each full ``px_per_tile`` square (partial tiles dropped)."""
    h, w = values.shape[0] // px_per_tile, values.shape[1] // px_per_tile
    v = values[: h * px_per_tile, : w * px_per_tile].astype(np.float64)
    return v.reshape(h, px_per_tile, w, px_per_tile).mean(axis=(1, 3))


def _reduce(a: np.ndarray, k: int) -> np.ndarray:
    """Area average over k x k blocks (the array is cropped to a multiple of k)."""
    h, w = a.shape[0] // k, a.shape[1] // k
    a = a[: h * k, : w * k]
    return a.reshape(h, k, w, k, *a.shape[2:]).mean(axis=(1, 3), dtype=np.float32)


# ---------------------------------------------------------------- the source and its truth


def source_truth_full(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Careful tissue mask of a full-resolution (0.5 µm/px) H&E image, and its glass colour.

    At full resolution glass is flat and every stained fibre stands out: optical density over
    the glass, 3x3-smoothed, strongest channel, above 0.04 (glass noise sits below 0.01; the
    grey unstained wisps of CMU-1 left of its strand stay out). Gaps up to ~8 µm between
    fibres and cells are closed (they are part of the tissue at any tile scale) and components
    under 2000 px (500 µm²: dust, crumbs) are dropped.
    """
    f = rgb.astype(np.float32)
    vmax, vmin = f.max(axis=-1), f.min(axis=-1)
    sat = (vmax - vmin) / np.maximum(vmax, 1.0)
    glass = (sat < 0.05) & (vmax > 200)
    bg = np.median(f[glass], axis=0) if glass.any() else np.full(3, 245.0, np.float32)
    od = -np.log10(np.clip(f, 1.0, None) / bg)
    strongest = cv2.GaussianBlur(od.max(axis=-1), (0, 0), 1.5)
    mask = (strongest > 0.04).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (17, 17)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= 2000
    keep[0] = False
    return keep[labels], bg.astype(np.float32)


@lru_cache(maxsize=1)
def source() -> tuple[np.ndarray, np.ndarray]:
    """CMU-1 at scene resolution: (transmittance (h, w, 3) float32, tissue fraction (h, w))."""
    rgb = tissue_source()
    truth, bg = source_truth_full(rgb)
    trans = np.clip(rgb.astype(np.float32) / bg, 0.002, 1.0)
    t, frac = _reduce(trans, SOURCE_STEP), _reduce(truth.astype(np.float32), SOURCE_STEP)
    t.setflags(write=False)
    frac.setflags(write=False)
    return t, frac


# ---------------------------------------------------------------- building blocks


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth random field in [0, 1] with features of about ``scale`` pixels."""
    gh, gw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    g = rng.random((gh, gw)).astype(np.float32)
    f = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / max(hi - lo, 1e-6)


def _blob(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, rx: float,
          ry: float) -> np.ndarray:
    """Irregular filled shape: a wobbly rotated ellipse (uint8 0/1)."""
    n = 180
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 8):
        r += rng.uniform(0, 0.16 / (k - 1) ** 0.5) * np.sin(k * theta + rng.uniform(0, 6.3))
    angle = rng.uniform(0, math.pi)
    x, y = rx * r * np.cos(theta), ry * r * np.sin(theta)
    c, s = math.cos(angle), math.sin(angle)
    pts = np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=1)
    out = np.zeros((h, w), np.uint8)
    cv2.fillPoly(out, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return out


def _texture(rng: np.random.Generator, h: int, w: int, anchor: tuple[float, float],
             centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The source rotated, maybe mirrored and extended by reflection, placed so that source
    point ``anchor`` lands on scene point ``centre``: (optical density, tissue fraction)."""
    trans, frac = source()
    od_src = -np.log10(trans)
    angle = rng.uniform(0, 360)
    m = cv2.getRotationMatrix2D(anchor, angle, 1.0)
    if rng.random() < 0.5:  # mirror about the anchor's vertical
        m = m @ np.array([[-1, 0, 2 * anchor[0]], [0, 1, 0], [0, 0, 1]], np.float64)
    m[:, 2] += np.array(centre) - np.array(anchor)
    kw = dict(dsize=(w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    od = cv2.warpAffine(od_src, m, **kw)  # type: ignore[call-overload]
    fr = cv2.warpAffine(frac, m, **kw)  # type: ignore[call-overload]
    return np.maximum(od, 0.0), np.clip(fr, 0.0, 1.0)


@lru_cache(maxsize=1)
def _anchors() -> np.ndarray:
    """Source points (x, y) inside solid tissue: pieces are centred on tissue."""
    _, frac = source()
    solid = cv2.erode((frac > 0.99).astype(np.uint8), np.ones((15, 15), np.uint8))
    ys, xs = np.nonzero(solid)
    return np.stack([xs, ys], axis=1).astype(np.float64)


def _recolour_ihc(od: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """H&E optical density -> haematoxylin counterstain + patchy DAB (colour deconvolution)."""
    h, w = od.shape[:2]
    he = np.stack([STAIN_OD["H"], STAIN_OD["E"], np.cross(STAIN_OD["H"], STAIN_OD["E"])])
    a, k = rng.uniform(0.55, 0.9), rng.uniform(0.12, 0.25)
    field = _smooth_noise(rng, h, w, rng.uniform(60, 200))
    cut, strength = rng.uniform(0.45, 0.75), rng.uniform(0.6, 1.6)
    where = od.max(axis=-1) > 0  # only stained pixels change (glass has no density)
    conc = od[where] @ np.linalg.inv(he).astype(np.float32)
    c_h, c_e = np.maximum(conc[:, 0], 0), np.maximum(conc[:, 1], 0)
    positive = np.clip((field[where] - cut) / 0.06, 0, 1)  # DAB in patches, soft edges
    dab = strength * (0.6 * c_e + 0.4 * c_h) * positive
    out = np.zeros_like(od)
    out[where] = ((a * c_h + k * c_e)[:, None] * STAIN_OD["H"].astype(np.float32)
                  + dab[:, None] * STAIN_OD["DAB"].astype(np.float32))
    return out


def _fat(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """Optical density of adipose tissue filling ``region``: thin pink cell membranes."""
    h, w = region.shape
    cell = rng.uniform(50, 110) / SCENE_MPP  # cell diameter in scene px
    n = int(region.sum() / (cell * cell) * 1.2) + 1
    ys, xs = np.nonzero(region)
    pick = rng.integers(0, len(xs), n)
    seeds = np.ones((h, w), np.uint8)
    seeds[ys[pick], xs[pick]] = 0
    _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    # the outermost cells are closed by their own membranes: the lobule's outline
    edge |= region & ~cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    strength = rng.uniform(0.35, 0.7) * (0.6 + 0.4 * _smooth_noise(rng, h, w, 40))
    membrane = edge * strength * region
    # a few septa: thicker strands of connective tissue across the lobule
    septa = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(0, 3))):
        pts = _walk(rng, h, w, int(rng.integers(4, 8)), step=cell * 2.5, start=(xs[pick[0]],
                                                                              ys[pick[0]]))
        cv2.polylines(septa, [pts], False, float(rng.uniform(0.3, 0.6)),
                      thickness=int(rng.integers(2, 5)), lineType=cv2.LINE_AA)
    membrane = np.maximum(membrane, septa * region)
    stain = 0.9 * STAIN_OD["E"] + 0.1 * STAIN_OD["H"]
    return (membrane[..., None] * stain).astype(np.float32)


def _walk(rng: np.random.Generator, h: int, w: int, n: int, step: float,
          start: tuple[float, float] | None = None) -> np.ndarray:
    """A smooth random polyline (int32 points, cv2 layout) with momentum."""
    x, y = start if start is not None else (rng.uniform(0, w), rng.uniform(0, h))
    heading = rng.uniform(0, 2 * math.pi)
    pts = [(x, y)]
    for _ in range(n):
        heading += rng.normal(0, 0.5)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        pts.append((x, y))
    return np.array(pts, np.float64).round().astype(np.int32).reshape(-1, 1, 2)


def _ink_strokes(rng: np.random.Generator, h: int, w: int, tissue: np.ndarray,
                 pieces: list[tuple[float, float, float]], seed: int) -> list[
                     tuple[str, np.ndarray]]:
    """Marker strokes as (colour, coverage in [0, 1]): rings around pieces, free marks."""
    strokes = []
    n = int(rng.integers(4, 7))
    for j in range(n):
        colour = PEN_COLOURS[(seed + j) % len(PEN_COLOURS)]
        cover = np.zeros((h, w), np.float32)
        width = int(rng.choice([rng.integers(8, 30), rng.integers(30, 120)]))
        if j < 2 and pieces:
            cx, cy, r = pieces[j % len(pieces)]
            rr = r * rng.uniform(1.25, 1.6)
            start = rng.uniform(0, 360)
            span = rng.uniform(200, 340)
            theta = np.radians(np.linspace(start, start + span, 60))
            wob = 1 + 0.05 * np.sin(3 * theta + rng.uniform(0, 6.3))
            pts = np.stack([cx + rr * wob * np.cos(theta),
                            cy + rr * 0.85 * wob * np.sin(theta)], axis=1)
            cv2.polylines(cover, [pts.round().astype(np.int32).reshape(-1, 1, 2)], False, 1.0,
                          thickness=width, lineType=cv2.LINE_AA)
        else:
            best, best_overlap = None, None
            for _ in range(12):  # free marks go where there is no tissue, if they can
                trial = np.zeros((h, w), np.float32)
                pts = _walk(rng, h, w, int(rng.integers(2, 8)), step=rng.uniform(40, 160))
                cv2.polylines(trial, [pts], False, 1.0, thickness=width,
                              lineType=cv2.LINE_AA)
                overlap = float((trial * tissue).sum() / max(trial.sum(), 1.0))
                if best_overlap is None or overlap < best_overlap:
                    best, best_overlap = trial, overlap
                if overlap < 0.01:
                    break
            cover = best  # type: ignore[assignment]
        cover = cv2.GaussianBlur(cover, (0, 0), 1.0)
        streaks = 0.7 + 0.3 * _smooth_noise(rng, h, w, rng.uniform(10, 40))
        strokes.append((colour, cover * streaks * rng.uniform(0.6, 1.3)))
    return strokes


def _dust(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Optical density of dust: specks, fibres and a few crumbs, grey to brownish."""
    grey = np.zeros((h, w), np.float32)
    brown = np.zeros((h, w), np.float32)
    area = h * w / 1e6
    for _ in range(int(rng.integers(40, 120) * area)):
        target = brown if rng.random() < 0.3 else grey
        r = rng.choice([rng.uniform(1, 4), rng.uniform(4, 9)], p=[0.8, 0.2])
        if rng.random() < 0.05:
            r = rng.uniform(10, 22)
        cv2.ellipse(target, (int(rng.uniform(0, w)), int(rng.uniform(0, h))),
                    (max(1, int(r)), max(1, int(r * rng.uniform(0.5, 1)))),
                    rng.uniform(0, 180), 0, 360, float(rng.uniform(0.3, 1.5)), -1,
                    lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(4, 12) * area)):
        pts = _walk(rng, h, w, int(rng.integers(3, 9)), step=rng.uniform(8, 30))
        cv2.polylines(grey, [pts], False, float(rng.uniform(0.2, 0.8)),
                      thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
    tint = np.array([0.75, 1.0, 1.35], np.float32)  # brownish: absorbs blue a little more
    return grey[..., None] * np.ones(3, np.float32) + brown[..., None] * tint


def _margin_line(rng: np.random.Generator, h: int, w: int, tissue: np.ndarray,
                 lo: float, hi: float) -> tuple[str, float, float]:
    """Side, position and slope of a near-axis line in a tissue-free margin."""
    best = None
    for _ in range(40):
        side = str(rng.choice(["left", "right", "top", "bottom"]))
        pos = rng.uniform(lo, hi)
        slope = rng.uniform(-0.04, 0.04)
        side_mask = _side_mask(side, pos + 0.03, slope, h, w)
        inside_tissue = float((tissue * side_mask).sum())
        if best is None or inside_tissue < best[0]:
            best = (inside_tissue, side, pos, slope)
        if inside_tissue == 0:
            break
    assert best is not None
    return best[1], best[2], best[3]


def _side_mask(side: str, pos: float, slope: float, h: int, w: int) -> np.ndarray:
    """Pixels beyond a line at relative ``pos`` from ``side`` (towards that side)."""
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    if side in ("left", "right"):
        edge = pos * w + slope * (ys - h / 2)
        d = edge - xs if side == "left" else xs - (w - edge)
    else:
        edge = pos * h + slope * (xs - w / 2)
        d = edge - ys if side == "top" else ys - (h - edge)
    return np.broadcast_to(np.clip(d + 0.5, 0, 1), (h, w)).astype(np.float32)


# ---------------------------------------------------------------- scenes


def make_scene(condition: str = "clean", stain: str = "he", seed: int = 0, *,
               size: tuple[int, int] = (448, 320), keep_hires: bool = False,
               artefacts: tuple[str, ...] = ARTEFACTS) -> Scene:
    """A thumbnail of ``size`` (w, h) thumbnail px: tissue on glass plus ``condition``.

    ``condition`` is one of CONDITIONS: "clean" (tissue only), one distractor or hard tissue
    type, or "all" of them together (or "glass": no tissue, only ``artefacts``); ``stain`` is
    "he" or "ihc". Same arguments, same scene.
    """
    if condition not in (*CONDITIONS, "glass"):
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    if stain not in STAINS:
        raise ValueError(f"unknown stain {stain!r}; expected one of {STAINS}")
    rng = np.random.default_rng([CONDITIONS.index(condition) if condition in CONDITIONS
                                 else 99 + sum(2 ** ARTEFACTS.index(a) for a in artefacts),
                                 STAINS.index(stain), seed])
    tw, th = size
    w, h = tw * SUPERSAMPLE, th * SUPERSAMPLE
    on = {"all": set(ARTEFACTS) | {"faint", "fat"}, "glass": set(artefacts)}.get(
        condition, {condition})

    # tissue pieces
    od = np.zeros((h, w, 3), np.float32)
    tissue = np.zeros((h, w), np.float32)
    pieces: list[tuple[float, float, float]] = []
    if condition != "glass":
        anchors = _anchors()
        n_pieces = int(rng.integers(2, 5))
        for i in range(n_pieces):
            r = rng.uniform(0.10, 0.22) * min(w, h) * (1.3 if i == 0 else 1.0)
            cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.22, 0.78) * h
            shape = _blob(rng, h, w, cx, cy, r * rng.uniform(0.8, 1.3), r * rng.uniform(0.7, 1.1))
            anchor = anchors[rng.integers(len(anchors))]
            t_od, t_fr = _texture(rng, h, w, (float(anchor[0]), float(anchor[1])), (cx, cy))
            scale = 1.0
            if "faint" in on and (condition == "faint" or rng.random() < 0.5):
                scale = rng.uniform(0.3, 0.5)
            elif rng.random() < 0.3:
                scale = rng.uniform(0.7, 1.0)  # ordinary variation in staining
            od += shape[..., None] * t_od * scale
            tissue = np.maximum(tissue, shape * t_fr)
            pieces.append((cx, cy, r))
        if "fat" in on:
            for j in range(int(rng.integers(1, 3))):
                cx, cy, r = pieces[j % len(pieces)]
                a = rng.uniform(0, 2 * math.pi)
                fx, fy = cx + r * math.cos(a), cy + r * math.sin(a)  # against a piece's edge
                fr = r * rng.uniform(0.5, 0.9)
                region = _blob(rng, h, w, fx, fy, fr, fr * rng.uniform(0.6, 1.0))
                region &= (tissue < 0.5).astype(np.uint8)  # fat fills what the piece leaves
                od += _fat(rng, region.astype(bool))
                tissue = np.maximum(tissue, region.astype(np.float32))
        if stain == "ihc":
            od = _recolour_ihc(od, rng)

    # artefacts: optical density that is not tissue, and where it lies
    art = np.zeros((h, w), np.float32)
    if "pen" in on:
        for colour, cover in _ink_strokes(rng, h, w, tissue, pieces, seed):
            jitter = 0.015 if colour == "black" else 0.03
            ink = -np.log10(np.clip(np.array(INKS[colour]) + rng.uniform(-jitter, jitter, 3),
                                    0.02, 1))
            od += cover[..., None] * ink.astype(np.float32)
            tissue[cover > 0.3] = 0.0  # ink hides the tissue under it
            art = np.maximum(art, np.clip(cover / 0.3, 0, 1))
    if "dust" in on:
        dust = _dust(rng, h, w)
        od += dust
        art = np.maximum(art, np.clip(dust.max(axis=-1) / 0.15, 0, 1))

    # glass: tint, vignetting, scanner stripes
    base = np.array([243, 242, 240], np.float32) + rng.uniform(-6, 4, 3).astype(np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    rad = ((xs - w * rng.uniform(0.4, 0.6)) ** 2 + (ys - h * rng.uniform(0.4, 0.6)) ** 2)
    light = 1 - rng.uniform(0.0, 0.05) * rad / rad.max()
    stripe_w = w / rng.integers(4, 9)
    light *= 1 + 0.007 * np.sin(2 * math.pi * xs / stripe_w + rng.uniform(0, 6.3))
    glass = base * light[..., None]
    if "coverslip" in on:
        side, pos, slope = _margin_line(rng, h, w, tissue, 0.04, 0.14)
        beyond = _side_mask(side, pos, slope, h, w)
        # past the edge: no cover slip, so a little more or less light, tint barely changed
        change = rng.uniform(-0.03, 0.015) + rng.uniform(-0.006, 0.006, 3)
        glass *= 1 + beyond[..., None] * change.astype(np.float32)
        line = _side_mask(side, pos, slope, h, w) - _side_mask(side, pos - 5 / max(w, h),
                                                               slope, h, w)
        line = cv2.GaussianBlur(np.abs(line), (0, 0), 1.0)
        od += line[..., None] * rng.uniform(0.3, 0.8)
        edge_art = np.clip(line / 0.2, 0, 1)
        if rng.random() < 0.7:  # mounting medium squeezed out along the edge
            band = _side_mask(side, pos - rng.uniform(0.005, 0.02), slope, h, w) - beyond
            band = cv2.GaussianBlur(np.clip(band, 0, 1), (0, 0), 2.0)
            od += band[..., None] * (np.array([0.01, 0.03, 0.09], np.float32)
                                     * rng.uniform(0.5, 1.5))
            edge_art = np.maximum(edge_art, band)
        art = np.maximum(art, edge_art)
    rgb = glass * np.power(10.0, -od, dtype=np.float32)
    if "border" in on:
        sides = rng.choice(["left", "right", "top", "bottom"], int(rng.integers(1, 3)),
                           replace=False)
        for side in sides:
            band = _side_mask(str(side), rng.uniform(0.02, 0.08), rng.uniform(-0.01, 0.01), h, w)
            band = cv2.GaussianBlur(band, (0, 0), rng.uniform(0.5, 3))
            level = rng.uniform(4, 35) if rng.random() < 0.75 else rng.uniform(45, 80)
            dark = level + 3 * rng.standard_normal((h, w, 1), np.float32)
            rgb = rgb * (1 - band[..., None]) + dark * band[..., None]
            tissue *= 1 - band  # nothing is scanned under the border
            art = np.maximum(art, band)
    rgb += 2 * rng.standard_normal(rgb.shape, np.float32)
    art *= tissue < 0.5  # artefact counts where it is not on tissue

    # as a scanner stores it: a pyramid level at twice the thumbnail's resolution, JPEG
    # (quality 80, 4:2:0 chroma), which the thumbnail then averages 2x2
    level = np.clip(_reduce(rgb, SUPERSAMPLE // 2) + 0.5, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", level[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    level = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32)
    thumb = _reduce(level, 2) + 0.4 * rng.standard_normal((th, tw, 3), np.float32)
    return Scene(
        rgb=np.clip(thumb + 0.5, 0, 255).astype(np.uint8),
        tissue=_reduce(tissue, SUPERSAMPLE), artefact=_reduce(art, SUPERSAMPLE),
        condition=condition, stain=stain, seed=seed,
        hires=np.clip(rgb + 0.5, 0, 255).astype(np.uint8) if keep_hires else None,
    )


def blank_scene(seed: int = 0, *, size: tuple[int, int] = (448, 320),
                artefacts: tuple[str, ...] = ARTEFACTS) -> Scene:
    """No tissue anywhere: glass, with ``artefacts`` (default: pen, dust, cover slip, border)."""
    return make_scene("glass", "he", seed, size=size, artefacts=artefacts)


def scenes(conditions: tuple[str, ...] = CONDITIONS, stains: tuple[str, ...] = STAINS,
           seeds: range = range(4), size: tuple[int, int] = (448, 320)) -> list[Scene]:
    """The benchmark's fixed set: every condition x stain x seed."""
    return [make_scene(c, s, k, size=size) for s in stains for c in conditions for k in seeds]


def write_scene_slide(path: str | Path, scene: Scene) -> Path:
    """The scene's full resolution as a pyramidal Aperio-like TIFF at ``SCENE_MPP`` µm/px.

    Tiling it with ``TilingConfig(mpp=SCENE_MPP, tile_size=SCENE_TILE_PX)`` gives the same
    8-px-per-tile thumbnail grid as the scene's own (112 µm tiles).
    """
    if scene.hires is None:
        raise ValueError("make the scene with keep_hires=True")
    # levels x1 and x2: the thumbnail (x4) averages the x2 level 2x2, as make_scene models it
    return write_pyramid_svs(path, rgb=scene.hires, mpp=SCENE_MPP, levels=(1, 2))
