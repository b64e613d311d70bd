"""The job as users run it: a separate process, killed and re-run, and `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from jobkit import (
    BIN,
    CLUSTER_ENV,
    REPO,
    assert_same_lake,
    job_config,
    lake_snapshot,
    source_snapshot,
    write_job,
    write_manifest,
)
from lake_fixtures import free_port
from slidegen import write_pyramid_svs

from pipeline.sink import read_slides, read_tiles

SOURCES = source_snapshot()  # what `ray job submit --working-dir` uploads
ENV = CLUSTER_ENV


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    d = tmp_path_factory.mktemp("cohort")
    n = 10
    rows = []
    for i in range(n):
        write_pyramid_svs(d / f"s{i}.svs", width=2200, height=1800, mpp=0.5, levels=(1, 4),
                          seed=100 + i)
        rows.append({"slide_id": f"s{i:02d}", "uri": str(d / f"s{i}.svs"),
                     "cohort": "even" if i % 2 == 0 else "odd"})
    write_manifest(d / "manifest.csv", rows)
    return d / "manifest.csv", n


def job_file(tmp: Path, manifest: Path, out: Path, name: str) -> Path:
    # one commit per slide: the kill lands between commits, or inside one
    cfg = job_config(str(manifest), str(out), ray={"num_cpus": 2}, sink={"commit_slides": 1})
    return write_job(tmp / f"{name}.yaml", cfg)


def run_cli(job: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job)], env=ENV,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def committed_files(out: Path) -> list[str]:
    """Committed slides, as a reader following the documented path sees them now."""
    try:
        return sorted(read_slides(str(out), columns=["slide_id"])["slide_id"].to_pylist())
    except FileNotFoundError:
        return []


def test_kill_mid_job_then_rerun_equals_uninterrupted_run(cohort: tuple[Path, int],
                                                          tmp_path: Path) -> None:
    manifest, n = cohort
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run_cli(job_file(tmp_path, manifest, clean, "clean"))

    job = job_file(tmp_path, manifest, killed, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], env=ENV,
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(committed_files(killed)) < 2 and time.time() < deadline:
            assert proc.poll() is None, "job ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(30)
    visible = committed_files(killed)
    assert 2 <= len(visible) < n, f"kill landed at {len(visible)} of {n} slides"

    # Nothing half-visible: each committed slide has exactly its tiles, each file is whole.
    slides = read_slides(str(killed))
    tiles = read_tiles(str(killed))
    for row in slides.to_pylist():
        count = sum(1 for s in tiles["slide_id"].to_pylist() if s == row["slide_id"])
        assert count == row["num_tiles"]
    for f in (killed / "tiles").rglob("*.parquet"):
        pq.read_table(f)

    (dead,) = [json.loads(f.read_text()) for f in (killed / "runs").glob("*.json")]
    assert dead["status"] == "running"  # nothing could say otherwise when it was killed

    run_cli(job)
    # Batches group tiles differently between runs; CPU matmul results may differ in the
    # last bits, so embeddings are compared to fp16 resolution.
    assert_same_lake(lake_snapshot(str(clean)), lake_snapshot(str(killed)), atol=2e-3)
    # The re-run took over the dead run's lease, and so knows it died: its record says so.
    records = {r["run_id"]: r for r in (json.loads(f.read_text())
                                        for f in (killed / "runs").glob("*.json"))}
    (rerun,) = set(records) - {dead["run_id"]}
    assert records[rerun]["status"] == "succeeded"
    gone = records[dead["run_id"]]
    assert gone["status"] == "abandoned" and gone["abandoned_by"] == rerun
    assert f"process {dead['driver_pid']} on host {dead['driver_host']} was gone" in gone[
        "abandoned_how"]


@pytest.fixture
def ray_head() -> Iterator[str]:
    """`ray start --head` on 127.0.0.1 in its own temp dir; stopped whatever happens."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: unix socket paths are limited
    dash = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true",
         # Its own agent port: the default (52365) may be held by another Ray on this machine.
         f"--dashboard-agent-listen-port={free_port()}",
         "--disable-usage-stats"],
        env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        stop_process_group(head)


def stop_process_group(leader: subprocess.Popen) -> None:
    """SIGTERM lets Ray's processes exit cleanly; `ray start --block` itself then needs KILL."""
    os.killpg(leader.pid, signal.SIGTERM)
    deadline = time.time() + 8
    while time.time() < deadline and any(
            p.pid != leader.pid for p in psutil.process_iter()
            if _pgid(p.pid) == leader.pid and _alive(p)):
        time.sleep(0.5)
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait(10)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_ray_job_submit_to_a_local_head(ray_head: str, cohort: tuple[Path, int],
                                        tmp_path: Path) -> None:
    manifest, _ = cohort
    n = 3  # a few slides are enough to prove the submission path
    lines = manifest.read_text().splitlines()
    small = tmp_path / "manifest.csv"
    small.write_text("\n".join(lines[: n + 1]) + "\n")
    out = tmp_path / "lake"
    job = write_job(tmp_path / "job.yaml", job_config(str(small), str(out)))
    for _ in range(5):  # the head's agent may still be registering right after start-up
        sub = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir",
             str(SOURCES), "--submission-id", "nightly-test", "--", "python", "-m", "pipeline",
             "run", str(job)], env=ENV, capture_output=True, text=True, timeout=600)
        if "No available agent" not in sub.stdout + sub.stderr:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_head).get_job_status("nightly-test") == JobStatus.SUCCEEDED
    slides = read_slides(str(out))
    assert slides.num_rows == n
    assert read_tiles(str(out)).num_rows == sum(slides["num_tiles"].to_pylist())
