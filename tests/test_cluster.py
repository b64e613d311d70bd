"""The job as users run it: a separate process, killed and re-run (`ray job submit` to a head:
test_multinode.py, on its cluster)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from jobkit import (
    CLUSTER_ENV,
    REPO,
    SEVERAL_WRITERS,
    assert_same_lake,
    job_config,
    lake_snapshot,
    write_job,
    write_manifest,
)
from slidegen import write_pyramid_svs

from pipeline.config import JobConfig
from pipeline.run import run_job
from pipeline.sink import read_slides, read_tiles

ENV = CLUSTER_ENV


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    d = tmp_path_factory.mktemp("cohort")
    n = 6  # the kill comes after the 2nd commit: 4 slides are still to do
    rows = []
    for i in range(n):
        write_pyramid_svs(d / f"s{i}.svs", width=1400, height=1100, mpp=0.5, levels=(1, 4),
                          seed=100 + i)
        rows.append({"slide_id": f"s{i:02d}", "uri": str(d / f"s{i}.svs"),
                     "cohort": "even" if i % 2 == 0 else "odd"})
    write_manifest(d / "manifest.csv", rows)
    return d / "manifest.csv", n


# The killed run's encoder takes this long per tile, as a GPU would, without using a CPU (the
# benchmark model's stand-in wait); batches of 8 tiles (about a slide) finish slides one by
# one: after its 2nd commit, 4 slides hold seconds of encoding, so the kill lands mid-job
# however slowly this test reads the job's log.
KILLED_RUN_ENV = {**ENV, "WSI_BENCH_DEVICE_MS_PER_TILE": "300"}


def job_cfg(manifest: Path, out: Path) -> JobConfig:
    # one commit per slide: the kill lands between commits, or inside one
    cfg = job_config(str(manifest), str(out), ["bench-null"], ray={"num_cpus": 2},
                     sink={"commit_slides": 1, "writers": SEVERAL_WRITERS})
    cfg.models[0].batch_size = 8
    return cfg


def job_file(tmp: Path, manifest: Path, out: Path, name: str) -> Path:
    return write_job(tmp / f"{name}.yaml", job_cfg(manifest, out))


def committed_files(out: Path) -> list[str]:
    """Committed slides, as a reader following the documented path sees them now."""
    try:
        return sorted(read_slides(str(out), columns=["slide_id"])["slide_id"].to_pylist())
    except FileNotFoundError:
        return []


COMMITTED = re.compile(r" pipeline: committed (\d+) slides of ")


def wait_for_commits(proc: subprocess.Popen, slides: int) -> list[str]:
    """Read the job's log (its stderr) until its driver says ``slides`` slides are committed:
    the coordinator logs each commit right after the transaction landed. Returns the lines
    read; fails if the job ends first."""
    assert proc.stderr is not None
    lines: list[str] = []
    done = 0
    while done < slides:
        line = proc.stderr.readline()  # blocks until the job writes a line, or ends
        assert line, "job ended before it could be killed:\n" + "".join(lines[-40:])
        lines.append(line)
        if m := COMMITTED.search(line):
            done += int(m.group(1))
    return lines


@pytest.mark.usefixtures("local_ray")
def test_kill_mid_job_then_rerun_equals_uninterrupted_run(cohort: tuple[Path, int],
                                                          tmp_path: Path) -> None:
    manifest, n = cohort
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    # The reference run on the tests' shared local Ray (the run to kill is a process of its
    # own, with the local Ray it starts, as users run the job).
    assert run_job(job_cfg(manifest, clean))["status"] == "succeeded"

    job = job_file(tmp_path, manifest, killed, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)],
                            env=KILLED_RUN_ENV,
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Killed as the driver reports its 2nd slide committed: the other slides are still
        # being tiled, encoded or committed (each commit is its own transaction).
        wait_for_commits(proc, 2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the driver and the local Ray it started
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()
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

    # The re-run in this process, on the shared local Ray: all it needs of the killed run is
    # what that left in the lake.
    assert run_job(job_cfg(manifest, killed))["status"] == "succeeded"
    # Batches group tiles differently between runs; CPU matmul results may differ in the
    # last bits, so embeddings are compared to fp16 resolution (the model pools each tile's
    # pixels: its embeddings are the tiles', as a network's would be).
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
