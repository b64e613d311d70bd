"""What a user looks at first: did it tile the right thing?

Made by the tiling stage from the thumbnail the tissue mask was computed on (no second read
of the slide): a small JPEG of the thumbnail with the tissue contour and the kept tiles drawn,
and the same shapes as GeoJSON in level-0 pixels (tissue polygons with their holes as
annotations, kept tiles as tile objects), which QuPath opens with File > Import objects (or
drag and drop onto the slide). Both are written through :class:`pipeline.sink.Lake`, keyed by
slide and tiling spec, and their paths are recorded in the slides and errors rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipeline.tissue import TileGrid

# Long side of the preview image; with JPEG quality below, a busy thumbnail is ~60-150 KB.
MAX_SIDE = 1024
# A small slide's mask thumbnail (8 px per tile edge) is tiny: it is enlarged to this long
# side, so that tiles and the contour can be drawn and seen (the pixels stay the thumbnail's).
MIN_SIDE = 640
JPEG_QUALITY = 80
# The issue's budget for one preview; a busier image is re-encoded at lower quality.
MAX_BYTES = 150_000
TISSUE_RGB = (0, 90, 255)   # contour: blue, visible on pink tissue and white glass
TILE_RGB = (0, 200, 80)     # kept tiles: green tint and outlines
TILE_ALPHA = 0.18
# Contour simplification, in mask pixels: a polygon follows the mask within this distance.
SIMPLIFY_PX = 0.75


@dataclass(frozen=True)
class Preview:
    """Everything the preview files are drawn from, small enough to keep per slide."""

    image: np.ndarray            # uint8 (h, w, 3): the thumbnail, long side <= MAX_SIDE
    polygons: list[list[np.ndarray]]  # per tissue region: outer ring, then holes; level-0 px
    grid: TileGrid               # the kept tiles (empty for a no-tissue slide)
    width: int                   # level-0 size
    height: int


def make_preview(thumb: np.ndarray, mask: np.ndarray, grid: TileGrid, width: int,
                 height: int) -> Preview:
    """Contours traced on the full mask (best outline), the picture downscaled once."""
    h, w = thumb.shape[:2]
    scale = min(MAX_SIDE, max(MIN_SIDE, max(h, w))) / max(h, w)
    image = thumb
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(thumb).resize(
            size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC))
    return Preview(image=np.ascontiguousarray(image), polygons=tissue_polygons(mask, width, height),
                   grid=grid, width=int(width), height=int(height))


def tissue_polygons(mask: np.ndarray, width: int, height: int) -> list[list[np.ndarray]]:
    """Outer boundaries and holes of the mask's regions, as (n, 2) float level-0 coordinates.

    OpenCV traces pixel centres; +0.5 puts the ring on the pixels' middle, then each axis is
    scaled to level 0 separately (the mask's aspect is rounded)."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return []
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    sx, sy = width / mask.shape[1], height / mask.shape[0]
    rings = [_ring(c, sx, sy) for c in contours]
    regions: dict[int, list[np.ndarray]] = {}
    for i, (_, _, _, parent) in enumerate(hierarchy[0]):
        if parent < 0 and rings[i] is not None:
            regions.setdefault(i, []).insert(0, rings[i])
    for i, (_, _, _, parent) in enumerate(hierarchy[0]):
        if parent >= 0 and rings[i] is not None and parent in regions:
            regions[parent].append(rings[i])
    return list(regions.values())


def _ring(contour: np.ndarray, sx: float, sy: float) -> np.ndarray | None:
    pts = cv2.approxPolyDP(contour, SIMPLIFY_PX, True).reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:  # a one- or two-pixel speck: its pixel square
        x0, y0 = contour.reshape(-1, 2).min(axis=0) - 0.5
        x1, y1 = contour.reshape(-1, 2).max(axis=0) + 0.5
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    else:
        pts += 0.5
    pts[:, 0] *= sx
    pts[:, 1] *= sy
    return pts


def render_jpeg(p: Preview) -> bytes:
    """The thumbnail, kept tiles tinted and outlined where they are big enough to see,
    tissue contour on top."""
    out = p.image.copy()
    h, w = out.shape[:2]
    fx, fy = p.width / w, p.height / h  # level-0 px per preview px
    g = p.grid
    if g.num_tiles:
        kept = np.zeros((g.rows + 1, g.cols + 1), bool)  # a spare row/column: outside the grid
        kept[g.row, g.col] = True
        col = np.minimum(((np.arange(w) + 0.5) * fx // g.tile_l0).astype(np.int64), g.cols)
        row = np.minimum(((np.arange(h) + 0.5) * fy // g.tile_l0).astype(np.int64), g.rows)
        inside = kept[row][:, col]
        tinted = cv2.addWeighted(out, 1 - TILE_ALPHA, np.full_like(out, TILE_RGB), TILE_ALPHA, 0)
        out[inside] = tinted[inside]
        if g.tile_l0 / fx >= 5:  # tiles of 5+ preview px: their edges
            edge = np.zeros_like(inside)
            edge[:, 1:] |= (col[1:] != col[:-1])[None, :] & (inside[:, 1:] | inside[:, :-1])
            edge[1:, :] |= (row[1:] != row[:-1])[:, None] & (inside[1:, :] | inside[:-1, :])
            out[edge] = TILE_RGB
    rings = [np.round(np.column_stack([r[:, 0] / fx, r[:, 1] / fy]) - 0.5).astype(np.int32)
             for region in p.polygons for r in region]
    if rings:
        cv2.polylines(out, rings, True, TISSUE_RGB, thickness=max(1, round(max(h, w) / 600)),
                      lineType=cv2.LINE_AA)
    return _jpeg_within_budget(out)


def _jpeg_within_budget(img: np.ndarray) -> bytes:
    """Lower quality first, then half the size: a preview stays under MAX_BYTES."""
    while True:
        for quality in (JPEG_QUALITY, 65, 50):
            data = simplejpeg.encode_jpeg(img, quality=quality, colorspace="RGB",
                                          colorsubsampling="420")
            if len(data) <= MAX_BYTES:
                return data
        if max(img.shape[:2]) < 2 * 256:
            return data
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2),
                         interpolation=cv2.INTER_AREA)


def geojson(p: Preview, slide_id: str) -> dict[str, Any]:
    """A FeatureCollection QuPath imports: one Tissue annotation per region (with holes), one
    tile object per kept tile (its ``tile_index`` is the tiles table's, ``tissue`` its
    fraction, both as QuPath measurements)."""
    return json.loads(geojson_bytes(p, slide_id))


def geojson_bytes(p: Preview, slide_id: str) -> bytes:
    """:func:`geojson` as compact JSON text; the tile features (tens of thousands on a large
    slide) are formatted directly, ~10x faster than building and dumping dicts."""
    regions = [json.dumps({
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_closed(r) for r in region]},
        "properties": {"objectType": "annotation", "name": "tissue",
                       "classification": {"name": "Tissue", "color": list(TISSUE_RGB)},
                       "slide_id": slide_id},
    }, separators=(",", ":")) for region in p.polygons]
    g = p.grid
    t = g.tile_l0
    tiles = [
        f'{{"type":"Feature","geometry":{{"type":"Polygon","coordinates":[[[{x},{y}],'
        f'[{_num(x + t)},{y}],[{_num(x + t)},{_num(y + t)}],[{x},{_num(y + t)}],[{x},{y}]]]}},'
        f'"properties":{{"objectType":"tile","name":"tile {i}",'
        f'"measurements":{{"tile_index":{i},"tissue":{tissue:.4f}}}}}}}'
        for i, (x, y, tissue) in enumerate(zip(g.x.tolist(), g.y.tolist(), g.tissue.tolist(),
                                               strict=True))]
    return ('{"type":"FeatureCollection","features":[' + ",".join([*regions, *tiles])
            + "]}").encode()


def _num(v: float) -> str:
    """A level-0 coordinate as JSON: whole numbers without a fraction, others to 0.01 px."""
    r = round(v, 2)
    return str(int(r)) if r == int(r) else repr(r)


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = [[round(float(x), 1), round(float(y), 1)] for x, y in ring]
    return [*pts, pts[0]]
