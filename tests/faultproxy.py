"""A fault-injecting HTTP proxy between a job and an S3 API server, for the fault suite.

Run as its own process (``python faultproxy.py UPSTREAM_URL``: it prints the port it bound);
delta-rs calls block in Rust, so a server thread inside the test process could not answer
them. The test steers it over HTTP on the same port:

    POST /__faults__  {"every": {"slowdown": 4, ...}, "methods": ["PUT"], "outage_s": 20}
    GET  /__faults__  -> {"requests": n, "injected": {"slowdown": k, ...}} since the last POST

Kinds, each applied to every n-th request that matches ``methods`` (all methods if absent):
``slowdown`` (503 SlowDown, not forwarded), ``reset`` (connection reset, not forwarded),
``truncate`` (forwarded; the response body is cut in half, then the connection reset),
``lost_reply`` (forwarded, so the server acts on it; the reply never comes back: the client
cannot know whether a write happened). ``outage_s`` answers 503 to every matching request for
that many seconds from now, or, with ``"outage_after": {"path": REGEX, "count": n}``, from the
moment the n-th PUT whose path matches REGEX has been answered 2xx (say, a table's first
commit): the test need not watch the lake to catch that moment. The report then says
``"outage_started": true``.

Link model (latency and bandwidth, for benchmarks): ``delay_s`` waits that long before each
forwarded request (a round trip to the store), ``bytes_per_s`` caps the response bytes of all
requests together (one shared link: concurrent replies queue for it). The report's
``bytes_out`` counts the response body bytes sent since the last POST. ``range_cache``:
ranged GETs are answered from a copy of the object fetched whole from the server once (moto
copies the whole object per GET under a per-object lock, ~60 ms for 48 MB, which S3 does not
do); a PUT or DELETE through the proxy drops the copy.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId>"
            b"</Error>")
KINDS = ("slowdown", "reset", "truncate", "lost_reply")
HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te",
       "upgrade"}


class Faults:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.every: dict[str, int] = {}
        self.methods: set[str] | None = None
        self.outage_until = 0.0
        self.outage_s = 0.0
        self.outage_after: tuple[re.Pattern[str], int] | None = None
        self.outage_started = False
        self.requests = 0
        self.matched = 0
        self.injected = dict.fromkeys((*KINDS, "outage"), 0)
        self.delay_s = 0.0
        self.bytes_per_s = 0.0
        self.link_free_at = 0.0  # when the shared link has sent what is queued on it
        self.bytes_out = 0
        self.range_cache = False
        self.objects: dict[str, tuple[bytes, list[tuple[str, str]]]] = {}

    def configure(self, spec: dict[str, Any]) -> None:
        with self.lock:
            self.every = {k: int(v) for k, v in spec.get("every", {}).items() if int(v) > 0}
            unknown = set(self.every) - set(KINDS)
            if unknown:
                raise ValueError(f"unknown fault kinds {sorted(unknown)}")
            methods = spec.get("methods")
            self.methods = {m.upper() for m in methods} if methods else None
            self.outage_s = float(spec.get("outage_s", 0.0))
            after = spec.get("outage_after")
            self.outage_after = (re.compile(after["path"]), int(after.get("count", 1))
                                 ) if after else None
            self.outage_started = not after and self.outage_s > 0
            self.outage_until = time.monotonic() + self.outage_s if not after else 0.0
            self.matched = 0
            self.requests = 0  # counts are of the faults since this configuration
            self.injected = dict.fromkeys((*KINDS, "outage"), 0)
            self.delay_s = float(spec.get("delay_s", 0.0))
            self.bytes_per_s = float(spec.get("bytes_per_s", 0.0))
            self.bytes_out = 0
            self.range_cache = bool(spec.get("range_cache", False))
            self.objects: dict[str, tuple[bytes, list[tuple[str, str]]]] = {}

    def link(self, nbytes: int) -> float:
        """Seconds until a reply of ``nbytes`` has gone over the shared link (queued behind
        the replies before it); counts its bytes."""
        with self.lock:
            self.bytes_out += nbytes
            if self.bytes_per_s <= 0:
                return 0.0
            now = time.monotonic()
            self.link_free_at = max(now, self.link_free_at) + nbytes / self.bytes_per_s
            return self.link_free_at - now

    def decide(self, method: str) -> str | None:
        with self.lock:
            self.requests += 1
            if self.methods is not None and method not in self.methods:
                return None
            if time.monotonic() < self.outage_until:
                self.injected["outage"] += 1
                return "outage"
            self.matched += 1
            for kind in KINDS:  # the first kind whose period divides the count wins
                n = self.every.get(kind)
                if n and self.matched % n == 0:
                    self.injected[kind] += 1
                    return kind
            return None

    def answered(self, method: str, path: str, status: int) -> None:
        """A forwarded request's reply went back to the client: it may start the outage."""
        with self.lock:
            if (self.outage_after is None or method != "PUT" or not 200 <= status < 300
                    or not self.outage_after[0].search(path)):
                return
            pattern, left = self.outage_after
            self.outage_after = (pattern, left - 1) if left > 1 else None
            if left <= 1:
                self.outage_until = time.monotonic() + self.outage_s
                self.outage_started = True

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "injected": dict(self.injected),
                    "outage_started": self.outage_started, "bytes_out": self.bytes_out}


def make_handler(upstream: str, faults: Faults) -> type[BaseHTTPRequestHandler]:
    up = urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST, as a dropped connection does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _control(self) -> None:
            if self.command == "POST":
                try:
                    faults.configure(json.loads(self._body() or b"{}"))
                except ValueError as err:
                    msg = str(err).encode()
                    self._reply(400, msg, [("Content-Length", str(len(msg)))])
                    return
            data = json.dumps(faults.report()).encode()
            self._reply(200, data, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(data)))])

        def _handle(self) -> None:
            if self.path.startswith("/__faults__"):
                self._control()
                return
            body = self._body()
            fault = faults.decide(self.command)
            if fault in ("slowdown", "outage"):
                self._reply(503, SLOWDOWN, [("Content-Type", "application/xml"),
                                            ("Content-Length", str(len(SLOWDOWN)))])
                return
            if fault == "reset":
                self._reset()
                return
            if faults.delay_s > 0:
                time.sleep(faults.delay_s)
            if self.command in ("PUT", "DELETE"):
                faults.objects.pop(self.path.split("?")[0], None)
            if (faults.range_cache and self.command == "GET" and "?" not in self.path
                    and self.headers.get("Range", "").startswith("bytes=")):
                self._ranged(up)
                return
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP
                       and k.lower() != "content-length"]
            finally:
                conn.close()
            if fault == "lost_reply":
                self._reset()
                return
            length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
            out.append(("Content-Length", str(length or 0)))
            wait = faults.link(0 if self.command == "HEAD" else len(data))
            if wait > 0:
                time.sleep(wait)
            if fault == "truncate" and len(data) > 1 and self.command != "HEAD":
                self.send_response(resp.status)
                for k, v in out:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self._reset()
                return
            self._reply(resp.status, b"" if self.command == "HEAD" else data, out)
            self.wfile.flush()
            faults.answered(self.command, self.path, resp.status)

        def _ranged(self, up: Any) -> None:
            """A ranged GET answered from the proxy's copy of the object (``range_cache``)."""
            got = faults.objects.get(self.path)
            if got is None:
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in HOP and k.lower() != "range"}
                    conn.request("GET", self.path, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    keep = [(k, v) for k, v in resp.getheaders()
                            if k.lower() in ("etag", "last-modified", "content-type")]
                finally:
                    conn.close()
                if resp.status != 200:
                    self._reply(resp.status, data, [("Content-Length", str(len(data)))])
                    return
                got = faults.objects[self.path] = (data, keep)
            data, keep = got
            first, _, last = self.headers["Range"][6:].partition("-")
            a, b = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            body = data[a:b + 1]
            wait = faults.link(len(body))
            if wait > 0:
                time.sleep(wait)
            self._reply(206, body, [*keep, ("Content-Range", f"bytes {a}-{b}/{len(data)}"),
                                    ("Content-Length", str(len(body)))])

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def main() -> None:
    upstream = sys.argv[1]
    # port 0: the OS picks a free one, printed once bound (tests/lake_fixtures.py reads it)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(upstream, Faults()))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
