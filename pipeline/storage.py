"""fsspec helpers: one place that knows URLs, fingerprints, atomic writes and slide staging.

OpenSlide needs a local file, so slides in object storage are staged to local scratch with
retries on transient errors and a per-node bound on scratch bytes; staged files are removed as
soon as the slide is tiled.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class StagingError(RuntimeError):
    """A slide could not be brought to local scratch; the message says why."""


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in {"file", "local"}


def url_to_fs(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem + path for a URL, with the job's object-storage options applied."""
    proto = protocol_of(url)
    fs, path = fsspec.core.url_to_fs(url, **storage.fsspec_options(proto))
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def resolve_relative(uri: str, base_url: str) -> str:
    """A manifest's relative uris are relative to the manifest itself."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    base = parent(base_url)
    if is_local(base):
        base = base.split("://", 1)[-1]
        return os.path.normpath(os.path.join(base, uri))
    return join(base, uri)


@dataclass(frozen=True)
class Fingerprint:
    size: int
    version: str  # ETag, generation or mtime: whatever the store offers that changes on rewrite

    def __str__(self) -> str:
        return f"size={self.size};{self.version}"


def fingerprint(fs: fsspec.AbstractFileSystem, path: str) -> Fingerprint:
    """Size + ETag/mtime of a file: changes when the file is rewritten, cheap to get."""
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(path)
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return Fingerprint(int(info["size"]), f"{key.lower()}={str(info[key]).strip(chr(34))}")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return Fingerprint(int(info["size"]), f"mtime={float(mtime or 0):.6f}")


TRANSIENT = (ConnectionError, TimeoutError)


def is_transient(err: BaseException) -> bool:
    """Errors worth retrying: network hiccups and throttling, never 'not found' or 'denied'."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(err, TRANSIENT):
        return True
    name = type(err).__name__
    text = str(err)
    if any(s in name for s in ("Timeout", "Connection", "Throttl")):
        return True
    return any(s in text for s in ("SlowDown", "RequestTimeout", "InternalError",
                                   "ServiceUnavailable", "503", "500 "))


def with_retries(fn: Callable[[], T], *, retries: int, what: str, base_delay: float = 0.5) -> T:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if attempt >= retries or not is_transient(err):
                raise
            delay = base_delay * (2**attempt) * (1 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs",
                        what, type(err).__name__, err, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the whole file or nothing.

    Local: write a hidden temp file in the same directory and rename it over the target.
    Object stores: a single PUT is atomic and last-writer-wins, which is what we need.
    """
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        # Leading '.' and no '.parquet' suffix: pyarrow and DuckDB globs never pick it up.
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}.partial")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def default_scratch_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "wsi-pipeline-scratch")


class ScratchBudget:
    """Per-node bound on staged bytes, shared by all worker processes through the filesystem.

    Each staging reserves its size in a small file named with the owner's pid; reservations
    of dead processes are ignored, so a killed worker never leaks budget.
    """

    def __init__(self, directory: str, limit_bytes: int):
        self.dir = Path(directory)
        self.limit = limit_bytes
        self.dir.mkdir(parents=True, exist_ok=True)

    def _reserved(self) -> int:
        total = 0
        for f in self.dir.glob(".reserve-*"):
            try:
                pid = int(f.name.split("-")[1])
                os.kill(pid, 0)
            except (ValueError, IndexError, ProcessLookupError):
                f.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass
            with contextlib.suppress(OSError, ValueError):
                total += int(f.read_text() or 0)
        return total

    @contextlib.contextmanager
    def reserve(self, nbytes: int, timeout_s: float = 3600.0) -> Iterator[None]:
        if nbytes > self.limit:
            raise StagingError(
                f"slide is {nbytes / 1e9:.2f} GB, larger than the scratch limit "
                f"({self.limit / 1e9:.2f} GB): raise storage.scratch_limit_gb")
        token = self.dir / f".reserve-{os.getpid()}-{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout_s
        while True:
            with open(self.dir / ".lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self._reserved() + nbytes <= self.limit:
                    token.write_text(str(nbytes))
                    break
            if time.monotonic() > deadline:
                raise StagingError(f"waited {timeout_s:.0f}s for {nbytes} bytes of scratch")
            time.sleep(0.5)
        try:
            yield
        finally:
            token.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_slide(uri: str, storage: StorageConfig) -> Iterator[str]:
    """Local path of a slide for the duration of the block; remote files are copied and removed."""
    if is_local(uri):
        path = uri.split("://", 1)[-1]
        if not os.path.isfile(path):
            raise StagingError(f"slide file not found: {path}")
        yield path
        return
    fs, rpath = url_to_fs(uri, storage)
    try:
        size = with_retries(lambda: int(fs.info(rpath)["size"]), retries=storage.retries,
                            what=f"stat {uri}")
    except FileNotFoundError:
        raise StagingError(f"slide not found in object storage: {uri}") from None
    except PermissionError as err:
        raise StagingError(f"access denied reading {uri}: check credentials ({err})") from None
    scratch = storage.scratch_dir or default_scratch_dir()
    budget = ScratchBudget(scratch, int(storage.scratch_limit_gb * 1e9))
    with budget.reserve(size):
        suffix = "".join(Path(rpath).suffixes[-2:]) or ".slide"
        local = os.path.join(scratch, f"{uuid.uuid4().hex}{suffix}")
        try:
            def fetch() -> None:
                fs.get_file(rpath, local)
                got = os.path.getsize(local)
                if got != size:
                    raise ConnectionError(f"short read: {got} of {size} bytes")

            try:
                with_retries(fetch, retries=storage.retries, what=f"download {uri}")
            except Exception as err:  # noqa: BLE001 - reported as a slide error
                raise StagingError(
                    f"could not download {uri}: {type(err).__name__}: {err}") from err
            yield local
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)


def describe_fs(url: str) -> dict[str, Any]:
    return {"url": url, "protocol": protocol_of(url)}
