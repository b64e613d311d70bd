"""End-to-end jobs on a real local Ray: outputs per the contract, refresh, streaming, S3."""

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
import ray
import yaml
from fsspec.implementations.local import LocalFileSystem
from jobkit import (
    DATA,
    SEVERAL_WRITERS,
    assert_same_lake,
    embeddings,
    errors_by_slide,
    exec_snippet,
    generated_cohort,
    job_config,
    lake_snapshot,
    readme_blocks,
    readme_read_snippets,
    write_manifest,
)
from PIL import Image
from slidegen import write_blank_slide, write_not_a_slide, write_pyramid_svs, write_truncated

from pipeline.config import ConfigError, StorageConfig
from pipeline.run import run_job
from pipeline.sink import duckdb_connect, read_errors, read_slides, read_tiles
from pipeline.storage import fingerprint

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


def test_incremental_refresh(slide_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "slides"
    d.mkdir()
    for name in ("a", "b"):
        write_pyramid_svs(d / f"{name}.svs", width=1400, height=1100, mpp=0.5, levels=(1, 4),
                          seed=ord(name))
    rows = [{"slide_id": n, "uri": str(d / f"{n}.svs"), "cohort": "c"} for n in ("a", "b")]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    # The refresh rules are the model's work key, not its maths: the benchmark model
    # (pixels pooled, no network) stands in for a real one.
    cfg = job_config(str(manifest), out, models=["bench-null"])

    first = run_job(cfg)
    assert first["counts"]["committed"] == {"bench-null": 2}
    before = lake_snapshot(out)

    second = run_job(cfg)  # nothing changed: no model work at all
    assert second["plan"]["slides_to_process"] == 0
    assert second["counts"]["tiles_encoded"] == {"bench-null": 0}
    assert_same_lake(before, lake_snapshot(out))

    write_pyramid_svs(d / "c.svs", width=1400, height=1100, mpp=0.5, levels=(1, 4), seed=3)
    write_manifest(tmp_path / "m.csv", [*rows, {"slide_id": "c", "uri": str(d / "c.svs"),
                                                "cohort": "c"}])
    third = run_job(cfg)  # a new slide: only it
    assert [s["slide_id"] for s in third["slides"]] == ["c"]

    write_pyramid_svs(d / "a.svs", width=1500, height=1100, mpp=0.5, levels=(1, 4), seed=9)
    fourth = run_job(cfg)  # a rewritten file: only it, replacing its rows
    assert [s["slide_id"] for s in fourth["slides"]] == ["a"]
    a_tiles = read_tiles(out).filter(pa.compute.equal(read_tiles(out)["slide_id"], "a"))
    a_row = read_slides(out).filter(pa.compute.equal(read_slides(out)["slide_id"], "a"))
    assert a_tiles.num_rows == a_row["num_tiles"][0].as_py()
    assert a_row["width"][0].as_py() == 1500

    # bench-null-256: 256 px tiles and 1024 dimensions, as UNI has, without its ViT-L on CPU
    cfg2 = job_config(str(manifest), out, models=["bench-null", "bench-null-256"])
    fifth = run_job(cfg2)  # a new model: all slides, that model only
    assert fifth["counts"]["tiles_encoded"]["bench-null"] == 0
    assert fifth["counts"]["committed"] == {"bench-null": 0, "bench-null-256": 3}
    other = read_tiles(out, model="bench-null-256")
    assert other.schema.field("embedding").type == pa.list_(pa.float32(), 1024)
    assert run_job(cfg2)["plan"]["slides_to_process"] == 0


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


def test_too_many_failed_slides_fail_the_run(slide_dir: Path, tmp_path: Path) -> None:
    rows = generated_cohort(tmp_path / "slides", 1, seed=23) + [
        {"slide_id": f"gone{i}", "uri": str(slide_dir / f"gone{i}.svs")} for i in range(3)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    record = run_job(job_config(str(manifest), out, ["bench-null"], max_failed_fraction=0.5))
    assert record["counts"]["committed"] == {"bench-null": 1}
    assert record["status"] == "failed" and "75% of the slides failed" in record["error"]
    # the default fails only a run that committed nothing
    record = run_job(job_config(str(manifest), str(tmp_path / "lake2"), ["bench-null"]))
    assert record["status"] == "succeeded"


def test_a_slide_replaced_after_planning_is_not_committed_as_planned(
        slide_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.run

    d = tmp_path / "slides"
    rows = generated_cohort(d, 2, seed=5)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    real_plan = pipeline.run.plan_job

    def plan_then_replace(*args: object, **kwargs: object) -> object:
        plan = real_plan(*args, **kwargs)
        # A user replaces s1 with another scan just after the job planned it.
        write_pyramid_svs(d / "s1.svs", width=1400, height=1100, mpp=0.5, levels=(1, 4),
                          seed=99)
        return plan

    monkeypatch.setattr(pipeline.run, "plan_job", plan_then_replace)
    out = str(tmp_path / "lake")
    record = run_job(job_config(str(manifest), out, ["bench-null"]))
    assert record["counts"]["committed"] == {"bench-null": 1}
    err = errors_by_slide(out, record["run_id"])["s1"]
    assert err["stage"] == "changed" and "changed during the run" in err["reason"]
    monkeypatch.undo()
    # The next run plans the new bytes and commits them with their own fingerprint.
    again = run_job(job_config(str(manifest), out, ["bench-null"]))
    assert again["counts"]["committed"] == {"bench-null": 1}
    slides = read_slides(out)
    fp = dict(zip(slides["slide_id"].to_pylist(), slides["fingerprint"].to_pylist(), strict=True))
    assert fp["s1"] == str(fingerprint(LocalFileSystem(), str(d / "s1.svs")))


def test_an_encoder_that_cannot_start_fails_the_job_with_its_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights pass the driver's check, then vanish before the actors load them (a node
    without the file): the job ends, and says why in plain text, in the record and rows."""
    import timm
    from safetensors.torch import save_file

    import pipeline.run
    from pipeline.models import registry

    rows = generated_cohort(tmp_path / "slides", 2, seed=3)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    spec = registry.get("kaiko-vits16")
    model = timm.create_model(spec.timm_name, pretrained=False, **dict(spec.timm_kwargs))
    weights = tmp_path / "kaiko.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    real_plan = pipeline.run.plan_job

    def plan_then_remove(*args: object, **kwargs: object) -> object:
        plan = real_plan(*args, **kwargs)
        weights.unlink()
        return plan

    monkeypatch.setattr(pipeline.run, "plan_job", plan_then_remove)
    cfg = job_config(str(manifest), str(tmp_path / "lake"))
    cfg.models[0].weights = str(weights)
    with pytest.raises(Exception, match="creation task"):
        run_job(cfg)
    (record_file,) = (tmp_path / "lake" / "runs").glob("*.json")
    record = json.loads(record_file.read_text())
    cause = ("an actor failed to start: WeightsError: kaiko-vits16: weights file "
             f"'{weights}' not found on this node")
    assert record["status"] == "failed" and record["error"].startswith(cause)
    errs = errors_by_slide(str(tmp_path / "lake"), record["run_id"])
    assert set(errs) == {"s0", "s1"}
    assert all(cause in e["reason"] and "\x1b" not in e["reason"] for e in errs.values())


def test_two_cpu_models_on_two_cores_fit_themselves(tmp_path: Path) -> None:
    """One tiling task (1 CPU) and two CPU encoder actors (1 CPU each) cannot all hold a slot
    on 2 cores: Ray would wait for ever. The job lowers ray.encoder_cpus to fit."""
    rows = generated_cohort(tmp_path / "slides", 2, seed=21)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cfg = job_config(str(manifest), str(tmp_path / "lake"), ["bench-null", "kaiko-vits16"])
    for m in cfg.models:
        m.device = "cpu"
    assert cfg.ray.encoder_cpus == 1.0 and cfg.ray.tiling_cpus == 1.0
    record = run_job(cfg)
    assert record["status"] == "succeeded"
    assert record["placement"]["encoder_cpus"] == 0.5
    assert record["counts"]["committed"] == {"bench-null": 2, "kaiko-vits16": 2}


def test_more_actors_than_cores_can_hold_are_refused(tmp_path: Path) -> None:
    rows = generated_cohort(tmp_path / "slides", 1, seed=22)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cfg = job_config(str(manifest), str(tmp_path / "lake"), ["bench-null"])
    cfg.models[0].actors = 12
    cfg.models[0].device = "cpu"
    with pytest.raises(ConfigError, match=r"12 encoder actors .* need 13 CPUs but this Ray "
                       r"has 2: lower models\[\]\.actors, or --set ray.tiling_cpus=0.5 --set "
                       r"ray.encoder_cpus=0.12"):
        run_job(cfg)


def test_errors_now_is_the_status_per_slide_and_model(tmp_path: Path) -> None:
    d = tmp_path / "slides"
    rows = generated_cohort(d, 2, seed=31)
    rows.append({"slide_id": "late", "uri": str(d / "late.svs"), "cohort": "c"})
    rows.append({"slide_id": "never", "uri": str(d / "never.svs"), "cohort": "c"})
    write_blank_slide(d / "blank.svs")  # fails in tiling: a row per model
    rows.append({"slide_id": "blank", "uri": str(d / "blank.svs"), "cohort": "c"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    cfg = job_config(str(manifest), out, ["bench-null", "bench-null-256"])
    first = run_job(cfg)
    shutil.copy(d / "s0.svs", d / "late.svs")  # the missing slide arrives
    second = run_job(cfg)
    models = ("bench-null", "bench-null-256")
    history = {(r["slide_id"], r["model"], r["run_id"]) for r in read_errors(out).to_pylist()}
    # missing files fail before any model: one row (no model); tiling failures: one per model
    assert history == {("late", None, first["run_id"])} | {
        ("never", None, run["run_id"]) for run in (first, second)} | {
        ("blank", m, run["run_id"]) for m in models for run in (first, second)}
    now = {(r["slide_id"], r["model"], r["run_id"])
           for r in read_errors(out, current=True).to_pylist()}
    assert now == {("never", None, second["run_id"])} | {
        ("blank", m, second["run_id"]) for m in models}
    con = duckdb_connect(out)
    assert con.sql("SELECT count(*) FROM errors_now").fetchall() == [(3,)]
    assert con.sql("SELECT count(DISTINCT run_id) FROM errors").fetchall() == [(2,)]


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
