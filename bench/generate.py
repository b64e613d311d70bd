"""Large generated Aperio-like slides for benchmarks, written on demand into bench/data/.

    .venv/bin/python bench/generate.py 40x_100k      # one preset (skipped if present)
    .venv/bin/python bench/generate.py --all

The TIFF writing (tiled JPEG pyramid, Aperio description, streamed tile by tile) is
``tests/slidegen.write_slide``; only the renderer differs. slidegen's piece renderer costs
~25 ms per tissue tile (exact piece outlines), hours at 100k x 80k, so here the real H&E of
CMU-1-Small-Region is mirror-tiled (its own glass gaps and tissue edges make the mask work)
inside a glass margin, about 1 ms per tile. Pyramid levels area-average the same texture.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
sys.path.insert(0, str(ROOT / "tests"))
import slidegen  # noqa: E402


@dataclass(frozen=True)
class Preset:
    """One benchmark slide: Aperio-like 240 px tiles at scanner JPEG quality."""

    width: int
    height: int
    mpp: float
    tile: int = 240
    quality: int = 85
    levels: tuple[int, ...] = (1, 4, 16)
    fmt: str = "svs"  # "ndpi", "ome.tif", "dcm": other layouts (see ensure)


PRESETS = {
    "40x_20k": Preset(20_000, 16_000, 0.25),  # throughput: 0.25 -> 0.5 um/px
    "20x_10k": Preset(10_000, 8_000, 0.5),  # throughput: level 0 read as is
    "40x_10k": Preset(10_000, 10_000, 0.25),  # worker RSS, small
    "40x_100k": Preset(100_000, 80_000, 0.25),  # worker RSS, large
    # the NDPI fast path: 40x, 256 x 8 px restart intervals (width rounded to 20480)
    "40x_ndpi_20k": Preset(20_000, 16_000, 0.25, fmt="ndpi"),
    # the OME-TIFF fast path: SubIFD pyramid, 512 px JPEG tiles (QuPath's export default)
    "40x_ome_20k": Preset(20_480, 16_000, 0.25, tile=512, fmt="ome.tif"),
    # the DICOM WSI fast path: a series folder (wsidicomizer from an SVS), 256 px frames
    "40x_dicom_20k": Preset(20_480, 16_000, 0.25, tile=256, fmt="dcm"),
}

MARGIN = 0.06  # glass border, fraction of each side


@lru_cache(maxsize=32)
def _glass_tiles(h: int, w: int) -> tuple[np.ndarray, ...]:
    """A few glass noise tiles, reused: rendering noise per tile would dominate the cost."""
    rng = np.random.default_rng((h, w))
    return tuple(slidegen._glass(h, w, rng) for _ in range(8))  # noqa: SLF001


def mirrored_renderer(width: int, height: int) -> slidegen.Renderer:
    """Renderer of mirror-tiled CMU-1 tissue inside a glass margin."""
    mx, my = int(width * MARGIN), int(height * MARGIN)

    def render(x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
        glass = _glass_tiles(h, w)[(x // max(w * step, 1) + 7 * (y // max(h * step, 1))) % 8]
        x1, y1 = x + w * step, y + h * step
        if x1 <= mx or y1 <= my or x >= width - mx or y >= height - my:
            return glass
        src = slidegen._reduced_source(step)  # noqa: SLF001
        sh, sw = src.shape[:2]
        cols = slidegen._mirror(np.arange(w) + x // step, sw)  # noqa: SLF001
        rows = slidegen._mirror(np.arange(h) + y // step, sh)  # noqa: SLF001
        out = src[rows[:, None], cols[None, :]]
        xs = x + (np.arange(w) + 0.5) * step
        ys = y + (np.arange(h) + 0.5) * step
        outside = ((xs[None, :] < mx) | (xs[None, :] >= width - mx)
                   | (ys[:, None] < my) | (ys[:, None] >= height - my))
        if outside.any():
            out[outside] = glass[outside]
        return out

    return render


def path_of(name: str) -> Path:
    """The file tiling opens: for DICOM, the level-0 instance of the series folder."""
    if PRESETS[name].fmt == "dcm":
        return DATA / name / "level0.dcm"
    return DATA / f"{name}.{PRESETS[name].fmt}"


def _write_dicom(folder: Path, p: Preset) -> None:
    """A DICOM WSI series as tests/wsigen_dicom.py makes one (wsidicomizer from a generated
    SVS, read through OpenSlide), of the bench renderer; level 0 renamed level0.dcm."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    folder.mkdir(parents=True)
    src = folder.with_suffix(".src.svs")
    slidegen.write_slide(src, mirrored_renderer(p.width, p.height), width=p.width,
                         height=p.height, mpp=p.mpp, levels=p.levels, tile=p.tile,
                         quality=p.quality)
    try:
        files = WsiDicomizer.convert(
            src, folder, include_label=False, include_overview=False, include_thumbnail=False,
            workers=2, tile_size=p.tile, preferred_source=SourceIdentifier.OPENSLIDE)
    finally:
        src.unlink()
    biggest = max((Path(f) for f in files), key=lambda f: f.stat().st_size)
    biggest.rename(folder / "level0.dcm")


def ensure(name: str) -> Path:
    """The preset's slide, generated once (to a temporary name, renamed when complete)."""
    path = path_of(name)
    if path.exists():
        return path
    p = PRESETS[name]
    DATA.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{p.fmt}.part")
    started = time.time()
    if p.fmt == "dcm":
        tmp = path.parent.with_suffix(".part")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        _write_dicom(tmp, p)
        tmp.rename(path.parent)
        size = sum(f.stat().st_size for f in path.parent.iterdir())
        print(f"generated {path.parent} ({size / 1e6:.0f} MB) in {time.time() - started:.0f} s",
              flush=True)
        return path
    if p.fmt == "ome.tif":
        import wsigen_formats

        tmp = path.with_name(f"{name}.part.ome.tif")
        wsigen_formats.write_ome_tiff(tmp, mirrored_renderer(p.width, p.height),
                                      width=p.width, height=p.height, mpp=p.mpp,
                                      levels=p.levels, tile=p.tile, quality=p.quality)
    elif p.fmt == "ndpi":
        import wsigen_formats

        wsigen_formats.write_ndpi(tmp, mirrored_renderer(p.width, p.height), width=p.width,
                                  height=p.height, mpp=p.mpp, levels=p.levels,
                                  quality=p.quality, stripe=256)
    else:
        slidegen.write_slide(tmp, mirrored_renderer(p.width, p.height), width=p.width,
                             height=p.height, mpp=p.mpp, levels=p.levels, tile=p.tile,
                             quality=p.quality)
    tmp.rename(path)
    print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) "
          f"in {time.time() - started:.0f} s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", choices=[*PRESETS, []], metavar="preset",
                    help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--all", action="store_true", help="every preset")
    args = ap.parse_args()
    for name in PRESETS if args.all else args.names:
        print(ensure(name))


if __name__ == "__main__":
    main()
