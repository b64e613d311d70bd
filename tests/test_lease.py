"""One job per lake at a time: the lease, locally and on S3, and two jobs started together."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from jobkit import generated_cohort, job_config, lake_snapshot, write_manifest

from pipeline.config import StorageConfig
from pipeline.lease import LEASE_FILE, LakeBusy, Lease
from pipeline.run import run_job
from pipeline.storage import url_to_fs


def leases(url: str, storage: StorageConfig, ttl: float = 60.0) -> tuple[Lease, Lease]:
    fs, root = url_to_fs(url, storage)
    return Lease(fs, root, "run-a", ttl, 0.0), Lease(fs, root, "run-b", ttl, 0.0)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_holder_is_refused_until_the_first_releases(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        url = f"s3://{request.getfixturevalue('s3_bucket')}/lake"
        storage = StorageConfig(endpoint_url=endpoint)
    else:
        url, storage = str(tmp_path / "lake"), StorageConfig()
    a, b = leases(url, storage)
    a.acquire()
    with pytest.raises(LakeBusy, match="in use by run run-a"):
        b.acquire()
    a.release()
    b.acquire()
    assert b.holder()["run_id"] == "run-b"
    b.release()
    assert b.holder() is None


def test_a_dead_holders_lease_is_taken_over(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / LEASE_FILE).write_text(json.dumps(
        {"run_id": "killed", "renewed_at": time.time() - 600, "ttl_s": 60}))
    _, b = leases(str(lake), StorageConfig())
    b.acquire()
    assert b.holder()["run_id"] == "run-b"
    assert b.took_over is not None and b.took_over["run_id"] == "killed"
    assert "last renewed 6" in b.took_over["how"] and "ttl 60 s" in b.took_over["how"]
    b.release()


@pytest.mark.usefixtures("local_ray")
def test_two_jobs_started_together_end_with_the_rows_of_one(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", generated_cohort(tmp_path / "slides", 3,
                                                                   seed=20))
    out = str(tmp_path / "lake")
    cfg = job_config(str(manifest), out, ["bench-null"], sink={"lease_wait_s": 600})
    start = threading.Barrier(2)
    records: list[dict] = []

    def job() -> None:
        start.wait()
        records.append(run_job(cfg))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["status"] for r in records) == ["succeeded", "succeeded"]
    work = sorted(r["plan"]["slides_to_process"] for r in records)
    assert work == [0, 3], "the second job must find the first one's work done"
    snap = lake_snapshot(out)
    assert len(snap["keys"]) == len(set(snap["keys"])) and len(snap["slides"]) == 3
    assert not (Path(out) / LEASE_FILE).exists()
