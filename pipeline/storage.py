"""fsspec helpers: one place that knows URLs, fingerprints, atomic writes and slide staging.

OpenSlide needs a local file, so slides in object storage are staged to local scratch with
retries on transient errors and a per-node bound on scratch bytes; staged files are removed as
soon as the slide is tiled.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs: one try per call; with_retries owns retries (see fsspec_options)
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
    return fingerprint_from_info(fs.info(path), path)


def fingerprint_from_info(info: dict[str, Any], path: str) -> Fingerprint:
    """The Fingerprint of one ``fs.info`` dict or one ``fs.ls(..., detail=True)`` entry.

    The only place that turns storage metadata into a Fingerprint: ``fingerprint()`` (HEAD /
    stat) and ``fingerprints()`` (listings) both go through here, so they cannot disagree.
    S3 listings and HEADs carry the same quoted ETag; the quotes are stripped.
    """
    if info.get("type") == "directory":
        raise IsADirectoryError(path)
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return Fingerprint(int(info["size"]), f"{key.lower()}={str(info[key]).strip(chr(34))}")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
        if not info.get("mtime") and info.get("LastModified"):
            # S3 without ETag: a HEAD's Last-Modified has whole seconds, a listing's has
            # milliseconds. Whole seconds for both (a no-op on HEAD results).
            mtime = float(math.floor(mtime))
    return Fingerprint(int(info["size"]), f"mtime={float(mtime or 0):.6f}")


HEAD_AT_MOST = 2  # a parent with at most this many wanted files is HEADed, not listed


def fingerprints(uris: Sequence[str], storage: StorageConfig, *, max_workers: int = 16
                 ) -> dict[str, Fingerprint | BaseException]:
    """Fingerprints of many slide URIs from directory listings: one LIST per ~1,000 objects
    under each parent prefix, prefixes listed in parallel, instead of one HEAD per slide.

    URIs are grouped by filesystem (protocol and options) and parent directory. Each parent
    holding more than ``HEAD_AT_MOST`` (2) of the wanted URIs is listed once with
    ``fs.ls(parent, detail=True)`` (S3: paginated ListObjectsV2, 1 request per 1,000 keys,
    whatever else the prefix holds); a parent with at most 2 of them gets one ``fs.info``
    (HEAD / stat) per URI instead, so 2 slides in a prefix of 200k other objects cost 2
    requests, not 200. Listings and HEADs run in a ThreadPoolExecutor(max_workers). Listings
    bypass and do not leave behind fsspec's listing cache (s3fs caches listings with no
    expiry, and a cached parent listing also answers later ``fs.info`` calls), so a rewrite is
    always seen. Local symlinks are stat'ed through (as ``fs.info`` does).

    Returns one entry per distinct input URI, never raises for a single URI's problem:
    - the same ``Fingerprint`` as ``fingerprint(*url_to_fs(uri, storage))``;
    - ``FileNotFoundError(uri)`` if the URI is not in its parent's listing (or the parent does
      not exist);
    - ``IsADirectoryError(uri)`` if the URI names a directory (an S3 common prefix);
    - the listing's (or HEAD's) exception, for every URI of that parent, if listing failed
      after ``storage.retries`` retries of transient errors (see ``is_transient``);
    - the exception of ``url_to_fs`` for a URI it cannot parse.
    """
    out: dict[str, Fingerprint | BaseException] = {}
    groups: dict[tuple[fsspec.AbstractFileSystem, str], dict[str, list[str]]] = {}
    for uri in dict.fromkeys(uris):
        try:
            fs, path = url_to_fs(uri, storage)
        except Exception as err:  # noqa: BLE001 - reported as this URI's result
            out[uri] = err
            continue
        groups.setdefault((fs, fs._parent(path)), {}).setdefault(path, []).append(uri)

    def head(fs: fsspec.AbstractFileSystem, path: str, owners: list[str]
             ) -> dict[str, Fingerprint | BaseException]:
        def stat() -> Fingerprint:
            fs.invalidate_cache(path)  # a cached parent listing would answer fs.info
            return fingerprint(fs, path)

        try:
            fp: Fingerprint | BaseException = with_retries(
                stat, storage, what=f"stat {owners[0]}")
        except FileNotFoundError:
            return {u: FileNotFoundError(u) for u in owners}
        except IsADirectoryError:
            return {u: IsADirectoryError(u) for u in owners}
        except Exception as err:  # noqa: BLE001 - reported as this URI's result
            fp = err
        return dict.fromkeys(owners, fp)

    def listed(fs: fsspec.AbstractFileSystem, parent_path: str, wanted: dict[str, list[str]]
               ) -> dict[str, Fingerprint | BaseException]:
        def ls() -> list[dict[str, Any]]:
            fs.invalidate_cache(parent_path)
            try:
                return fs.ls(parent_path, detail=True)
            finally:
                fs.invalidate_cache(parent_path)

        try:
            entries = with_retries(ls, storage, what=f"list {parent_path}")
        except FileNotFoundError:
            entries = []
        except Exception as err:  # noqa: BLE001 - every URI of this parent gets it
            return {u: err for owners in wanted.values() for u in owners}
        by_name: dict[str, dict[str, Any]] = {}
        for e in entries:
            name = fs._strip_protocol(e["name"]).rstrip("/")
            # S3 may hold both an object "a/x" and a prefix "a/x/": fs.info gives the object.
            if name in wanted and (name not in by_name or e.get("type") != "directory"):
                by_name[name] = e
        res: dict[str, Fingerprint | BaseException] = {}
        for path, owners in wanted.items():
            entry = by_name.get(path)
            if entry is None:
                res.update({u: FileNotFoundError(u) for u in owners})
            elif entry.get("islink"):
                res.update(head(fs, path, owners))  # the listing stat'ed the link, not its target
            elif entry.get("type") == "directory":
                res.update({u: IsADirectoryError(u) for u in owners})
            else:
                try:
                    fp: Fingerprint | BaseException = fingerprint_from_info(entry, path)
                except Exception as err:  # noqa: BLE001 - a malformed entry: this URI's error
                    fp = err
                res.update(dict.fromkeys(owners, fp))
        return res

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures = []
        for (fs, parent_path), wanted in groups.items():
            if len(wanted) <= HEAD_AT_MOST:
                futures += [pool.submit(head, fs, p, owners) for p, owners in wanted.items()]
            else:
                futures.append(pool.submit(listed, fs, parent_path, wanted))
        for f in futures:
            out.update(f.result())
    log.debug("fingerprints: %d uris, %d parents", len(out), len(groups))
    return out


class StorageUnavailable(ConnectionError):
    """A storage call kept failing transiently for its whole retry budget."""


TRANSIENT = (ConnectionError, TimeoutError)
# What throttling, 5xx answers, resets and truncated bodies look like through s3fs/aiobotocore,
# botocore and delta-rs (object_store): error class names and message fragments.
_TRANSIENT_NAMES = ("Timeout", "Connection", "Throttl", "Disconnected", "Payload",
                    "ClientOSError", "IncompleteRead", "ProtocolError", "ResponseStreaming")
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "Service Unavailable", "Bad Gateway", "503", "500 ",
                   "502", "504", "Connection reset", "connection closed", "error sending request",
                   "timed out", "Broken pipe", "IncompleteRead", "Errno 104", "Errno 32",
                   "end of file before message length reached", "unexpected EOF",
                   "error decoding response body", "response body", "body error", "Payload")


def is_transient(err: BaseException) -> bool:
    """Errors worth retrying: network hiccups and throttling, never 'not found' or 'denied'."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError,
                        StorageUnavailable)):
        return False  # StorageUnavailable: an inner call already spent its budget
    if isinstance(err, TRANSIENT):
        return True
    name = type(err).__name__
    text = str(err)
    return any(s in name for s in _TRANSIENT_NAMES) or any(s in text for s in _TRANSIENT_TEXT)


@dataclass(frozen=True)
class RetryPolicy:
    """How long one storage call may keep trying (``storage.retries`` / ``retry_budget_s``)."""

    retries: int = 40
    budget_s: float = 300.0
    max_backoff_s: float = 15.0
    base_s: float = 0.5

    @classmethod
    def of(cls, storage: StorageConfig) -> RetryPolicy:
        return cls(storage.retries, storage.retry_budget_s, storage.retry_max_backoff_s)


def with_retries(fn: Callable[[], T], policy: StorageConfig | RetryPolicy, *, what: str) -> T:
    """``fn()``, retried on transient errors with exponential backoff and full jitter, until
    it succeeds, fails for good (not found, denied: raised as is) or spends the budget
    (``StorageUnavailable``, naming what was tried and for how long)."""
    import tenacity

    p = policy if isinstance(policy, RetryPolicy) else RetryPolicy.of(policy)
    started = time.monotonic()

    def note(state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(err).__name__,
                    str(err)[:300], state.attempt_number,
                    state.next_action.sleep if state.next_action else 0.0)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(p.retries + 1) | tenacity.stop_before_delay(p.budget_s),
        wait=tenacity.wait_random_exponential(multiplier=p.base_s, max=p.max_backoff_s),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=note, reraise=True)
    attempts = 0

    def counted() -> T:
        nonlocal attempts
        attempts += 1
        return fn()

    try:
        return retrying(counted)
    except Exception as err:
        if not is_transient(err):
            raise
        raise StorageUnavailable(
            f"{what}: storage kept failing for {time.monotonic() - started:.1f} s over "
            f"{attempts} attempts ({type(err).__name__}: {str(err)[:300]}); storage."
            f"retry_budget_s={p.budget_s:g} and storage.retries={p.retries} bound this") from err


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
                f"slide is {nbytes / 2**30:.2f} GiB, larger than the scratch limit "
                f"({self.limit / 2**30:.2f} GiB): raise storage.scratch_limit_gb")
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


class SlideChanged(StagingError):
    """The slide's bytes are not the ones planned: rewritten after the plan or while read."""

    def __init__(self, uri: str, planned: str, found: str, when: str):
        super().__init__(f"{uri} changed during the run ({when}): planned {planned}, found "
                         f"{found}; nothing of it was committed, re-run to embed the new version")


def check_unchanged(uri: str, expected: str | None, found: Fingerprint, when: str) -> None:
    if expected is not None and str(found) != expected:
        raise SlideChanged(uri, expected, str(found), when)


def source_fingerprint(uri: str, storage: StorageConfig) -> Fingerprint:
    fs, path = url_to_fs(uri, storage)
    try:
        return with_retries(lambda: fingerprint(fs, path), storage, what=f"stat {uri}")
    except FileNotFoundError:
        raise StagingError(f"slide not found: {uri} (removed during the run?)") from None


@contextlib.contextmanager
def staged_slide(uri: str, storage: StorageConfig, expected: str | None = None
                 ) -> Iterator[str]:
    """Local path of a slide for the duration of the block; remote files are copied and removed.

    ``expected``: the fingerprint planned; the bytes handed over are checked to be those (a
    local file when opened, a remote one before and after its download)."""
    if is_local(uri):
        path = uri.split("://", 1)[-1]
        if not os.path.isfile(path):
            raise StagingError(f"slide file not found: {path}")
        check_unchanged(uri, expected, source_fingerprint(uri, storage), "before tiling")
        yield path
        return
    fs, rpath = url_to_fs(uri, storage)
    try:
        info = with_retries(lambda: fs.info(rpath), storage, what=f"stat {uri}")
    except FileNotFoundError:
        raise StagingError(f"slide not found in object storage: {uri}") from None
    except PermissionError as err:
        raise StagingError(f"access denied reading {uri}: check credentials ({err})") from None
    check_unchanged(uri, expected, fingerprint_from_info(info, rpath), "before download")
    size = int(info["size"])
    scratch = storage.scratch_dir or default_scratch_dir()
    budget = ScratchBudget(scratch, int(storage.scratch_limit_gb * 2**30))
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
                with_retries(fetch, storage, what=f"download {uri}")
            except Exception as err:  # noqa: BLE001 - reported as a slide error
                raise StagingError(
                    f"could not download {uri}: {type(err).__name__}: {err}") from err
            fs.invalidate_cache(rpath)
            check_unchanged(uri, expected, source_fingerprint(uri, storage), "during download")
            yield local
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)
