"""A real multi-node Ray cluster on this machine: `ray job submit`, placement by custom
resource, node loss.

Four `ray start` processes share the host, as the nodes of a cluster launched with
ray_cluster.yaml would: a head that does no work, CPU "tiler" nodes and an "encoder" node (a
GPU worker faked by its custom resource). Jobs go in through `ray job submit`, as in production.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from jobkit import (
    BIN,
    CLUSTER_ENV,
    SEVERAL_WRITERS,
    assert_same_lake,
    job_config,
    lake_snapshot,
    source_snapshot,
    write_job,
    write_manifest,
)
from slidegen import write_pyramid_svs

from pipeline.config import build_config
from pipeline.sink import read_slides, read_tiles

pytestmark = pytest.mark.slow

SOURCES = source_snapshot()  # what `ray job submit --working-dir` uploads
ENV = {**CLUSTER_ENV,
       # Notice a lost node in seconds, not Ray's default ~30 s (read by the head's GCS);
       # generous enough that a busy 2-core CI machine does not look like a dead node.
       "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
       "RAY_health_check_failure_threshold": "5"}
# Small object stores: four nodes share one host (and its /dev/shm) with other work.
STORE = "--object-store-memory=150000000"
SLIDES = 5


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _group(leader: int) -> list[psutil.Process]:
    """The node's processes: its process group plus descendants (Ray gives each worker a
    process group of its own)."""
    procs = {}
    for p in psutil.process_iter():
        try:
            if _pgid(p.pid) == leader and p.status() != psutil.STATUS_ZOMBIE:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    for p in list(procs.values()):
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(procs.values())


def kill_node(leader: int) -> None:
    """SIGKILL everything of one node at once, as when its machine disappears."""
    procs = _group(leader)
    os.killpg(leader, signal.SIGKILL)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the node's process group, wait for Ray's processes, then SIGKILL what is left."""
    stop_groups([proc], grace)


def stop_groups(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """stop_group for several nodes at once: one grace period for all, not one each."""
    live = [p for p in procs if p.poll() is None or _group(p.pid)]
    for proc in live:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(p.pid != proc.pid for proc in live
                                         for p in _group(proc.pid)):
        time.sleep(0.3)
    for proc in live:
        try:
            kill_node(proc.pid)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait(10)


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    temp: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        """Where the node ``name`` writes its output (kept after a failed test)."""
        return Path(self.temp) / f"{name}.log"

    def start_node(self, name: str, resources: dict[str, float], cpus: int = 1) -> None:
        # No --temp-dir: a node joining a head on the same host takes the head's session dir.
        # Each node's dashboard agent needs a port of its own (Ray's default is one fixed
        # port): 0, so that it binds a free one itself.
        self.procs[name] = self.spawn(name, [
            str(BIN / "ray"), "start", "--block", f"--address={self.gcs}",
            "--node-ip-address=127.0.0.1", f"--node-name={name}", f"--num-cpus={cpus}",
            "--num-gpus=0", f"--resources={json.dumps(resources)}", STORE,
            "--dashboard-agent-listen-port=0", "--disable-usage-stats"])

    def read_head_addresses(self, timeout: float = 120) -> None:
        """The GCS and dashboard addresses of a head that chose its own ports (``--port=0``,
        ``--dashboard-port=0``: no port picked here and bound later, which another process
        could take meanwhile), from the lines `ray start` prints once the head is up."""
        log = self.log("head")
        deadline = time.time() + timeout
        while True:
            assert self.procs["head"].poll() is None, log.read_text()[-3000:]
            text = log.read_text(errors="replace")
            gcs = re.search(r"ray start --address='[^']*:(\d+)'", text)
            dashboard = re.search(r"RAY_API_SERVER_ADDRESS='(http://127\.0\.0\.1:\d+)'", text)
            if gcs and dashboard:
                self.gcs, self.dashboard = f"127.0.0.1:{gcs.group(1)}", dashboard.group(1)
                return
            assert time.time() < deadline, "the head did not print its addresses:\n" + text
            time.sleep(0.5)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        """A node in its own process group (so it can be stopped, or lost, as a whole)."""
        with self.log(name).open("ab") as log:
            return subprocess.Popen(args, env=ENV, start_new_session=True, stdout=log,
                                    stderr=subprocess.STDOUT)

    def wait_nodes(self, names: list[str], timeout: float = 180) -> None:
        """Wait until every named node is ALIVE and record its Ray node id."""
        from ray.util.state import list_nodes

        deadline = time.time() + timeout
        while True:
            for name in names:
                assert self.procs[name].poll() is None, self.log(name).read_text()[-3000:]
            alive = {n.node_name: n for n in list_nodes(address=self.dashboard, timeout=10)
                     if n.state == "ALIVE"}
            if all(n in alive for n in names):
                self.ids.update({n: alive[n].node_id for n in names})
                return
            assert time.time() < deadline, f"nodes not up: {set(names) - set(alive)}"
            time.sleep(0.5)

    def stop_node(self, name: str) -> None:
        stop_group(self.procs.pop(name))


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Head (0 CPUs, no custom resources) + one tiler node + one encoder node; always stopped."""
    temp = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: unix socket paths are limited
    failed_before = request.session.testsfailed
    c = Cluster(gcs="", dashboard="", temp=temp)  # addresses: read once the head is up
    c.procs["head"] = c.spawn("head", [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--port=0", "--dashboard-host=127.0.0.1", "--dashboard-port=0", "--num-cpus=0",
         "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=true", STORE,
         "--dashboard-agent-listen-port=0", "--disable-usage-stats"])
    try:
        c.read_head_addresses()
        deadline = time.time() + 120
        while True:
            assert c.procs["head"].poll() is None, "ray start --head exited"
            try:
                urllib.request.urlopen(f"{c.dashboard}/api/version", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "dashboard did not come up"
                time.sleep(0.5)
        # One node at a time: nodes starting together in one session dir race for its files.
        c.start_node("tiler-a", {"tiler": 1})
        c.wait_nodes(["tiler-a"])
        c.start_node("encoder", {"encoder": 1})
        c.wait_nodes(["encoder"])
        yield c
    finally:
        # Workers first (all at once), while the head still answers their drain requests.
        # Nodes can take ~15 s to exit on SIGTERM after jobs ran; nothing is checked after
        # this, so each gets a short grace, then SIGKILL.
        stop_groups([c.procs.pop(n) for n in list(c.procs) if n != "head"], grace=2.0)
        if "head" in c.procs:
            stop_group(c.procs.pop("head"), grace=3.0)
        if request.session.testsfailed == failed_before:
            shutil.rmtree(temp, ignore_errors=True)  # kept after a failure: node logs


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mn_cohort")
    rows = []
    for i in range(SLIDES):
        # All tissue: 24 tiles per slide, 12 chunks.
        write_pyramid_svs(d / f"s{i}.svs", width=1400, height=1100, mpp=0.5, levels=(1, 4),
                          background=False, seed=300 + i)
        rows.append({"slide_id": f"m{i:02d}", "uri": str(d / f"s{i}.svs")})
    return write_manifest(d / "manifest.csv", rows)


# The encoder's time per tile in the job that loses a node, as a GPU would take it: the
# benchmark model's stand-in wait, which uses no CPU (its embeddings are its tiles' pooled
# pixels, so lakes still compare tile by tile).
SLOW_ENCODER = {"WSI_BENCH_DEVICE_MS_PER_TILE": "100"}


def cluster_job(tmp: Path, manifest: Path, out: Path) -> Path:
    data = job_config(str(manifest), str(out), ["bench-null"]).model_dump()
    data["ray"].update(tiler_resource="tiler", encoder_resource="encoder",
                       # A budget of a few chunks makes Ray Data's backpressure pause each
                       # tiling task mid-slide until the (slow) encoder catches up, as on a
                       # real cluster: tiling tasks are in flight while slides commit.
                       object_store_budget_gb=0.0015)
    data["tiling"]["chunk_tiles"] = 2
    data["models"][0]["batch_size"] = 8  # slides commit one by one, not all in one batch
    data["sink"].update(commit_slides=1, writers=SEVERAL_WRITERS)
    return write_job(tmp / f"{out.name}.yaml", build_config(data))


def submit(c: Cluster, job: Path, sid: str, *wait: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``job``; ``env``: variables for every process of the job."""
    deadline = time.time() + 90
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env})] if env else []
    while True:
        sub = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", c.dashboard, "--working-dir",
             str(SOURCES), *runtime_env, "--submission-id", sid, *wait, "--", "python", "-m",
             "pipeline", "run", str(job), "--run-id", sid],
            env=ENV, capture_output=True, text=True, timeout=300)
        # The dashboard answers before the head's job agent has registered; Ray says retry.
        if "No available agent" not in sub.stderr or time.time() > deadline:
            return sub
        time.sleep(1)


def job_status(c: Cluster, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(c.dashboard).get_job_status(sid).value)


def job_logs(c: Cluster, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(c.dashboard).get_job_logs(sid)[-6000:]


def committed(out: Path) -> int:
    """Slides committed now, as a reader following the documented path sees them."""
    try:
        return read_slides(str(out), columns=["slide_id"]).num_rows
    except FileNotFoundError:
        return 0


def run_record(out: Path, run_id: str) -> dict:
    return json.loads((out / "runs" / f"{run_id}.json").read_text())


def assert_complete(out: Path) -> None:
    slides = read_slides(str(out))
    assert slides.num_rows == SLIDES  # every manifest row committed
    assert read_tiles(str(out)).num_rows == sum(slides["num_tiles"].to_pylist())


@pytest.fixture(scope="module")
def undisturbed(cluster: Cluster, manifest: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("mn_clean")
    out = tmp / "clean"
    sub = submit(cluster, cluster_job(tmp, manifest, out), "mn-clean")
    assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
    assert job_status(cluster, "mn-clean") == "SUCCEEDED"
    return out, run_record(out, "mn-clean")


def test_work_lands_on_the_nodes_advertising_its_resource(cluster: Cluster,
                                                          undisturbed: tuple[Path, dict]) -> None:
    out, record = undisturbed
    assert record["status"] == "succeeded"
    assert len(record["slides"]) == SLIDES
    for s in record["slides"]:
        assert s["tiler_node"] == cluster.ids["tiler-a"], s
        assert s["encoder_nodes"] == {"bench-null": [cluster.ids["encoder"]]}, s
    assert_complete(out)


def test_ray_job_submit_to_a_local_head(cluster: Cluster, manifest: Path,
                                        tmp_path: Path) -> None:
    """A plain job file (no placement labels) through `ray job submit --working-dir`: the
    head places the work on whichever nodes have CPUs."""
    n = 3  # a few slides are enough to prove the submission path
    lines = manifest.read_text().splitlines()
    small = tmp_path / "manifest.csv"
    small.write_text("\n".join(lines[: n + 1]) + "\n")
    out = tmp_path / "lake"
    # The benchmark model: what is tested is the submission and placement, not a network.
    job = write_job(tmp_path / "job.yaml", job_config(str(small), str(out), ["bench-null"]))
    sub = submit(cluster, job, "nightly-test")
    assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
    assert job_status(cluster, "nightly-test") == "SUCCEEDED"
    slides = read_slides(str(out))
    assert slides.num_rows == n
    assert read_tiles(str(out)).num_rows == sum(slides["num_tiles"].to_pylist())


HOLD = """
import threading
import ray

ray.init()


@ray.remote(num_cpus=1, resources={"tiler": 0.001})
class Hold:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


hold = Hold.remote()
print("holding", ray.get(hold.node.remote()), flush=True)
threading.Event().wait()  # until `ray job stop`
"""


def hold_tiler_cpu(c: Cluster, sid: str) -> str:
    """Occupy the one CPU of the only tiler node there is now with an actor of a job of its
    own; returns that node's id once the actor runs there (the job's log says so)."""
    sub = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", c.dashboard,
                          "--submission-id", sid, "--no-wait", "--", "python", "-c", HOLD],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
    deadline = time.time() + 180
    while not (m := re.search(r"^holding (\w+)$", job_logs(c, sid), re.M)):
        assert job_status(c, sid) in {"PENDING", "RUNNING"}, job_logs(c, sid)
        assert time.time() < deadline, "the holding actor did not start"
        time.sleep(0.5)
    return m.group(1)


def test_losing_a_tiler_node_mid_job_changes_no_row(cluster: Cluster, manifest: Path,
                                                   undisturbed: tuple[Path, dict],
                                                   tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    # tiler-a's CPU is held while tiler-b joins: until tiler-b is lost, it tiles every slide,
    # so when a slide has committed the other slides' tiling is on tiler-b (in a running
    # task, or as chunks in its object store: the small object-store budget keeps tiling
    # only a few chunks ahead of the encoder), and nothing can have been tiled elsewhere.
    assert hold_tiler_cpu(cluster, "mn-hold") == cluster.ids["tiler-a"]
    try:
        cluster.start_node("tiler-b", {"tiler": 1})
        cluster.wait_nodes(["tiler-b"])
        out = tmp_path / "lossy"
        sub = submit(cluster, cluster_job(tmp_path, manifest, out), "mn-lossy", "--no-wait",
                     env=SLOW_ENCODER)
        assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
        deadline = time.time() + 240
        while not committed(out):  # a state that lasts: the job cannot finish without tiler-a
            assert job_status(cluster, "mn-lossy") in {"PENDING", "RUNNING"}, \
                job_logs(cluster, "mn-lossy")
            assert time.time() < deadline, "no slide committed"
            time.sleep(0.2)
        # The whole node at once: raylet, object store, its workers and agents.
        kill_node(cluster.procs["tiler-b"].pid)
        committed_at_kill = committed(out)
        cluster.stop_node("tiler-b")
    finally:
        JobSubmissionClient(cluster.dashboard).stop_job("mn-hold")  # tiler-a takes over

    deadline = time.time() + 240
    while (status := job_status(cluster, "mn-lossy")) in {"PENDING", "RUNNING"}:
        assert time.time() < deadline, "job did not finish after the node loss"
        time.sleep(0.5)
    assert status == "SUCCEEDED", job_logs(cluster, "mn-lossy")
    assert committed_at_kill < SLIDES, "the kill landed after the job's work was done"
    record = run_record(out, "mn-lossy")
    assert record["status"] == "succeeded" and record["counts"]["errors"] == 0
    tilers = {s["tiler_node"] for s in record["slides"]}
    assert cluster.ids["tiler-b"] in tilers  # the slides committed before the loss
    assert tilers <= {cluster.ids["tiler-a"], cluster.ids["tiler-b"]}
    assert_complete(out)
    # Batches group tiles differently between runs; CPU matmuls may differ in the last bits.
    assert_same_lake(lake_snapshot(str(undisturbed[0])), lake_snapshot(str(out)), atol=2e-3)
