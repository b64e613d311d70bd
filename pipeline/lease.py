"""One job at a time per lake: a lease object, created exclusively, renewed while the job runs.

Two jobs started at the same moment on one lake would both plan the same work (the lake's
snapshot is the same for both) and both pay for it. The lease makes the second one wait for
the first (``sink.lease_wait_s``) and then plan against what the first committed, or refuse
with a message naming the holder. Exclusive creation is O_EXCL locally and a conditional PUT
(``If-None-Match: *``) on S3. A holder that dies stops renewing; after ``sink.lease_ttl_s``
its lease may be taken over, at once where it ran on this host and its process is gone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import RetryPolicy, atomic_write_bytes, join, with_retries

log = logging.getLogger("pipeline")
LEASE_FILE = "_lease.json"


class LakeBusy(RuntimeError):
    """Another live job holds the lake."""


def _create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """True if we created ``path``; False if it already existed."""
    if isinstance(fs, LocalFileSystem):
        # Written whole under a temporary name, then linked into place: link() fails if the
        # lease exists, and a reader never sees it empty (O_EXCL creates it before the write:
        # a second job reading it then took the torn lease for a dead one and ran too).
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".lease-{os.getpid()}-{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as err:  # s3fs maps 412 PreconditionFailed to EINVAL
        if err.errno == errno.EINVAL or "Precondition" in str(err):
            return False
        raise
    return True


def _holder_died_here(holder: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone (killed) needs no TTL to be known dead."""
    import psutil

    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    pid = int(holder["pid"])
    return pid != os.getpid() and not psutil.pid_exists(pid)


class Lease:
    def __init__(self, fs: Any, root: str, run_id: str, ttl_s: float, wait_s: float,
                 retry: RetryPolicy | None = None):
        self.fs, self.path, self.run_id = fs, join(root, LEASE_FILE), run_id
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.retry = retry or RetryPolicy()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the dead run whose lease this one took over, and how it was known to be dead
        self.took_over: dict[str, Any] | None = None

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": time.time(),
                           "ttl_s": self.ttl_s}).encode()

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(with_retries(lambda: self.fs.cat_file(self.path), self.retry,
                                           what="read the lake lease"))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: treat as expired
            return {"run_id": "?", "renewed_at": 0.0}

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        waited = False
        while True:
            self.fs.invalidate_cache()
            body = self._body()
            if with_retries(lambda b=body: _create_exclusive(self.fs, self.path, b), self.retry,
                            what="create the lake lease"):
                break
            other = self.holder()
            if other is None:
                continue  # released between our attempt and our read
            if other.get("run_id") == self.run_id and other.get("pid") == os.getpid():
                break  # our own create landed; its reply was lost and the retry found it
            age = time.time() - float(other.get("renewed_at", 0.0))
            if _holder_died_here(other):
                how = (f"its process {other.get('pid')} on host {other.get('host')} was gone "
                       f"when run {self.run_id} started there")
                log.warning("lake lease of run %s: %s: taking it over", other.get("run_id"), how)
                self.took_over = {"run_id": other.get("run_id"), "how": how}
                self._remove()
                continue
            if age > float(other.get("ttl_s", self.ttl_s)):
                how = (f"its lease was last renewed {age:.0f} s before run {self.run_id} "
                       f"started (ttl {float(other.get('ttl_s', self.ttl_s)):.0f} s)")
                log.warning("lake lease of run %s: %s: taking it over", other.get("run_id"), how)
                self.took_over = {"run_id": other.get("run_id"), "how": how}
                self._remove()
                continue
            if time.monotonic() >= deadline:
                raise LakeBusy(
                    f"the lake is in use by run {other.get('run_id')} (host "
                    f"{other.get('host')}, pid {other.get('pid')}, lease renewed {age:.0f} s "
                    f"ago): a second job would redo its work. Wait for it to finish, or set "
                    f"sink.lease_wait_s to wait for it (then only what it left is done)")
            if not waited:
                log.info("waiting for run %s to release the lake", other.get("run_id"))
                waited = True
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew, name="lake-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                atomic_write_bytes(self.fs, self.path, self._body())
            except Exception as err:  # noqa: BLE001 - retried at the next tick
                log.warning("could not renew the lake lease: %s", err)

    def _remove(self) -> None:
        def rm() -> None:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

        with_retries(rm, self.retry, what="remove the lake lease")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            other = self.holder()
            if other is not None and other.get("run_id") == self.run_id:
                self._remove()
        except Exception as err:  # noqa: BLE001 - the lease expires by itself after its ttl
            log.error("could not release the lake lease (%s: %s): the next job takes it over "
                      "after sink.lease_ttl_s=%g s", type(err).__name__, err, self.ttl_s)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
