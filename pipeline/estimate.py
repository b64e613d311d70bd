"""`plan --estimate`: tiles, time and compute for a job, from a sample of its slides.

How: up to ``sample`` slides of the plan (spread over the manifest) are opened and planned by
the tiling stage itself (``tile_slide``: thumbnail, tissue mask, tile grid; no tile is read),
once per tiling pass. Their mean tissue-tile count times the slides to process gives each
model's tiles. Rates come from the benchmark results in ``bench/results`` (measured on the
machines named there):

- tiling: tiles per core-second of the reader the sample slides get (``tiling_*.json``);
- encoders: tiles per second per CPU core or per GPU (``encoder_*.json``,
  ``gpu_check_*.json``) for the model itself where measured, else the measured model scaled
  by forward FLOPs per tile (``registry.flops_per_tile``), and said so.

Remote slides are downloaded to scratch to be opened (OpenSlide reads local files): the sample
costs that many downloads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig, TilingConfig
from pipeline.models import specs
from pipeline.plan import Plan, tiling_groups
from pipeline.storage import staged_slide
from pipeline.tiling import SlideError, tile_slide

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _sig(x: float) -> float:
    """Three significant digits: small jobs are seconds, cohorts thousands of hours."""
    return float(f"{x:.3g}")


def _sample(items: list[Any], k: int) -> list[Any]:
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def measured_rates(results: Path = RESULTS) -> dict[str, Any]:
    """What bench/results holds: tiling per core by reader, encoders per core and per GPU."""
    rates: dict[str, Any] = {"tiling_per_core": {}, "cpu_per_core": {}, "gpu": {}, "sources": []}
    for f in sorted(results.glob("tiling_*.json")):
        data = json.loads(f.read_text())
        for s in data.get("slides", []):
            per = s.get("per_core_tiles_per_s", {})
            if "tiff_1t" in per:
                rates["tiling_per_core"].setdefault("tiff", per["tiff_1t"])
            if "openslide_1t" in per:
                rates["tiling_per_core"].setdefault("openslide", per["openslide_1t"])
        rates["sources"].append(f.name)
    for f in sorted(results.glob("encoder_*.json")) + sorted(results.glob("gpu_check_encoder_*")):
        data = json.loads(f.read_text())
        device = data.get("device", "cpu")
        cores = (data.get("machine") or {}).get("torch_threads") or 1
        for m in data.get("models", []):
            rate = m.get("stage_tiles_per_s")
            if not rate:
                continue
            if device == "cuda":
                rates["gpu"][m["model"]] = rate
            else:
                rates["cpu_per_core"][m["model"]] = rate / cores
        rates["sources"].append(f.name)
    return rates


def _flops(model: str) -> float:
    """Forward FLOPs per tile; torch is imported here, when an estimate is asked for."""
    from pipeline.models.registry import flops_per_tile

    return flops_per_tile(model)


def _rate(model: str, measured: dict[str, float]) -> tuple[float | None, str]:
    if model in measured:
        return measured[model], "measured"
    if specs.get(model).benchmark:
        return None, "benchmark model: no model compute"
    if not measured:
        return None, "no measurement in bench/results"
    ref = min(measured, key=_flops)
    scaled = measured[ref] * _flops(ref) / _flops(model)
    return scaled, f"{ref}'s measured rate scaled by FLOPs per tile"


def slide_sample(cfg: JobConfig, plan: Plan, tiling: TilingConfig, models: list[str],
                 sample: int) -> list[dict[str, Any]]:
    tasks = [t for t in plan.tasks if set(t.models) & set(models)]
    out = []
    for t in _sample(tasks, sample):
        row: dict[str, Any] = {"slide_id": t.entry.slide_id}
        try:
            with staged_slide(t.entry.uri, cfg.storage) as local:
                slide_plan, chunks = tile_slide(local, mpp_override=t.entry.mpp, cfg=tiling)
                chunks.close()
            row.update(tiles=slide_plan.num_tiles, reader=chunks.reader,
                       level=slide_plan.level, tissue_mm2=round(slide_plan.tissue_area_mm2, 2))
        except SlideError as err:
            row.update(tiles=0, error=f"{err.stage}: {err.reason}")
        except Exception as err:  # noqa: BLE001 - a sample slide that fails is reported
            row.update(tiles=0, error=f"{type(err).__name__}: {err}")
        out.append(row)
    return out


def estimate(cfg: JobConfig, plan: Plan, sample: int = 8, results: Path = RESULTS
             ) -> dict[str, Any]:
    rates = measured_rates(results) if results.is_dir() else {
        "tiling_per_core": {}, "cpu_per_core": {}, "gpu": {}, "sources": []}
    out: dict[str, Any] = {"method": "sample of slides planned by the tiling stage; rates "
                           "from bench/results (see pipeline/estimate.py)",
                           "rate_sources": rates["sources"], "passes": [], "models": {}}
    for tiling, models in tiling_groups(cfg):
        todo = [t for t in plan.tasks if set(t.models) & set(models)]
        rows = slide_sample(cfg, plan, tiling, models, sample)
        mean = sum(r["tiles"] for r in rows) / len(rows) if rows else 0.0
        tiles = round(mean * len(todo))
        readers = sorted({r.get("reader", "?") for r in rows if "reader" in r})
        tiling_rate = min((rates["tiling_per_core"].get(r) for r in readers
                           if rates["tiling_per_core"].get(r)), default=None)
        out["passes"].append({
            "models": models, "tile_px": tiling.tile_size, "mpp": tiling.mpp,
            "slides_to_process": len(todo), "sampled": rows,
            "mean_tiles_per_slide": round(mean, 1), "tiles": tiles, "readers": readers,
            "tiling_core_hours": _sig(tiles / tiling_rate / 3600) if tiling_rate else None})
        for m in models:
            n = sum(1 for t in todo if m in t.models)
            m_tiles = round(mean * n)
            cpu, cpu_how = _rate(m, rates["cpu_per_core"])
            gpu, gpu_how = _rate(m, rates["gpu"])
            out["models"][m] = {
                "tiles": m_tiles,
                "gflop": round(m_tiles * _flops(m) / 1e9),
                "cpu_core_hours": _sig(m_tiles / cpu / 3600) if cpu else None,
                "cpu_rate": cpu_how,
                "gpu_hours": _sig(m_tiles / gpu / 3600) if gpu else None,
                "gpu_rate": gpu_how if gpu else "no GPU measurement in bench/results: run "
                "`make gpu-check` on a GPU machine",
            }
    total = [v["gpu_hours"] for m, v in out["models"].items() if not specs.get(m).benchmark]
    out["gpu_hours"] = _sig(math.fsum(total)) if total and None not in total else None
    return out
