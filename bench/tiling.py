"""CPU tiling throughput, side by side on the same slides in one run.

    .venv/bin/python bench/tiling.py            # generates bench/data/ slides on first use

Measures, per slide: (a) ``tile_slide`` over the whole slide (TIFF fast path with its default
reduced-size JPEG decoding, the same with the exact box filter, and OpenSlide; 1 and N
threads), (b) the per-tile ``read_region`` baseline (how CLAM/TRIDENT read: 448 px at level 0
resized to 224 on a 0.25 um/px slide, 224 px as is on a 0.5 um/px one), (c) the decode limit:
libjpeg-turbo decoding of exactly the file tiles under the kept tissue tiles, bytes already in
memory (and, for reference, the same tiles through reduced-size decoding); then (d) 1 vs N
thread wall-clock scaling on the 100k x 80k slide and (e) peak RSS of a tiling worker
(subprocess) on a 10k x 10k and a 100k x 80k slide. Rates are tissue tiles per CPU-second
("per core": robust on a shared machine) and per wall-second. Writes
bench/results/tiling_<host>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import imagecodecs  # noqa: E402
import openslide  # noqa: E402
import simplejpeg  # noqa: E402
import tifffile  # noqa: E402
from benchkit import ROOT, cpu_model, write_results  # noqa: E402
from generate import PRESETS, ensure  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import TilingConfig  # noqa: E402
from pipeline.preview import geojson_bytes, render_jpeg  # noqa: E402
from pipeline.qc import tile_qc  # noqa: E402
from pipeline.readers.tiff import open_tiff_reader  # noqa: E402
from pipeline.slides import open_slide  # noqa: E402
from pipeline.tiling import _plan, slide_geometry, tile_slide  # noqa: E402


def _timed(fn: Callable[[], int]) -> dict[str, float]:
    """Run ``fn`` (returns tiles done) and report wall and CPU (all threads) rates."""
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"tiles": n, "wall_s": wall, "cpu_s": cpu, "tiles_per_s": n / wall,
            "tiles_per_cpu_s": n / max(cpu, 1e-9)}


def run_tile_slide(path: Path, cfg: TilingConfig) -> int:
    plan, chunks = tile_slide(str(path), mpp_override=None, cfg=cfg)
    n = 0
    with chunks:
        if cfg.reader != "auto" and chunks.reader != cfg.reader:
            raise RuntimeError(f"asked for {cfg.reader}, got {chunks.reader}")
        for c in chunks:
            n += len(c.tiles)
    assert n == plan.num_tiles
    return n


def run_tile_slide_with_qc(path: Path, cfg: TilingConfig) -> int:
    """What the tiling stage adds per slide with ``tiling.qc`` and ``tiling.previews`` on:
    the QC values of every chunk, the preview JPEG and the GeoJSON (bytes made, not stored)."""
    plan, chunks = tile_slide(str(path), mpp_override=None, cfg=cfg)
    if cfg.previews:
        assert chunks.preview is not None
        render_jpeg(chunks.preview)
        geojson_bytes(chunks.preview, path.stem)
    n = 0
    with chunks:
        for c in chunks:
            if cfg.qc:
                tile_qc(c.tiles, cfg.qc_sharpness)
            n += len(c.tiles)
    assert n == plan.num_tiles
    return n


QC_VARIANTS = {  # name -> TilingConfig fields; "off" is tiling as it was before QC
    "off": {"previews": False, "qc": False, "qc_sharpness": False},
    "previews": {"previews": True, "qc": False, "qc_sharpness": False},
    "default": {"previews": True, "qc": True, "qc_sharpness": False},
    "sharpness": {"previews": True, "qc": True, "qc_sharpness": True},
}


def bench_qc(name: str, repeats: int) -> dict[str, Any]:
    """Tiling with each QC/preview variant, rounds interleaved, one thread (per core)."""
    path = ensure(name)
    base = TilingConfig(mpp=0.5, tile_size=224, reader="tiff")
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in QC_VARIANTS}
    for _ in range(repeats):
        for k, fields in QC_VARIANTS.items():
            cfg = base.model_copy(update=fields)
            runs[k].append(_timed(lambda cfg=cfg: run_tile_slide_with_qc(path, cfg)))
    ratios = {k: float(np.median([b["tiles_per_cpu_s"] / a["tiles_per_cpu_s"]
                                  for a, b in zip(runs["off"], runs[k], strict=True)]))
              for k in QC_VARIANTS if k != "off"}
    return {"slide": name, "tiles": runs["off"][0]["tiles"], "runs": runs,
            "best_tiles_per_cpu_s": {k: max(r["tiles_per_cpu_s"] for r in v)
                                     for k, v in runs.items()},
            "rate_over_off_median_of_rounds": ratios}


def tissue_grid(path: Path, cfg: TilingConfig) -> tuple[Any, np.ndarray, np.ndarray]:
    """The plan and level-0 corners of the kept tiles, without reading tile pixels."""
    with open_slide(str(path)) as slide:  # OME-TIFF: its pyramid, which OpenSlide cannot see
        plan, grid, _ = _plan(slide, str(path), slide_geometry(slide, None, cfg), cfg)
    return plan, grid.x, grid.y


def run_baseline(path: Path, plan: Any, xs: np.ndarray, ys: np.ndarray, limit: int) -> int:
    """CLAM/TRIDENT-style: one read_region per tile at level 0, resized to the tile size."""
    idx = np.linspace(0, len(xs) - 1, min(limit, len(xs))).astype(int)
    read = int(round(plan.tile_l0))
    with openslide.OpenSlide(str(path)) as slide:
        for i in idx:
            img = slide.read_region((int(xs[i]), int(ys[i])), 0, (read, read)).convert("RGB")
            if read != plan.tile_px:
                img = img.resize((plan.tile_px, plan.tile_px), Image.Resampling.BILINEAR)
            np.asarray(img)
    return len(idx)


def decode_limit_data(path: Path, plan: Any, xs: np.ndarray,
                      ys: np.ndarray) -> tuple[list[bytes], bytes | None, str | None]:
    """Compressed bytes of the unique level-0 file tiles under the kept tiles."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        need: set[int] = set()
        t = int(round(plan.tile_l0))
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            for ty in range(y // th, (y + t - 1) // th + 1):
                for tx in range(x // tw, (x + t - 1) // tw + 1):
                    need.add(ty * across + tx)
        offs, counts = page.dataoffsets, page.databytecounts
        tables = page.jpegtables or None
        colorspace = "YCBCR" if page.photometric == 6 else "RGB"
    with open(path, "rb") as fh:
        data = []
        for i in sorted(need):
            fh.seek(offs[i])
            data.append(fh.read(counts[i]))
    return data, tables, colorspace


def run_decode(data: list[bytes], tables: bytes | None, colorspace: str | None) -> int:
    for d in data:
        imagecodecs.jpeg8_decode(d, tables=tables, colorspace=colorspace, outcolorspace="RGB")
    return len(data)


def run_decode_scaled(data: list[bytes], header: bytes, k: int, size: tuple[int, int]) -> int:
    """The same file tiles through libjpeg-turbo's reduced-size decoding (what the fast path
    does when halving 40x tiles): the limit of that method, not of full decoding."""
    for d in data:
        simplejpeg.decode_jpeg(header + d[2:], colorspace="RGB", min_height=size[1] // k,
                               min_width=size[0] // k, min_factor=k)
    return len(data)


RSS_CHILD = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from tiling import reset_hwm, vm_hwm_mb
from pipeline.config import TilingConfig
from pipeline.tiling import tile_slide, tune_worker_malloc
tune_worker_malloc()  # as a tiling task does
base = vm_hwm_mb()
plan, chunks = tile_slide({path!r}, mpp_override=None,
                          cfg=TilingConfig(mpp=0.5, tile_size=224, reader={reader!r},
                                           threads={threads}))
planned = vm_hwm_mb()
reset = reset_hwm()
with chunks:
    n = sum(len(c.tiles) for c in chunks)
print(n, base, planned, vm_hwm_mb(), int(reset))
"""


def reset_hwm() -> bool:
    """Reset VmHWM (Linux >= 4.0), so the tiling phase's peak is seen apart from planning's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM).

    Not ``ru_maxrss``: Linux carries the pre-exec high-water mark across ``execve``, so a child
    of a big parent reports the parent's peak (we saw 589 MB "after imports").
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_rss(path: Path, reader: str, threads: int) -> dict[str, float]:
    code = RSS_CHILD.format(root=str(ROOT), bench=str(ROOT / "bench"), path=str(path),
                            reader=reader, threads=threads)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    base, planned, tiled = float(out[1]), float(out[2]), float(out[3])
    return {"tiles": int(out[0]), "import_rss_mb": base, "plan_peak_rss_mb": planned,
            "tiling_peak_rss_mb": tiled if out[4] == "1" else float("nan"),
            "peak_rss_mb": max(planned, tiled), "wall_s": time.perf_counter() - started}


def machine() -> dict[str, Any]:
    return {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "openslide": openslide.__library_version__, "imagecodecs": imagecodecs.__version__,
            "jpeg8": imagecodecs.jpeg8_version(), "tifffile": tifffile.__version__,
            "loadavg_start": os.getloadavg()}


def bench_slide(name: str, threads: int, repeats: int, baseline_tiles: int) -> dict[str, Any]:
    path = ensure(name)
    base_cfg = TilingConfig(mpp=0.5, tile_size=224)
    plan, xs, ys = tissue_grid(path, base_cfg)
    data, tables, colorspace = decode_limit_data(path, plan, xs, ys)
    n = plan.num_tiles
    runs: dict[str, list[dict[str, float]]] = {}

    def record(key: str, result: dict[str, float]) -> None:
        runs.setdefault(key, []).append(result)

    k = int(round(plan.tile_l0 / plan.tile_px))  # level-0 px per delivered px (1 or 2 here)
    header, tile_wh = None, (0, 0)
    with openslide.OpenSlide(str(path)) as slide:
        reader, _ = open_tiff_reader(str(path), slide, [0])
        if reader is not None:
            lv = reader._levels[0]
            assert lv is not None
            header, tile_wh = lv.header, (lv.tile_w, lv.tile_h)
            reader.close()
    variants = [("tiff", {}), ("tiff_box", {"dct_downscale": False}), ("openslide", {})]
    for _ in range(repeats):  # interleaved, so load spikes hit every variant alike
        for key, extra in variants:
            if key == "tiff_box" and k == 1:
                continue  # nothing is reduced: identical to "tiff"
            for t in (1, threads):
                cfg = base_cfg.model_copy(update={"reader": key.split("_")[0], "threads": t,
                                                  **extra})
                record(f"{key}_{t}t", _timed(lambda cfg=cfg: run_tile_slide(path, cfg)))
        record("read_region_baseline", _timed(
            lambda: run_baseline(path, plan, xs, ys, baseline_tiles)))
        limits = [("decode_limit", lambda: run_decode(data, tables, colorspace))]
        if k > 1 and header is not None:
            limits.append(("decode_limit_reduced",
                           lambda: run_decode_scaled(data, header, k, tile_wh)))
        for key, fn in limits:
            dec = _timed(fn)
            # tile-equivalents: the kept tiles those file tiles deliver
            dec["tiles_per_s"] *= n / len(data)
            dec["tiles_per_cpu_s"] *= n / len(data)
            dec["file_tiles"] = len(data)
            record(key, dec)
    best = {k: max(v, key=lambda r: r["tiles_per_cpu_s"]) for k, v in runs.items()}
    best_wall = {k: max(v, key=lambda r: r["tiles_per_s"]) for k, v in runs.items()}
    per_core = {k: r["tiles_per_cpu_s"] for k, r in best.items()}
    ratios = {
        "tiff_vs_baseline_per_core": per_core["tiff_1t"] / per_core["read_region_baseline"],
        "tiff_vs_decode_limit_per_core": per_core["tiff_1t"] / per_core["decode_limit"],
        "openslide_vs_baseline_per_core": (per_core["openslide_1t"]
                                           / per_core["read_region_baseline"]),
        "tiff_vs_openslide_per_core": per_core["tiff_1t"] / per_core["openslide_1t"],
        f"tiff_scaling_{threads}t_wall": (best_wall[f"tiff_{threads}t"]["tiles_per_s"]
                                          / best_wall["tiff_1t"]["tiles_per_s"]),
        f"openslide_scaling_{threads}t_wall": (
            best_wall[f"openslide_{threads}t"]["tiles_per_s"]
            / best_wall["openslide_1t"]["tiles_per_s"]),
    }
    if "tiff_box_1t" in per_core:
        ratios["tiff_box_vs_baseline_per_core"] = (per_core["tiff_box_1t"]
                                                   / per_core["read_region_baseline"])
        ratios["tiff_box_vs_decode_limit_per_core"] = (per_core["tiff_box_1t"]
                                                       / per_core["decode_limit"])
    if "decode_limit_reduced" in per_core:
        ratios["tiff_vs_decode_limit_reduced_per_core"] = (per_core["tiff_1t"]
                                                           / per_core["decode_limit_reduced"])
    return {"slide": name, "path": str(path.relative_to(ROOT)),
            "dimensions": list(openslide.OpenSlide(str(path)).dimensions),
            "mpp": plan.mpp, "target_mpp": 0.5, "tile_px": plan.tile_px,
            "tile_l0": plan.tile_l0, "tissue_tiles": n, "per_core_tiles_per_s": per_core,
            "ratios": ratios, "runs": runs}


def decode_scaling(name: str, threads: int, repeats: int) -> dict[str, float]:
    """The machine's own ceiling: JPEG decoding alone (GIL released) in 1 vs N threads, on
    the file tiles under the tissue of ``name``. Shared vCPUs rarely give N x."""
    import threading

    path = ensure(name)
    plan, xs, ys = tissue_grid(path, TilingConfig(mpp=0.5, tile_size=224))
    data, tables, colorspace = decode_limit_data(path, plan, xs, ys)
    best = {1: 0.0, threads: 0.0}
    for _ in range(repeats):
        for t in (1, threads):
            parts = [data[i::t] for i in range(t)]
            workers = [threading.Thread(target=run_decode, args=(p, tables, colorspace))
                       for p in parts]
            started = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best[t] = max(best[t], len(data) / (time.perf_counter() - started))
    return {"slide": name, "file_tiles": len(data), "decode_1t_per_s": best[1],
            f"decode_{threads}t_per_s": best[threads], "scaling": best[threads] / best[1]}


def bench_scaling(name: str, threads: int, repeats: int) -> dict[str, Any]:
    """Wall-clock rate of the default path with 1 and ``threads`` threads, on a slide big
    enough that the reading phase, not per-slide set-up, dominates; pairs interleaved."""
    path = ensure(name)
    runs: dict[int, list[dict[str, float]]] = {1: [], threads: []}
    for _ in range(repeats):
        for t in (1, threads):
            cfg = TilingConfig(mpp=0.5, tile_size=224, reader="tiff", threads=t)
            runs[t].append(_timed(lambda cfg=cfg: run_tile_slide(path, cfg)))
    pairs = [b["tiles_per_s"] / a["tiles_per_s"] for a, b in zip(runs[1], runs[threads],
                                                                   strict=True)]
    best = {t: max(r["tiles_per_s"] for r in v) for t, v in runs.items()}
    return {"slide": name, "tiles": runs[1][0]["tiles"], "threads": threads,
            "best_tiles_per_s": {f"{t}t": v for t, v in best.items()},
            "scaling_best": best[threads] / best[1],
            "scaling_median_of_pairs": float(np.median(pairs)), "runs": runs}


def run_fast_format(path: Path, cfg: TilingConfig, name: str) -> int:
    """``tile_slide`` with the reader chosen as in a job ("auto"), checking which one it was."""
    plan, chunks = tile_slide(str(path), mpp_override=None, cfg=cfg)
    n = 0
    with chunks:
        if chunks.reader != name:
            raise RuntimeError(f"expected the {name} reader, got {chunks.reader}: "
                               f"{chunks.report.note}")
        for c in chunks:
            n += len(c.tiles)
    assert n == plan.num_tiles
    return n


# preset format -> the reader that should serve it
FAST_READERS = {"ndpi": "ndpi", "ome.tif": "ome-tiff", "dcm": "dicom"}


def bench_format(name: str, threads: int, repeats: int, baseline_tiles: int) -> dict[str, Any]:
    """A non-Aperio format's fast reader vs OpenSlide vs the per-tile ``read_region`` baseline,
    interleaved per round, on one generated slide (bench/generate.py preset ``name``).

    "openslide" is tiling with ``reader: openslide``: OpenSlide's C reader, except for
    OME-TIFF, whose pyramid OpenSlide does not read: there it is pipeline.readers.ome.OmeSlide
    under the same OpenSlide reader. The baseline is OpenSlide's ``read_region`` at level 0
    (for OME-TIFF, OpenSlide reads level 0 as a generic TIFF)."""
    path = ensure(name)
    fast = FAST_READERS[PRESETS[name].fmt]
    base_cfg = TilingConfig(mpp=0.5, tile_size=224)
    plan, xs, ys = tissue_grid(path, base_cfg)
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(repeats):
        for t in (1, threads):
            cfg = base_cfg.model_copy(update={"threads": t})
            runs.setdefault(f"{fast}_{t}t", []).append(
                _timed(lambda cfg=cfg: run_fast_format(path, cfg, fast)))
            cfg = base_cfg.model_copy(update={"threads": t, "reader": "openslide"})
            runs.setdefault(f"openslide_{t}t", []).append(
                _timed(lambda cfg=cfg: run_tile_slide(path, cfg)))
        runs.setdefault("read_region_baseline", []).append(_timed(
            lambda: run_baseline(path, plan, xs, ys, baseline_tiles)))
    per_core = {k: max(r["tiles_per_cpu_s"] for r in v) for k, v in runs.items()}
    wall = {k: max(r["tiles_per_s"] for r in v) for k, v in runs.items()}
    ratios = {
        f"{fast}_vs_baseline_per_core": per_core[f"{fast}_1t"] / per_core["read_region_baseline"],
        "openslide_vs_baseline_per_core": (per_core["openslide_1t"]
                                           / per_core["read_region_baseline"]),
        f"{fast}_vs_openslide_per_core": per_core[f"{fast}_1t"] / per_core["openslide_1t"],
        f"{fast}_scaling_{threads}t_wall": wall[f"{fast}_{threads}t"] / wall[f"{fast}_1t"],
    }
    with open_slide(str(path)) as slide:
        dims, vendor = list(slide.dimensions), slide.properties.get("openslide.vendor")
    return {"slide": name, "path": str(path.relative_to(ROOT)), "vendor": vendor,
            "dimensions": dims, "mpp": plan.mpp, "target_mpp": 0.5, "tile_px": plan.tile_px,
            "tile_l0": plan.tile_l0, "tissue_tiles": plan.num_tiles,
            "per_core_tiles_per_s": per_core, "ratios": ratios, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline-tiles", type=int, default=400,
                    help="tiles sampled evenly for the read_region baseline")
    ap.add_argument("--slides", nargs="*", default=["40x_20k", "20x_10k"])
    ap.add_argument("--rss", nargs="*", default=["40x_10k", "40x_100k"])
    ap.add_argument("--scaling", default="40x_100k",
                    help="slide for the 1 vs N thread wall-clock scaling ('' to skip)")
    ap.add_argument("--rss-readers", nargs="*", default=["tiff"],
                    help="readers for the RSS runs (openslide on 100k x 80k: ~15 CPU-min)")
    ap.add_argument("--qc", nargs="*", default=["40x_20k", "20x_10k"],
                    help="slides for the cost of tiling.qc + tiling.previews (none: skip)")
    ap.add_argument("--only-qc", action="store_true", help="run the QC comparison alone")
    ap.add_argument("--formats", nargs="*",
                    default=["40x_ndpi_20k", "40x_ome_20k", "40x_dicom_20k"],
                    help="non-Aperio slides for their fast reader vs OpenSlide vs baseline")
    args = ap.parse_args()
    out: dict[str, Any] = {"machine": machine(), "threads": args.threads, "slides": []}
    out["qc"] = []
    for name in args.qc:
        r = bench_qc(name, max(3, args.repeats))
        out["qc"].append(r)
        print(f"QC and previews on {name} ({r['tiles']} tiles), tiles/CPU-s (best) and rate "
              f"relative to off (median of rounds):", flush=True)
        for k, best in r["best_tiles_per_cpu_s"].items():
            ratio = r["rate_over_off_median_of_rounds"].get(k, 1.0)
            print(f"  {k:10s} {best:8.0f}  {ratio:.3f}", flush=True)
    if args.only_qc:
        dest = write_results("tiling_qc", out)
        print(f"\nwrote {dest.relative_to(ROOT)}")
        return
    for name in args.slides:
        res = bench_slide(name, args.threads, args.repeats, args.baseline_tiles)
        out["slides"].append(res)
        print(f"\n{name}: {res['tissue_tiles']} tissue tiles, per core (tiles/CPU-s):")
        for k, v in res["per_core_tiles_per_s"].items():
            print(f"  {k:24s} {v:8.1f}", flush=True)
        for k, v in res["ratios"].items():
            print(f"  {k:36s} {v:6.2f}x", flush=True)
    out["formats"] = []
    for name in args.formats:
        res = bench_format(name, args.threads, args.repeats, args.baseline_tiles)
        out["formats"].append(res)
        print(f"\n{name} ({res['vendor']}): {res['tissue_tiles']} tissue tiles, per core "
              f"(tiles/CPU-s):")
        for k, v in res["per_core_tiles_per_s"].items():
            print(f"  {k:24s} {v:8.1f}", flush=True)
        for k, v in res["ratios"].items():
            print(f"  {k:36s} {v:6.2f}x", flush=True)
    if args.scaling:
        sc = bench_scaling(args.scaling, args.threads, args.repeats)
        out["scaling"] = sc
        print(f"\nscaling on {args.scaling} ({sc['tiles']} tiles): best "
              f"{sc['best_tiles_per_s']} tiles/s, {args.threads}t/1t best "
              f"{sc['scaling_best']:.2f}x, median of pairs {sc['scaling_median_of_pairs']:.2f}x",
              flush=True)
        ceiling = decode_scaling(args.slides[0] if args.slides else "40x_20k", args.threads,
                                 args.repeats)
        sc["machine_decode_scaling"] = ceiling
        print(f"machine ceiling: JPEG decoding alone, {args.threads}t/1t "
              f"{ceiling['scaling']:.2f}x", flush=True)
    out["rss"] = {}
    for name in args.rss:
        path = ensure(name)
        for reader in args.rss_readers:
            r = worker_rss(path, reader, args.threads)
            out["rss"][f"{name}/{reader}"] = r
            print(f"rss {name} {reader}: peak {r['peak_rss_mb']:.0f} MB (after imports "
                  f"{r['import_rss_mb']:.0f}, planning peak {r['plan_peak_rss_mb']:.0f}, "
                  f"tiling-phase peak {r['tiling_peak_rss_mb']:.0f}), {r['tiles']} tiles, "
                  f"{r['wall_s']:.0f} s", flush=True)
    if len(args.rss) == 2:
        small, big = args.rss
        out["rss_ratio"] = {f"{reader}/{key}": out["rss"][f"{big}/{reader}"][key]
                            / out["rss"][f"{small}/{reader}"][key]
                            for reader in args.rss_readers
                            for key in ("peak_rss_mb", "tiling_peak_rss_mb")}
        print("rss big/small:", {k: round(v, 2) for k, v in out["rss_ratio"].items()})
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["machine"]["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the formats alone (--slides --rss --scaling '' --qc) keep their own file
    dest = write_results("tiling" if args.slides or args.rss or args.scaling
                         else "tiling_formats", out)
    print(f"\nwrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
