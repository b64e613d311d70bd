"""Re-runs and failures on a real local Ray: a re-run does only the new work (a new slide, a
rewritten file, a new model); slides, files replaced mid-run and encoders that fail are
recorded per slide and model, and a run fails when too many slides do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from jobkit import (
    assert_same_lake,
    errors_by_slide,
    generated_cohort,
    job_config,
    lake_snapshot,
    write_manifest,
)
from slidegen import write_blank_slide, write_pyramid_svs

from pipeline.run import run_job
from pipeline.sink import duckdb_connect, read_errors, read_slides, read_tiles
from pipeline.storage import fingerprint

pytestmark = pytest.mark.usefixtures("local_ray")


def test_incremental_refresh(tmp_path: Path) -> None:
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


def test_a_slide_replaced_after_planning_is_not_committed_as_planned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_too_many_failed_slides_fail_the_run(tmp_path: Path) -> None:
    rows = generated_cohort(tmp_path / "slides", 1, seed=23) + [
        {"slide_id": f"gone{i}", "uri": str(tmp_path / f"gone{i}.svs")} for i in range(3)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "lake")
    record = run_job(job_config(str(manifest), out, ["bench-null"], max_failed_fraction=0.5))
    assert record["counts"]["committed"] == {"bench-null": 1}
    assert record["status"] == "failed" and "75% of the slides failed" in record["error"]
    # the default fails only a run that committed nothing
    record = run_job(job_config(str(manifest), str(tmp_path / "lake2"), ["bench-null"]))
    assert record["status"] == "succeeded"


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
