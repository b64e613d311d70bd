"""A job over time, on a real local Ray: slides committed while others are still tiled, with
the tiler's memory flat, and the passes of several tile specs streaming at the same time."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from jobkit import SEVERAL_WRITERS, generated_cohort, job_config, write_manifest
from slidegen import write_pyramid_svs

from pipeline.run import run_job
from pipeline.sink import read_tiles

pytestmark = pytest.mark.usefixtures("local_ray")


def test_streaming_commits_before_tiling_ends_and_tiler_memory_is_flat(
        tmp_path: Path) -> None:
    d = tmp_path / "slides"
    d.mkdir()
    n = 14
    rows = []
    for i in range(n):
        write_pyramid_svs(d / f"s{i}.svs", width=1400, height=1100, mpp=0.5, levels=(1, 4),
                          seed=i)
        rows.append({"slide_id": f"s{i:02d}", "uri": str(d / f"s{i}.svs"), "cohort": "c"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    before = ray.data.DataContext.get_current().execution_options.resource_limits
    # A 10 MB budget holds ~70 tiles of 224 px: tiling may run only a few slides ahead of
    # the encoder, as it would with large slides and a full object store on a cluster.
    record = run_job(job_config(str(manifest), out,
                                ray={"tiling_concurrency": 1,
                                     "object_store_budget_gb": 0.01},
                                sink={"writers": SEVERAL_WRITERS}))
    # The budget was this job's: the next job in this process starts from Ray's defaults.
    after = ray.data.DataContext.get_current().execution_options.resource_limits
    assert after.object_store_memory == before.object_store_memory != 0.01 * 2**30
    assert record["counts"]["committed"] == {"kaiko-vits16": n}
    timings = record["slides"]
    last_tiled = max(s["last_chunk_at"] for s in timings)
    first_commit = min(s["committed_at"] for s in timings)
    assert first_commit < last_tiled, "no slide was committed before the last slide was tiled"
    # The generated TIFFs take the direct JPEG reader, and the record says so per slide.
    assert {s["reader"] for s in timings} == {"tiff"}
    # The first encoded rows reached the driver no later than the first commit.
    assert record["first_batch"]["rows"] > 0 and record["first_batch"]["at"] <= first_commit
    # Slides committed while the job ran, in several transactions, not all at its end.
    assert record["commits"]["count"] >= 2
    assert len({s["committed_at"] for s in timings}) >= 2
    # Tiler memory does not grow with the number of slides processed by a worker.
    by_pid: dict[int, list[float]] = {}
    for s in sorted(timings, key=lambda s: s["tiling_started_at"]):
        by_pid.setdefault(s["tiler_pid"], []).append(s["tiler_peak_rss_mb"])
    longest = max(by_pid.values(), key=len)
    assert len(longest) >= 4
    early, late = max(longest[:3]), max(longest)
    assert late <= early * 1.15 + 40, f"tiler RSS grew from {early:.0f} to {late:.0f} MB"


def test_models_of_different_tile_specs_run_at_once(tmp_path: Path) -> None:
    """Three tiling specs (224, 256 and 512 px): three passes, streaming at the same time."""
    rows = generated_cohort(tmp_path / "slides", 4, seed=40, width=2400, height=1800)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    models = ["bench-null", "bench-null-256", "bench-null-512"]
    cfg = job_config(str(manifest), out, models=models, tiling={"chunk_tiles": 16},
                     ray={"tiling_cpus": 0.4, "encoder_cpus": 0.2},
                     sink={"commit_slides": 1})
    record = run_job(cfg)
    assert record["passes"] == "concurrent"
    assert record["counts"]["committed"] == {m: 4 for m in models}
    spans = {}
    for m in models:
        mine = [s for s in record["slides"] if s["models"] == [m]]
        assert len(mine) == 4
        spans[m] = (min(s["tiling_started_at"] for s in mine),
                    max(s["committed_at"] for s in mine))
    # every pass started before any pass had finished
    assert max(a for a, _ in spans.values()) < min(b for _, b in spans.values()), spans
    px = {m: read_tiles(out, model=m)["tile_px"].unique().to_pylist() for m in models}
    assert px == {"bench-null": [224], "bench-null-256": [256], "bench-null-512": [512]}
