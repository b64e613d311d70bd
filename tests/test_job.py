"""End-to-end jobs on a real local Ray: outputs per the contract, the README's read paths and
Python API, progress and status, the plan's estimate, plain images, the whole job in S3.
(Re-runs and failures: test_refresh.py; a job over time: test_streaming.py.)"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
from pathlib import Path

import boto3
import numpy as np
import openslide
import pyarrow as pa
import pytest
import yaml
from jobkit import (
    DATA,
    embeddings,
    errors_by_slide,
    exec_snippet,
    generated_cohort,
    job_config,
    readme_blocks,
    readme_read_snippets,
    write_manifest,
)
from PIL import Image
from slidegen import write_blank_slide, write_not_a_slide, write_pyramid_svs, write_truncated

from pipeline.config import StorageConfig
from pipeline.run import run_job
from pipeline.sink import read_slides, read_tiles

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    shutil.copy(DATA / "CMU-1-Small-Region.svs", d / "cmu.svs")
    shutil.copy(DATA / "tiny-16px.svs", d / "tiny.svs")
    write_pyramid_svs(d / "pyr.svs", width=3000, height=2400, mpp=0.25)
    write_pyramid_svs(d / "nompp.tiff", width=1600, height=1200, mpp=None)
    write_blank_slide(d / "blank.svs")
    write_truncated(d / "trunc.svs", d / "pyr.svs")
    write_not_a_slide(d / "notaslide.svs")
    return d


GOOD = {"cmu", "pyr", "nompp-override"}
BAD = {  # slide_id -> expected error stage
    "nompp": "mpp", "tiny": "too_small", "blank": "no_tissue", "notaslide": "open",
    "missing": "stage", "empty-uri": "manifest",
}


def contract_manifest(d: Path, out: Path) -> Path:
    return write_manifest(out / "manifest.csv", [
        {"slide_id": "cmu", "uri": str(d / "cmu.svs"), "cohort": "skin", "mpp": "",
         "stain": "H&E"},
        {"slide_id": "pyr", "uri": str(d / "pyr.svs"), "cohort": "synth", "mpp": "",
         "stain": "H&E"},
        {"slide_id": "nompp-override", "uri": str(d / "nompp.tiff"), "cohort": "synth",
         "mpp": "0.5", "stain": "H&E"},
        {"slide_id": "nompp", "uri": str(d / "nompp.tiff"), "cohort": "synth", "mpp": ""},
        {"slide_id": "tiny", "uri": str(d / "tiny.svs"), "cohort": "skin", "mpp": ""},
        {"slide_id": "blank", "uri": str(d / "blank.svs"), "cohort": "synth", "mpp": ""},
        {"slide_id": "trunc", "uri": str(d / "trunc.svs"), "cohort": "synth", "mpp": ""},
        {"slide_id": "notaslide", "uri": str(d / "notaslide.svs"), "cohort": "synth"},
        {"slide_id": "missing", "uri": str(d / "missing.svs"), "cohort": "synth"},
        {"slide_id": "empty-uri", "uri": "", "cohort": "synth"},
    ])


@pytest.fixture(scope="module")
def contract_lake(slide_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                  local_ray: None) -> tuple[str, dict]:
    """One job over the contract manifest; its lake is only read (the contract test, the
    README's read snippets): one run of the real model instead of one per test."""
    tmp = tmp_path_factory.mktemp("contract")
    out = str(tmp / "lake")
    return out, run_job(job_config(str(contract_manifest(slide_dir, tmp)), out))


def test_job_outputs_follow_the_contract(contract_lake: tuple[str, dict]) -> None:
    out, record = contract_lake
    assert record["status"] == "succeeded"

    slides = read_slides(out)
    tiles = read_tiles(out)
    errors = errors_by_slide(out, record["run_id"])
    committed = set(slides["slide_id"].to_pylist())
    # Nothing lost: every manifest row is committed or an error with a reason.
    assert committed | set(errors) == GOOD | set(BAD) | {"trunc"}
    assert committed == GOOD
    for sid, stage in BAD.items():
        assert errors[sid]["stage"] == stage, errors[sid]
        assert errors[sid]["reason"]
    assert errors["trunc"]["stage"] in {"open", "read"}, errors["trunc"]
    assert "mpp" in errors["nompp"]["reason"]

    # Types: float32 fixed-size lists (every client reads them), readable without Ray.
    assert tiles.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert slides.schema.field("embedding").type == pa.list_(pa.float32(), 384)

    by_id = {r["slide_id"]: r for r in slides.to_pylist()}
    cmu = by_id["cmu"]
    assert cmu["cohort"] == "skin" and cmu["model"] == "kaiko-vits16"
    assert cmu["mpp_source"] == "file" and abs(cmu["mpp"] - 0.499) < 1e-3
    assert by_id["nompp-override"]["mpp_source"] == "manifest"
    assert cmu["random_weights"] is True and cmu["weights_identity"].startswith("random")
    assert json.loads(cmu["extra"]) == {"stain": "H&E"}
    assert by_id["pyr"]["level"] == 0 and by_id["pyr"]["tile_l0"] == pytest.approx(448)
    assert not any(r["upsampled"] for r in by_id.values())  # all scanned at <= 0.5 um/px
    for sid, row in by_id.items():
        t = tiles.filter(pa.compute.equal(tiles["slide_id"], sid))
        assert t.num_rows == row["num_tiles"] > 0
        assert sorted(t["tile_index"].to_pylist()) == list(range(row["num_tiles"]))
        xs, ys = np.array(t["x"]), np.array(t["y"])
        assert xs.min() >= 0 and ys.min() >= 0
        assert (xs + row["tile_l0"]).max() <= row["width"] + 1
        assert (ys + row["tile_l0"]).max() <= row["height"] + 1
        # slide embedding = mean of its tile embeddings
        mean = embeddings(t).astype(np.float32).mean(0)
        np.testing.assert_allclose(embeddings(slides.filter(
            pa.compute.equal(slides["slide_id"], sid)))[0], mean, atol=2e-3, rtol=1e-2)
        assert np.abs(embeddings(t).astype(np.float32)).sum() > 0

    run = json.loads((Path(out) / "runs" / f"{record['run_id']}.json").read_text())
    assert run["status"] == "succeeded" and run["counts"]["committed"] == {"kaiko-vits16": 3}

    # What was tiled, as pictures: each slide's preview and its GeoJSON name its tiles.
    for sid, row in by_id.items():
        with Image.open(Path(out) / row["preview_path"]) as im:
            assert im.format == "JPEG" and 640 <= max(im.size) <= 1024
        assert (Path(out) / row["preview_path"]).stat().st_size <= 150_000
        shapes = json.loads((Path(out) / row["geojson_path"]).read_text())["features"]
        squares = [f for f in shapes if f["properties"]["objectType"] == "tile"]
        assert any(f["properties"]["objectType"] == "annotation" for f in shapes)
        t = tiles.filter(pa.compute.equal(tiles["slide_id"], sid)).sort_by("tile_index")
        assert [f["geometry"]["coordinates"][0][0] for f in squares] == \
            [[x, y] for x, y in zip(t["x"].to_pylist(), t["y"].to_pylist(), strict=True)]
        # QC fractions for every tile, the slides row their mean; sharpness is opt-in
        assert t["qc_background"].null_count == t["qc_pen"].null_count == 0
        assert row["qc_pen"] == pytest.approx(np.mean(t["qc_pen"]), abs=1e-6)
        assert 0 <= row["qc_background"] <= 1 and 0 <= row["qc_pen"] <= 1
        assert t["qc_sharpness"].null_count == t.num_rows and row["qc_sharpness"] is None
    # The run's report is written and linked from its record (its content: test_report.py).
    assert run["report"] == f"reports/{record['run_id']}.html"
    page = (Path(out) / run["report"]).read_text()
    assert all(f'alt="preview of {sid}"' in page for sid in (*GOOD, "blank"))
    # A slide with no tissue shows why; one that failed before it had a thumbnail has none.
    assert (Path(out) / errors["blank"]["preview_path"]).stat().st_size > 0
    assert errors["blank"]["geojson_path"].endswith("blank.geojson")
    assert errors["tiny"]["preview_path"] is None and errors["missing"]["preview_path"] is None


def test_readme_read_paths_run_verbatim(contract_lake: tuple[str, dict]) -> None:
    """Every read snippet of the README, run as written against a real job's lake."""
    out, record = contract_lake
    truth = read_tiles(out, model="kaiko-vits16")
    n = truth.num_rows
    per_slide = collections.Counter(truth["slide_id"].to_pylist())
    cohort = {r["slide_id"]: r["cohort"] for r in read_slides(out).to_pylist()}
    assert set(per_slide) == GOOD and cohort["cmu"] == "skin"
    snippets = readme_read_snippets()
    assert len(snippets) == 5
    spaces: list[dict] = []
    for code in snippets:
        spaces.append(exec_snippet(code, out))
    duck, arrow, polars, spark, loader = spaces
    bag = loader["bag"]
    assert bag["slide_id"] in GOOD
    assert tuple(bag["embeddings"].shape) == (per_slide[bag["slide_id"]], 384)
    assert tuple(bag["coords"].shape) == (per_slide[bag["slide_id"]], 2)
    assert len(duck["rows"]) == n and all(r[1] == cohort[r[0]] for r in duck["rows"])
    assert {r[0]: r[2] for r in duck["rows"]} == per_slide  # each tile joined to its slide
    assert all(-1.0 <= r[5] <= 1.0 for r in duck["rows"])
    assert arrow["X"].shape == (n, 384) and arrow["X"].dtype == np.float32
    assert sorted(arrow["slides"]["slide_id"]) == sorted(GOOD)
    np.testing.assert_array_equal(np.sort(arrow["X"], axis=0), np.sort(embeddings(truth), 0))
    assert polars["tiles"].height == n and polars["slides"].height == len(GOOD)
    # "What happened": the previews and QC filter snippet, then the report's
    shown, report = [exec_snippet(code, out)
                     for code in readme_blocks("## What happened", "\n## ")]
    assert {sid for sid, _, _ in shown["previews"]} == GOOD
    assert all((Path(out) / jpg).is_file() and (Path(out) / geo).is_file()
               for _, jpg, geo in shown["previews"])
    kept = truth.filter(pa.compute.and_(pa.compute.less(truth["qc_pen"], 0.05),
                                        pa.compute.less(truth["qc_background"], 0.5)))
    assert 0 < len(shown["clean"]) == kept.num_rows < n
    assert report["page"] == f"{out}/reports/{record['run_id']}.html"
    assert Path(report["page"]).stat().st_size > 10_000
    # Spark: test_clients.py calls this snippet's read_committed (one JVM for the suite).
    assert callable(spark["read_committed"])


def test_whole_job_in_s3(slide_dir: Path, s3_endpoint: str, s3_bucket: str,
                         tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.upload_file(str(slide_dir / "pyr.svs"), s3_bucket, "slides/pyr.svs")
    manifest = write_manifest(tmp_path / "m.csv", [
        {"slide_id": "cmu", "uri": "slides/cmu.svs", "cohort": "skin"},       # relative
        {"slide_id": "pyr", "uri": f"s3://{s3_bucket}/slides/pyr.svs", "cohort": "synth"},
        {"slide_id": "gone", "uri": f"s3://{s3_bucket}/slides/gone.svs", "cohort": "synth"},
    ])
    s3.upload_file(str(manifest), s3_bucket, "manifests/m.csv")
    storage = {"endpoint_url": s3_endpoint, "scratch_dir": str(tmp_path / "scratch")}
    out = f"s3://{s3_bucket}/lake"
    # What is tested is the storage path: the benchmark model stands in for a network.
    cfg = job_config(f"s3://{s3_bucket}/manifests/m.csv", out, ["bench-null"], storage=storage)
    # The relative uri resolves next to the manifest, in the bucket.
    s3.upload_file(str(slide_dir / "cmu.svs"), s3_bucket, "manifests/slides/cmu.svs")
    record = run_job(cfg)
    assert record["status"] == "succeeded"
    sc = StorageConfig(**storage)
    slides = read_slides(out, storage=sc)
    assert sorted(slides["slide_id"].to_pylist()) == ["cmu", "pyr"]
    assert all("etag=" in f for f in slides["fingerprint"].to_pylist())
    assert read_tiles(out, storage=sc).num_rows == sum(slides["num_tiles"].to_pylist())
    errs = errors_by_slide(out, record["run_id"], sc)
    assert errs["gone"]["stage"] == "stage" and "not found" in errs["gone"]["reason"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert f"lake/runs/{record['run_id']}.json" in keys
    assert not os.listdir(tmp_path / "scratch") or all(
        f.startswith(".") for f in os.listdir(tmp_path / "scratch"))  # staged slides removed
    assert run_job(cfg)["plan"]["slides_to_process"] == 0


def test_plan_estimate_matches_the_run(slide_dir: Path, tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    rows = [{"slide_id": "cmu", "uri": str(slide_dir / "cmu.svs")},
            {"slide_id": "pyr", "uri": str(slide_dir / "pyr.svs")}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    tiling = {"mpp": 0.5, "chunk_tiles": 16}  # each model its own tile size
    cfg = job_config(str(manifest), out, ["bench-null", "bench-null-256", "uni"], tiling=tiling)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg.model_dump(exclude_defaults=True)))
    assert main(["plan", str(job), "--estimate", "8"]) == 0
    est = json.loads(capsys.readouterr().out.split("\nerror:")[0])["estimate"]
    by_pass = {tuple(p["models"]): p for p in est["passes"]}
    assert set(by_pass) == {("bench-null",), ("bench-null-256", "uni")}  # 224 and 256 px
    sampled = {s["slide_id"]: s for s in by_pass[("bench-null-256", "uni")]["sampled"]}
    assert set(sampled) == {"cmu", "pyr"}
    assert all(s["reader"] in ("tiff", "openslide") for s in sampled.values())
    uni = est["models"]["uni"]
    assert uni["cpu_rate"] == "kaiko-vits16's measured rate scaled by FLOPs per tile"
    assert uni["cpu_core_hours"] > 0 and uni["gflop"] > 100 * uni["tiles"]
    assert est["models"]["bench-null"]["cpu_rate"] == "benchmark model: no model compute"
    # every slide sampled: the estimate is the tiling stage's own count, per tiling pass
    run_job(job_config(str(manifest), out, ["bench-null", "bench-null-256"], tiling=tiling))
    for m in ("bench-null", "bench-null-256"):
        slides = read_slides(out, model=m)
        assert est["models"][m]["tiles"] == sum(slides["num_tiles"].to_pylist()), m
    assert uni["tiles"] == est["models"]["bench-null-256"]["tiles"]


def test_progress_while_it_runs_and_status_after(tmp_path: Path, caplog, capsys) -> None:
    from pipeline.cli import main
    from pipeline.lease import Lease
    from pipeline.sink import Lake
    from pipeline.status import lake_status

    rows = generated_cohort(tmp_path / "slides", 3, seed=41)
    rows.append({"slide_id": "gone", "uri": str(tmp_path / "gone.svs"), "cohort": "c"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    cfg = job_config(str(manifest), out, ["bench-null"], progress_seconds=0.05,
                     sink={"commit_slides": 1})
    with caplog.at_level("INFO", logger="pipeline"):
        record = run_job(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert lines, "no progress line while the job ran"
    assert re.match(r"progress: \d/3 slides committed, \d failed, \d+ tiles, [\d.]+ tiles/s "
                    r"\(last minute\), ETA ", lines[-1])
    p = record["progress"]
    # "gone" failed at planning: counted as failed, not among the 3 slides to process
    assert (p["slides_planned"], p["slides_committed"], p["slides_failed"]) == (3, 3, 1)
    assert p["tiles_committed"] == record["counts"]["tiles_encoded"]["bench-null"]

    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    assert f"latest run {record['run_id']}: succeeded" in text and "no job running" in text
    assert "3/3 slides committed, 1 failed" in text
    assert f"gone [all models] stage: slide file not found: {tmp_path / 'gone.svs'}" in text
    assert f"report: {out}/reports/{record['run_id']}.html" in text
    lake = Lake(out)
    with Lease(lake.fs, lake.root, "nightly-x", 60, 0):
        assert lake_status(out)["running"] == "nightly-x"


def test_readme_python_api_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys) -> None:
    (code,) = readme_blocks("### From Python")
    rows = generated_cohort(tmp_path / "slides", 2, seed=51)
    write_manifest(tmp_path / "m.csv", rows)
    cfg = job_config("m.csv", "lake", ["bench-null"])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg.model_dump(exclude_defaults=True)))
    monkeypatch.chdir(tmp_path)
    scope = exec_snippet(code, "lake")
    assert scope["record"]["status"] == "succeeded"
    assert scope["record"]["config"]["tiling"]["min_tissue"] == 0.5
    assert sorted(scope["slides"]["slide_id"].to_pylist()) == ["s0", "s1"]
    assert "'slides_to_process': 2" in capsys.readouterr().out


def test_plain_images_are_slides_when_the_manifest_gives_their_mpp(tmp_path: Path) -> None:
    with openslide.OpenSlide(str(DATA / "CMU-1-Small-Region.svs")) as s:
        rgb = s.read_region((0, 0), 0, s.dimensions).convert("RGB")
    rgb.save(tmp_path / "roi.png")
    rgb.save(tmp_path / "core.jpg", quality=92)
    rgb.save(tmp_path / "strip.tif")  # a plain (stripped, single-level) TIFF
    rows = [{"slide_id": n, "uri": str(tmp_path / f), "mpp": "0.499"}
            for n, f in (("roi", "roi.png"), ("core", "core.jpg"), ("strip", "strip.tif"))]
    rows.append({"slide_id": "nompp", "uri": str(tmp_path / "roi.png"), "mpp": ""})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    record = run_job(job_config(str(manifest), out, ["bench-null"]))
    slides = {r["slide_id"]: r for r in read_slides(out).to_pylist()}
    assert set(slides) == {"roi", "core", "strip"}
    assert all(r["mpp_source"] == "manifest" and r["mpp"] == pytest.approx(0.499)
               for r in slides.values())
    assert slides["roi"]["num_tiles"] == slides["strip"]["num_tiles"] > 0  # lossless, same grid
    err = errors_by_slide(out, record["run_id"])["nompp"]
    assert err["stage"] == "mpp" and "add an `mpp` column" in err["reason"]
