"""Storage faults between a real job and a real S3 API server: nothing is lost.

A fault-injecting proxy of our own (faultproxy.py) sits between the job and moto: 503
SlowDown, connection resets, truncated bodies, replies lost after the server acted, and timed
outages. Each test drives a real job on a local Ray through it and checks that every manifest
row is committed or has an error row, and that what is committed equals an undisturbed run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from jobkit import (
    SEVERAL_WRITERS,
    assert_same_lake,
    errors_by_slide,
    generated_cohort,
    job_config,
    lake_snapshot,
    write_manifest,
)
from lake_fixtures import FaultProxy

from pipeline.config import JobConfig, StorageConfig
from pipeline.run import run_job
from pipeline.sink import Lake, read_slides
from pipeline.unsaved import UnsavedRecords

pytestmark = pytest.mark.usefixtures("local_ray")
N_SLIDES = 6
BUCKET = "faults"


@pytest.fixture(scope="module")
def cohort(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Slides and manifest in the bucket, and the lake of an undisturbed run of them."""
    d = tmp_path_factory.mktemp("fault-cohort")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    rows = generated_cohort(d / "slides", N_SLIDES, seed=70)
    for r in rows:
        s3.upload_file(r["uri"], BUCKET, f"slides/{r['slide_id']}.svs")
        r["uri"] = f"s3://{BUCKET}/slides/{r['slide_id']}.svs"
    s3.upload_file(str(write_manifest(d / "m.csv", rows)), BUCKET, "m.csv")
    direct = StorageConfig(endpoint_url=s3_endpoint)
    base = f"s3://{BUCKET}/undisturbed"
    record = run_job(config(s3_endpoint, base, d / "scratch"))
    assert record["status"] == "succeeded"
    return {"ids": sorted(r["slide_id"] for r in rows), "direct": direct, "dir": d,
            "base": lake_snapshot(base, direct)}


def config(endpoint: str, out: str, scratch: Path, **storage: Any) -> JobConfig:
    return job_config(f"s3://{BUCKET}/m.csv", out, ["bench-null"],
                      storage={"endpoint_url": endpoint, "scratch_dir": str(scratch), **storage},
                      sink={"commit_slides": 1, "commit_seconds": 0.2,
                            "writers": SEVERAL_WRITERS,
                            "unsaved_dir": str(scratch.parent / "unsaved")})


def committed_ids(out: str, storage: StorageConfig) -> set[str]:
    try:
        return set(read_slides(out, storage=storage)["slide_id"].to_pylist())
    except FileNotFoundError:
        return set()


# A PUT of a slides table's commit file: the moment a slide becomes visible.
SLIDES_COMMIT = r"/slides/[^/]+/_delta_log/\d+\.json$"


def run_with_outage_after_first_commit(cfg: JobConfig, proxy: FaultProxy, outage_s: float
                                       ) -> tuple[dict[str, Any] | BaseException, dict]:
    """Run the job; once its first slide is committed (the proxy has answered the first PUT
    of a slides commit file), every write through the proxy is answered 503 for
    ``outage_s``. Returns the job's record (or exception) and the proxy's report taken when
    the job ended."""
    proxy.set(methods=["PUT", "POST"], outage_s=outage_s,
              outage_after={"path": SLIDES_COMMIT, "count": 1})
    try:
        result: dict[str, Any] | BaseException = run_job(cfg)
    except Exception as err:  # noqa: BLE001 - handed to the test
        result = err
    finally:
        report = proxy.report()
        proxy.set()
    assert report["outage_started"], "the job ended before its first commit was seen"
    return result, report


def check_nothing_lost(out: str, cohort: dict[str, Any], run_id: str,
                       ids: set[str] | None = None) -> set[str]:
    """Every slide the run had to do (``ids``: all of the manifest) is committed by run
    ``run_id`` or has its error row; what the lake holds equals the undisturbed run's rows of
    the same slides. Returns the ids that failed."""
    direct = cohort["direct"]
    slides = read_slides(out, storage=direct)
    by_run = {s for s, r in zip(slides["slide_id"].to_pylist(), slides["run_id"].to_pylist(),
                                strict=True) if r == run_id}
    errors = errors_by_slide(out, run_id, direct)
    lost = (set(cohort["ids"]) if ids is None else ids) - by_run - set(errors)
    assert not lost, f"slides with neither a row nor an error row of run {run_id}: {lost}"
    committed = set(slides["slide_id"].to_pylist())
    base = cohort["base"]
    keep = [k for k in base["keys"] if k[1] in committed]
    assert_same_lake({"keys": keep, "emb": {k: base["emb"][k] for k in keep},
                      "slides": [r for r in base["slides"] if r["slide_id"] in committed]},
                     lake_snapshot(out, direct))
    return set(errors) - by_run


def test_every_kind_of_fault_loses_nothing(cohort: dict[str, Any], fault_proxy: FaultProxy,
                                           tmp_path: Path) -> None:
    out = f"s3://{BUCKET}/mixed"
    fault_proxy.set(every={"slowdown": 5, "reset": 7, "truncate": 11, "lost_reply": 13})
    try:
        record = run_job(config(fault_proxy.url, out, tmp_path / "scratch",
                                retry_max_backoff_s=0.05))
    finally:
        report = fault_proxy.report()
        fault_proxy.set()
    print("faults injected:", json.dumps(report))
    assert all(report["injected"][k] > 0 for k in ("slowdown", "reset", "truncate",
                                                   "lost_reply"))
    assert record["status"] == "succeeded", record["error"]
    assert check_nothing_lost(out, cohort, record["run_id"]) == set()  # 0 slides lost
    assert committed_ids(out, cohort["direct"]) == set(cohort["ids"])


def test_a_write_outage_within_the_budget_is_ridden_out(
        cohort: dict[str, Any], fault_proxy: FaultProxy, tmp_path: Path) -> None:
    out = f"s3://{BUCKET}/outage"
    cfg = config(fault_proxy.url, out, tmp_path / "scratch", retry_budget_s=120,
                 retry_max_backoff_s=1)
    record, report = run_with_outage_after_first_commit(cfg, fault_proxy, outage_s=3)
    print("faults injected:", json.dumps(report))
    assert report["injected"]["outage"] > 0
    assert isinstance(record, dict) and record["status"] == "succeeded", record
    assert check_nothing_lost(out, cohort, record["run_id"]) == set()
    assert committed_ids(out, cohort["direct"]) == set(cohort["ids"])


def test_an_outage_past_the_budget_fails_slides_and_keeps_their_records(
        cohort: dict[str, Any], fault_proxy: FaultProxy, tmp_path: Path) -> None:
    out = f"s3://{BUCKET}/long-outage"
    cfg = config(fault_proxy.url, out, tmp_path / "scratch", retry_budget_s=1.5,
                 retry_max_backoff_s=0.3)
    # Storage is down for the rest of the run: slides fail, and neither their error rows nor
    # the run record can be written.
    err, report = run_with_outage_after_first_commit(cfg, fault_proxy, outage_s=3600)
    print("faults injected:", json.dumps(report))
    assert isinstance(err, UnsavedRecords), err
    kept = tmp_path / "unsaved"
    assert str(kept) in str(err) and "written to the lake by the next run" in str(err)
    (run_dir,) = kept.iterdir()
    assert (run_dir / "run.json").is_file() and list(run_dir.glob("errors-*.parquet"))
    first = run_dir.name
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert Lake(out, cohort["direct"]).read_run(first)["status"] == "running"  # as it was

    # Storage is back: the next run writes what was kept, then does the slides that failed.
    second = run_job(cfg)
    assert second["status"] == "succeeded"
    assert not run_dir.exists()
    lake = Lake(out, cohort["direct"])
    assert lake.read_run(first)["status"] == "failed"
    failed = check_nothing_lost(out, cohort, first)
    assert failed, "the outage failed no slide: the test did not test the budget"
    errors = errors_by_slide(out, first, cohort["direct"])
    assert {r["stage"] for r in errors.values()} <= {"write", "commit"}
    assert all("storage kept failing" in r["reason"] and "\x1b" not in r["reason"]
               for r in errors.values())
    # ... and the second run did exactly those: the lake is the undisturbed one.
    assert second["plan"]["slides_to_process"] == len(failed)
    assert check_nothing_lost(out, cohort, second["run_id"], failed) == set()
    assert committed_ids(out, cohort["direct"]) == set(cohort["ids"])
