"""What the lake benchmarks (sink.py, plan.py, read.py) share: a local S3 server that counts
the requests it serves, slides rows shaped as the coordinator commits them, and the state of
the code measured.

The S3 server is moto's (``moto.server``, the same app ``ThreadedMotoServer`` runs) behind a
WSGI middleware that counts every HTTP request it answers, by client and by S3 operation.
Counting at the server (its own process) sees every client: s3fs/aiobotocore (manifest,
listings, fsspec writes) and delta-rs, whose Rust ``object_store`` makes its own requests
that no botocore hook can see. Clients are told apart by their User-Agent.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]

# Offline, deterministic credentials for the local S3 server (as tests/lake_fixtures.py).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
          "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def set_s3_env() -> None:
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)


def code_state(files: Sequence[str] = ("pipeline/sink.py", "pipeline/writer.py",
                                       "pipeline/plan.py", "pipeline/storage.py",
                                       "pipeline/run.py", "pipeline/coordinator.py")
               ) -> dict[str, Any]:
    """Git revision plus a hash of each measured file (others edit them while we measure)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=False).stdout.strip()
    except OSError:
        rev = ""
    return {"git_head": rev, "files_sha256_12": {
        f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in files
        if (ROOT / f).exists()}}


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing ray here would hide whether
    the code measured imports it)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("pyarrow", "deltalake", "duckdb", "polars", "moto", "s3fs", "ray", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unavailable"
    return out


# ----------------------------------------------------------------------------------------------
# A counting S3 server.


def _client(agent: str) -> str:
    a = agent.lower()
    if "object_store" in a or "delta-rs" in a:
        return "delta-rs (object_store)"
    if "botocore" in a or "boto3" in a:
        return "python (s3fs/botocore)"
    return agent.split(" ", 1)[0] or "unknown"


def _operation(method: str, path: str, query: str, headers: dict[str, str]) -> str:
    q = parse_qs(query, keep_blank_values=True)
    key = path.lstrip("/").split("/", 1)[1] if "/" in path.lstrip("/") else ""
    if method == "GET" and not key:
        if "list-type" in q:
            return "ListObjectsV2"
        return "ListObjects" if "location" not in q else "GetBucketLocation"
    if method == "GET":
        return "GetObject (range)" if "range" in headers else "GetObject"
    if method == "HEAD":
        return "HeadObject" if key else "HeadBucket"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "CopyObject"
        if "if-none-match" in headers:
            return "PutObject (if-none-match)"
        return "PutObject" if key else "CreateBucket"
    if method == "POST" and "delete" in q:
        return "DeleteObjects"
    if method == "DELETE":
        return "DeleteObject"
    return f"{method} {'object' if key else 'bucket'}"


class _Counter:
    """WSGI middleware: counts each request, answers ``/__counts__`` itself (JSON; with
    ``?reset=1`` also clears the counts; ``&log=1`` keeps each request's path from then on)."""

    def __init__(self, app: Any):
        self.app = app
        self.lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []
        self.keep_log = False

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        if path == "/__counts__":
            with self.lock:
                body = json.dumps({"counts": [[w, op, n] for (w, op), n in self.counts.items()],
                                   "log": self.log}).encode()
                if "reset=1" in query:
                    self.counts.clear()
                    self.log = []
                    self.keep_log = "log=1" in query
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        method = environ.get("REQUEST_METHOD", "")
        op = _operation(method, path, query, headers)
        who = _client(headers.get("user-agent", ""))
        with self.lock:
            self.counts[(who, op)] += 1
            if self.keep_log:
                self.log.append((who, op, f"{method} {path}?{query}"))
        return self.app(environ, start_response)


def serve(port: int) -> None:
    """The counting S3 server, in its own process (``python bench/lakekit.py PORT``).

    Not a thread of the benchmark: deltalake's ``DeltaTable.is_deltatable`` holds the GIL
    while it waits for the server, so an in-process Python server never answers it."""
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = _Counter(DomainDispatcherApplication(create_backend_app))
    make_server("127.0.0.1", port, app, True, request_handler=MotoRequestHandler).serve_forever()


class CountingS3:
    """moto's S3 on 127.0.0.1 (real HTTP, its own process) counting the requests it answers."""

    def __init__(self) -> None:
        set_s3_env()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                self._get("")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the S3 server did not start") from None
                time.sleep(0.1)
        self.reset()

    def _get(self, query: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/__counts__?{query}", timeout=30) as r:
            return json.loads(r.read())

    def bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name

    def reset(self, keep_log: bool = False) -> None:
        self._get("reset=1" + ("&log=1" if keep_log else ""))

    def total(self) -> int:
        return sum(n for _, _, n in self._get("")["counts"])

    def log(self) -> list[list[str]]:
        return self._get("")["log"]

    def report(self) -> dict[str, Any]:
        """Counts by client and by (client, operation), since the last reset."""
        counts = self._get("")["counts"]
        by_client: collections.Counter[str] = collections.Counter()
        for who, _, n in counts:
            by_client[who] += n
        return {"total": sum(n for _, _, n in counts), "by_client": dict(by_client),
                "by_operation": {f"{w}: {op}": n for w, op, n in sorted(counts)}}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------------------------------------------
# Slides rows as the coordinator commits them (pipeline.coordinator.Coordinator.commit).


def slides_rows(ids: Sequence[str], cohorts: Sequence[str], work_keys: Sequence[str],
                tiles_paths: Sequence[str | None], dim: int, dtype: str = "float32",
                seed: int = 0, uris: Iterable[str] | None = None,
                fingerprints: Iterable[str] | None = None) -> pa.Table:
    """A slides table of ``len(ids)`` rows with every column filled plausibly."""
    from pipeline.sink import embedding_array, now, slides_schema

    n = len(ids)
    rng = np.random.default_rng(seed)
    stamp = now()
    uris = list(uris) if uris is not None else [f"s3://slides/{i}.svs" for i in ids]
    fps = list(fingerprints) if fingerprints is not None else ["size=1;etag=x"] * n
    values: dict[str, Any] = {
        "slide_id": list(ids), "uri": uris, "fingerprint": fps, "size_bytes": [1 << 30] * n,
        "width": [100_000] * n, "height": [80_000] * n, "mpp": [0.25] * n,
        "mpp_source": ["openslide.mpp-x"] * n, "vendor": ["aperio"] * n,
        "objective_power": [40.0] * n, "target_mpp": [0.5] * n, "tile_px": [224] * n,
        "tile_l0": [448.0] * n, "level": [0] * n, "num_tiles": [2000] * n,
        "tissue_area_mm2": [100.0] * n, "tile_order": ["row-major"] * n,
        "aggregation": ["mean"] * n, "layer": [None] * n, "source_model": ["m"] * n,
        "model_dim": [dim] * n, "precision": ["fp16"] * n, "device": ["cuda"] * n,
        "weights": ["random"] * n, "weights_identity": ["random:seed=1"] * n,
        "weights_sha256": [None] * n, "random_weights": [True] * n,
        "tiling": ['{"mpp": 0.5, "tile_size": 224}'] * n, "tiling_hash": ["0" * 16] * n,
        "work_key": list(work_keys), "tiles_path": list(tiles_paths),
        "code_version": ["0"] * n, "run_id": ["bench"] * n,
        "tiling_started_at": [stamp] * n, "committed_at": [stamp] * n,
        "extra": ["{}"] * n, "cohort": list(cohorts),
    }
    schema = slides_schema(dim, dtype)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    cols = [embedding_array(emb, dtype) if f.name == "embedding" else
            pa.array(values[f.name], f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
