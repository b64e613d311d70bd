"""Generated whole-slide images for tests and benchmarks, written with tifffile.

``write_pyramid_svs`` writes a tiled, JPEG-compressed, multi-level pyramid that OpenSlide
opens as Aperio SVS (when an mpp is given) or generic tiled TIFF (``mpp=None``, so the file
carries no microns-per-pixel). The content is real H&E: mirrored crops of the bundled
CMU-1-Small-Region scan, placed as irregular tissue pieces on near-white glass so that tissue
detection has something to do. Tiles are rendered one at a time and streamed to tifffile, so
large slides need memory for a tile, not for the image.

Facts checked against OpenSlide 4.0 (see tests/test_tiling.py::test_generated_*):
- pyramid levels are successive tiled pages (the Aperio and generic-tiff drivers both take
  every tiled page as a level; SubIFDs are not read by either);
- JPEG must be written with photometric RGB: tifffile's YCbCr JPEG tiles decode with wrong
  colours in OpenSlide (mean error ~47 levels), RGB tiles decode within ~2 levels.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile

DATA_DIR = Path(__file__).parent / "data"
CMU_SMALL = DATA_DIR / "CMU-1-Small-Region.svs"
TINY_SLIDE = DATA_DIR / "tiny-16px.svs"
BOXES_GENERIC = DATA_DIR / "boxes-generic.tiff"

GLASS = np.array([243, 242, 240], np.float32)  # faintly warm white, like a real scan's glass

# render(x, y, w, h, step): a (h, w, 3) uint8 image of level-0 box (x, y, w*step, h*step),
# one output pixel per step x step level-0 pixels; outside the image is glass.
Renderer = Callable[[int, int, int, int, int], np.ndarray]


@lru_cache(maxsize=1)
def tissue_source() -> np.ndarray:
    """Level-0 RGB of the bundled real H&E scan (2967 x 2220 x 3), read once per process."""
    import openslide

    with openslide.OpenSlide(str(CMU_SMALL)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    rgb.setflags(write=False)
    return rgb


# A 768x512 window of CMU-1-Small-Region that is tissue from edge to edge (dermis and
# epidermis): the texture of slides generated with background=False.
DENSE_WINDOW = (slice(2272, 2784), slice(704, 1472))


@lru_cache(maxsize=16)
def _reduced_source(step: int, dense: bool = False) -> np.ndarray:
    """The tissue source area-averaged by ``step``: pyramid levels render at their own size."""
    src = tissue_source()[DENSE_WINDOW] if dense else tissue_source()
    # Crop to a multiple of 64 so every level mirrors the texture at the same level-0 seams.
    h, w = (src.shape[0] // 64) * 64, (src.shape[1] // 64) * 64
    if step == 1:
        return src[:h, :w]
    if 64 % step:
        raise ValueError(f"pyramid downsamples must divide 64, got {step}")
    out = src[:h, :w].reshape(h // step, step, w // step, step, 3).mean(axis=(1, 3))
    return (out + 0.5).astype(np.uint8)


def _mirror(coords: np.ndarray, n: int) -> np.ndarray:
    """Index into a length-n axis, reflecting at both ends so the texture stays continuous."""
    m = np.mod(coords, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def _glass(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, 1.2, size=(h, w, 1)).astype(np.float32)
    return np.clip(GLASS + noise, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Piece:
    """One irregular tissue piece: a wobbly rotated ellipse showing a shifted tissue texture."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float
    phases: tuple[float, float, float]
    shift: tuple[int, int]

    def bbox(self) -> tuple[float, float, float, float]:
        r = 1.35 * max(self.ax, self.ay)
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r

    def inside(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        dx, dy = xs[None, :] - self.cx, ys[:, None] - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = (dx * c + dy * s) / self.ax, (-dx * s + dy * c) / self.ay
        theta = np.arctan2(v, u)
        p1, p2, p3 = self.phases
        edge = (1 + 0.18 * np.sin(3 * theta + p1) + 0.10 * np.sin(5 * theta + p2)
                + 0.04 * np.sin(11 * theta + p3))
        return u * u + v * v < edge * edge


@lru_cache(maxsize=1)
def _tissue_anchors() -> np.ndarray:
    """Source (x, y) points in dense tissue: each piece shows tissue around its centre."""
    cell = 32
    src = _reduced_source(cell).astype(np.float32)
    vmax, vmin = src.max(axis=-1), src.min(axis=-1)
    tissue = (vmax - vmin) / np.maximum(vmax, 1) > 0.15
    dense = tissue.copy()
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            dense &= np.roll(np.roll(tissue, dy, axis=0), dx, axis=1)
    ys, xs = np.nonzero(dense)
    return np.stack([(xs + 0.5) * cell, (ys + 0.5) * cell], axis=1).astype(np.int64)


def _pieces(width: int, height: int, seed: int) -> list[_Piece]:
    rng = np.random.default_rng(seed)
    anchors = _tissue_anchors()
    n = int(rng.integers(3, 6))
    out = []
    for _ in range(n):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        ax_, ay_ = anchors[rng.integers(len(anchors))]
        out.append(_Piece(
            cx=float(cx), cy=float(cy),
            ax=float(rng.uniform(0.08, 0.2) * width), ay=float(rng.uniform(0.08, 0.2) * height),
            angle=float(rng.uniform(0, math.pi)),
            phases=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, 3)),  # type: ignore[arg-type]
            shift=(int(ax_ - cx) // 64 * 64, int(ay_ - cy) // 64 * 64),  # level-aligned
        ))
    return out


def tissue_renderer(width: int, height: int, *, background: bool = True,
                    seed: int = 0) -> Renderer:
    """Renderer of a generated slide: tissue pieces on glass, or tissue everywhere."""
    pieces = _pieces(width, height, seed) if background else []

    def render(x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
        rng = np.random.default_rng((seed, x, y, w, step))
        src = _reduced_source(step, dense=not background)
        sh, sw = src.shape[:2]
        # level-0 coordinates of the output pixel centres
        xs = x + (np.arange(w, dtype=np.float32) + 0.5) * step
        ys = y + (np.arange(h, dtype=np.float32) + 0.5) * step
        if not background:
            out = src[_mirror(ys // step, sh).astype(np.int64)[:, None],
                      _mirror(xs // step, sw).astype(np.int64)[None, :]].copy()
        else:
            out = _glass(h, w, rng)
            for p in pieces:
                bx0, by0, bx1, by1 = p.bbox()
                i0, i1 = np.searchsorted(xs, [bx0, bx1])
                j0, j1 = np.searchsorted(ys, [by0, by1])
                if i1 <= i0 or j1 <= j0:
                    continue
                sel = p.inside(xs[i0:i1], ys[j0:j1])
                if not sel.any():
                    continue
                tx = _mirror((xs[i0:i1] + p.shift[0]) // step, sw).astype(np.int64)
                ty = _mirror((ys[j0:j1] + p.shift[1]) // step, sh).astype(np.int64)
                window = out[j0:j1, i0:i1]
                window[sel] = src[ty[:, None], tx[None, :]][sel]
        outside = (xs[None, :] >= width) | (ys[:, None] >= height)
        if outside.any():
            out[outside] = _glass(h, w, rng)[outside]
        return out

    return render


def array_renderer(rgb: np.ndarray) -> Renderer:
    """Renderer of a given (H, W, 3) uint8 image; outside it is glass."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]

    def render(x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
        full = np.empty((h * step, w * step, 3), np.uint8)
        full[:] = GLASS.astype(np.uint8)
        x1, y1 = min(width, x + w * step), min(height, y + h * step)
        if x1 > x and y1 > y:
            full[: y1 - y, : x1 - x] = rgb[y:y1, x:x1]
        if step == 1:
            return full
        out = full.reshape(h, step, w, step, 3).mean(axis=(1, 3), dtype=np.float32)
        return (out + 0.5).astype(np.uint8)

    return render


def blank_renderer(seed: int = 0) -> Renderer:
    """Renderer of empty glass: no tissue anywhere."""

    def render(x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
        return _glass(h, w, np.random.default_rng((seed, x, y, w, step)))

    return render


def _level_tiles(render: Renderer, ds: int, lw: int, lh: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles of one pyramid level in row-major order."""
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            yield render(tx * ds, ty * ds, tile, tile, ds)


def write_slide(path: str | Path, render: Renderer, *, width: int, height: int,
                mpp: float | None = 0.25, levels: Sequence[int] = (1, 4, 16), tile: int = 256,
                quality: int = 80) -> Path:
    """Write a tiled JPEG pyramid of ``render``'s content (Aperio SVS, or generic if no mpp)."""
    path = Path(path)
    if list(levels) != sorted(set(levels)) or levels[0] != 1:
        raise ValueError(f"levels must be increasing integer downsamples starting at 1: {levels}")
    if tile % 16:
        raise ValueError("tile must be a multiple of 16 (TIFF tiles)")
    bigtiff = width * height * 3 > 2**31  # JPEG shrinks ~10x; this is conservative
    header = f"Aperio Image Library v12.0.0 (generated by tests/slidegen.py)\n{width}x{height}"
    header += f" [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for i, ds in enumerate(levels):
            lw, lh = math.ceil(width / ds), math.ceil(height / ds)
            kwargs: dict[str, object] = {}
            if mpp is not None:
                if i == 0:
                    mag = 10.0 / mpp
                    kwargs["description"] = f"{header}|AppMag = {mag:g}|MPP = {mpp:g}"
                else:
                    kwargs["description"] = f"{header} -> {lw}x{lh} JPEG/RGB Q={quality}"
            elif i > 0:
                kwargs["subfiletype"] = 1  # reduced-resolution image
            tw.write(
                _level_tiles(render, ds, lw, lh, tile), shape=(lh, lw, 3), dtype=np.uint8,
                tile=(tile, tile), photometric="rgb", compression="jpeg",
                compressionargs={"level": quality}, metadata=None, **kwargs,
            )
    return path


def write_pyramid_svs(path: str | Path, *, rgb: np.ndarray | None = None,
                      width: int | None = None, height: int | None = None,
                      mpp: float | None = 0.25, levels: Sequence[int] = (1, 4, 16),
                      tile: int = 256, quality: int = 80, background: bool = True,
                      seed: int = 0) -> Path:
    """Write a realistic generated slide; ``rgb`` (H, W, 3) replaces the generated content.

    ``background=True`` places tissue pieces on glass; False fills the slide with tissue.
    ``mpp=None`` writes a generic tiled TIFF without any resolution, so no mpp is known.
    ``levels`` are integer downsamples starting at 1; generated content needs them to divide
    64 (a level's texture is the source area-averaged by its downsample).
    """
    if rgb is not None:
        height, width = rgb.shape[:2]
        render = array_renderer(rgb)
    else:
        if width is None or height is None:
            raise ValueError("give width and height, or rgb")
        render = tissue_renderer(width, height, background=background, seed=seed)
    return write_slide(path, render, width=width, height=height, mpp=mpp, levels=levels,
                       tile=tile, quality=quality)


def write_blank_slide(path: str | Path, *, width: int = 2048, height: int = 1536,
                      mpp: float | None = 0.25, levels: Sequence[int] = (1, 4),
                      tile: int = 256) -> Path:
    """A valid slide of empty glass with a valid mpp: the pipeline must report no tissue."""
    return write_slide(path, blank_renderer(), width=width, height=height, mpp=mpp,
                       levels=levels, tile=tile)


def write_truncated(path: str | Path, src: str | Path, fraction: float = 0.5) -> Path:
    """Copy of ``src`` cut after ``fraction`` of its bytes (an interrupted upload/copy)."""
    path = Path(path)
    size = Path(src).stat().st_size
    with open(src, "rb") as fin, open(path, "wb") as fout:
        fout.write(fin.read(int(size * fraction)))
    return path


def write_corrupt_tiles(path: str | Path, src: str | Path, *, page: int = 0,
                        every: int = 2) -> Path:
    """Copy of ``src`` whose every ``every``-th tile of TIFF page ``page`` is overwritten.

    Models bit rot or a partial overwrite: the directory is intact, so the slide opens and
    plans, and the damage only shows when those tiles are decoded. (A truncated copy fails
    already at open with OpenSlide 4, which walks every directory and hashes the smallest
    level's tiles.)
    """
    path = Path(shutil.copyfile(src, path))
    with tifffile.TiffFile(path) as tif:
        tiff_page = tif.pages[page]
        offsets, counts = tiff_page.dataoffsets, tiff_page.databytecounts  # type: ignore[union-attr]
    with open(path, "r+b") as f:
        for i in range(0, len(offsets), every):
            f.seek(offsets[i])
            f.write(b"\0" * min(16, counts[i]))  # destroys the JPEG start-of-image marker
    return path


def write_not_a_slide(path: str | Path) -> Path:
    """A text file with a slide's extension (a mislabelled export)."""
    path = Path(path)
    path.write_text("slide_id,uri\nthis is a CSV file, not a whole-slide image\n")
    return path


def copy_tiny(path: str | Path) -> Path:
    """The bundled 16x16 Aperio slide: smaller than any tile."""
    return Path(shutil.copyfile(TINY_SLIDE, path))


DAMAGE = ("early_eoi", "no_soi", "random_bytes", "extraneous_bytes", "cut_short")


def damage_jpeg(data: bytes, kind: str, seed: int = 0) -> bytes:
    """One JPEG tile stream damaged the way ``kind`` says (see :data:`DAMAGE`).

    early_eoi: an end-of-image marker in the middle of the entropy-coded data (a write that
    stopped, then the next write's bytes); no_soi: the first 16 bytes zeroed (the start marker
    gone); random_bytes: 32 random bytes over the middle of the entropy-coded data (bit rot);
    extraneous_bytes: 71 bytes between the last MCU and the end marker; cut_short: the last
    quarter of the stream missing.
    """
    n, mid = len(data), len(data) // 2
    if kind == "early_eoi":
        return data[:mid] + b"\xff\xd9" + data[mid + 2:]
    if kind == "no_soi":
        return b"\0" * 16 + data[16:]
    if kind == "random_bytes":
        noise = np.random.default_rng(seed).integers(0, 256, 32, dtype=np.uint8).tobytes()
        return data[:mid] + noise + data[mid + 32:]
    if kind == "extraneous_bytes":
        return data[:-2] + bytes(range(1, 72)) + data[-2:]
    if kind == "cut_short":
        return data[:n * 3 // 4]
    raise ValueError(f"unknown damage {kind!r}; one of {DAMAGE}")


def write_damaged_tiles(path: str | Path, src: str | Path, tiles: Sequence[tuple[int, int]],
                        kind: str, *, page: int = 0, seed: int = 0) -> Path:
    """Copy of ``src`` whose file tiles ``tiles`` ((column, row) of TIFF page ``page``) are
    damaged as :func:`damage_jpeg` says; every other byte of pixel data is unchanged.

    The damaged streams are appended at the end of the file and the page's tile offset and
    byte count entries point at them, so a damaged stream may be longer or shorter than the
    original and the directory stays valid: the slide opens, plans and reads, and only the
    decoders can tell.
    """
    import struct

    path = Path(shutil.copyfile(src, path))
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        across = -(-p.imagewidth // p.tilewidth)  # type: ignore[union-attr]
        where = [(p.tags[code].valueoffset, p.tags[code].dtype)  # type: ignore[union-attr]
                 for code in (324, 325)]  # TileOffsets, TileByteCounts
        offsets, counts = p.dataoffsets, p.databytecounts  # type: ignore[union-attr]
        order = tif.byteorder
    with open(path, "r+b") as f:
        for tx, ty in tiles:
            i = ty * across + tx
            f.seek(offsets[i])
            bad = damage_jpeg(f.read(counts[i]), kind, seed)
            end = f.seek(0, 2)
            f.write(bad)
            for (at, dtype), value in zip(where, (end, len(bad)), strict=True):
                fmt = {3: "H", 4: "I", 16: "Q"}[int(dtype)]
                f.seek(at + i * struct.calcsize(fmt))
                f.write(struct.pack(order + fmt, value))
    return path
