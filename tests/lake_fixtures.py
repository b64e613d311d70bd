"""Shared fixtures for end-to-end tests: a real S3 API server and a real local Ray."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

# Offline, deterministic credentials for the local S3 server; set before Ray starts so its
# workers inherit them. Token auth off: a stray ~/.ray/auth_token must not change the tests.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serve(args: list[str], what: str) -> tuple[subprocess.Popen, int]:
    """Start one of the tests' servers (a script beside this file) and read the port it
    bound from its first line of output: it is listening once it prints it."""
    script = os.path.join(os.path.dirname(__file__), args[0])
    proc = subprocess.Popen([sys.executable, script, *args[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the server is up (or has died)
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"{what} did not start (exit code {proc.wait()})")
    return proc, int(line)


@contextlib.contextmanager
def dead_endpoint() -> Iterator[str]:
    """The URL of a port that refuses connections for as long as the block runs: bound by
    this process and never listened on, so no other process can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1 (real HTTP, real S3 API), in its own process:
    delta-rs calls block in Rust, and an in-process server thread could not answer them."""
    server, port = serve(["s3server.py"], "the S3 server")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """One embedded local Ray for all in-process job tests (start-up costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=1_500_000_000, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


class FaultProxy:
    """tests/faultproxy.py in its own process, in front of the S3 server; steered over HTTP."""

    def __init__(self, upstream: str):
        self.proc, self.port = serve(["faultproxy.py", upstream], "the fault proxy")
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, body: bytes | None) -> dict:
        import json
        import urllib.request

        req = urllib.request.Request(f"{self.url}/__faults__", data=body,
                                     method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def set(self, **spec: object) -> dict:
        """every={kind: n}, methods=[...], outage_s=s (see faultproxy.py); {} clears all."""
        import json

        return self._call(json.dumps(spec).encode())

    def report(self) -> dict:
        return self._call(None)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint)
    try:
        yield proxy
    finally:
        proxy.close()
