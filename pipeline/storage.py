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
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import fileset
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
    - ``IsADirectoryError(uri)`` if the URI names a directory (an S3 common prefix) that is
      not a DICOM series (a folder of .dcm instances);
    - for a multi-file slide (MRXS, VMS, VSI, DICOM: see pipeline.fileset) the fingerprint of
      its whole file set (:func:`set_fingerprints`: one listing of its data folder more), or
      a ``FileSetError`` naming the members that are missing;
    - the listing's (or HEAD's) exception, for every URI of that parent, if listing failed
      after ``storage.retries`` retries of transient errors (see ``is_transient``);
    - the exception of ``url_to_fs`` for a URI it cannot parse.
    """
    out: dict[str, Fingerprint | BaseException] = {}
    groups: dict[tuple[fsspec.AbstractFileSystem, str], dict[str, list[str]]] = {}
    sets = [u for u in dict.fromkeys(uris) if fileset.format_of(u) is not None]
    for uri in dict.fromkeys(uris):
        if fileset.format_of(uri) is not None:
            continue  # a multi-file slide: its set's fingerprint, below
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
    # Multi-file slides, and folders (a DICOM series: its .dcm instances), get their set's
    # fingerprint; a folder that is no series stays an IsADirectoryError.
    folders = [u for u, r in out.items() if isinstance(r, IsADirectoryError)]
    if sets or folders:
        out.update(set_fingerprints(sets, storage, folders=folders, max_workers=max_workers))
    log.debug("fingerprints: %d uris, %d parents, %d file sets", len(out), len(groups),
              len(sets) + len(folders))
    return out


class _Lister:
    """Listings, HEADs and small reads for resolving file sets, each done once per call
    (several DICOM instances or VMS slides share a folder), with retries, and bypassing
    fsspec's listing cache as :func:`fingerprints` does."""

    def __init__(self, storage: StorageConfig,
                 prefer_listing: frozenset[tuple[int, str]] = frozenset()) -> None:
        self.storage = storage
        self.prefer_listing = prefer_listing  # (id(fs), folder): list it rather than HEAD
        self._memo: dict[tuple[int, str, bool], list[fileset.Entry]] = {}
        self._locks: dict[tuple[int, str, bool], threading.Lock] = {}
        self._lock = threading.Lock()

    def files(self, fs: fsspec.AbstractFileSystem, folder: str, recursive: bool
              ) -> list[fileset.Entry]:
        """The files in ``folder`` (``recursive``: in its whole tree); none if it is absent."""
        key = (id(fs), folder, recursive)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._memo:
                self._memo[key] = self._list(fs, folder, recursive)
            return self._memo[key]

    def _list(self, fs: fsspec.AbstractFileSystem, folder: str, recursive: bool
              ) -> list[fileset.Entry]:
        def ls() -> list[dict[str, Any]]:
            fs.invalidate_cache(folder)
            try:
                if recursive:
                    return list(fs.find(folder, detail=True).values())
                return fs.ls(folder, detail=True)
            finally:
                fs.invalidate_cache(folder)

        try:
            infos = with_retries(ls, self.storage, what=f"list {folder}")
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            if info.get("type") == "directory":
                continue
            name = fs._strip_protocol(info["name"]).rstrip("/")
            if info.get("islink"):
                info = with_retries(lambda n=name: fs.info(n), self.storage,
                                    what=f"stat {name}")
            out.append(_entry(info, name))
        return out

    def main(self, fs: fsspec.AbstractFileSystem, path: str, need: fileset.Need
             ) -> list[fileset.Entry]:
        """The main file's entry: from its folder's listing when that is listed anyway (or
        preferred: many set slides in one folder), else one HEAD."""
        parent_path = fileset._parent(path)
        if need.main_listed or (id(fs), parent_path) in self.prefer_listing:
            return [e for e in self.files(fs, parent_path, False) if e.path == path]

        def stat() -> dict[str, Any]:
            fs.invalidate_cache(path)
            return fs.info(path)

        info = with_retries(stat, self.storage, what=f"stat {path}")
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        return [_entry(info, path)]

    def text(self, fs: fsspec.AbstractFileSystem, path: str) -> str:
        def cat() -> bytes:
            with fs.open(path, "rb") as fh:
                return fh.read(fileset.INDEX_TEXT_MAX)

        return with_retries(cat, self.storage, what=f"read {path}").decode("utf-8", "replace")


def _entry(info: dict[str, Any], path: str) -> fileset.Entry:
    fp = fingerprint_from_info(info, path)
    return fileset.Entry(path, fp.size, fp.version)


def file_set(fs: fsspec.AbstractFileSystem, path: str, storage: StorageConfig, *,
             folder: bool = False, lister: _Lister | None = None,
             read_index: bool = False) -> fileset.FileSet:
    """The :class:`pipeline.fileset.FileSet` of a multi-file slide (``folder``: a DICOM
    series folder), from listings: one LIST of its data folder (MRXS, VSI) or of the folder
    it sits in (DICOM, VMS: shared by the slides of that folder), plus a HEAD of the main
    file (MRXS, VSI) and a read of the .vms index (VMS). ``read_index``: also read an MRXS
    Slidedat.ini, to name the data files it lists that are missing (staging does).

    Raises ``FileNotFoundError`` (no main file), ``FileSetError`` (members missing)."""
    lister = lister or _Lister(storage)
    path = path.rstrip("/")
    need = fileset.neighbourhood(path, folder=folder)
    entries = [] if folder else lister.main(fs, path, need)
    if not folder and not entries:
        raise FileNotFoundError(path)
    for sub, recursive in need.folders:
        entries += [e for e in lister.files(fs, sub, recursive) if e.path != path]
    texts = {t: lister.text(fs, t) for t in need.texts}
    if read_index and fileset.format_of(path) == "mrxs":
        ini = f"{fileset.mrxs_folder(path)}/Slidedat.ini"
        if any(e.path == ini for e in entries):
            texts[ini] = lister.text(fs, ini)
    return fileset.resolve(path, entries, texts, folder=folder)


def set_fingerprint(fset: fileset.FileSet) -> Fingerprint:
    """A set's fingerprint: its total size and one version over all members."""
    return Fingerprint(fset.size, fset.version)


def set_fingerprints(uris: Sequence[str], storage: StorageConfig, *, folders: Sequence[str] = (),
                     max_workers: int = 16) -> dict[str, Fingerprint | BaseException]:
    """Fingerprints of multi-file slides (``uris``: main files; ``folders``: DICOM series
    folders) from listings, in parallel; one entry per URI, never raising for one URI's
    problem (``FileNotFoundError(uri)``, ``FileSetError`` naming what is missing, or the
    storage error). A folder holding no .dcm files is an ``IsADirectoryError``."""
    out: dict[str, Fingerprint | BaseException] = {}
    jobs: list[tuple[str, fsspec.AbstractFileSystem, str, bool]] = []
    per_parent: dict[tuple[int, str], int] = {}
    for uri, is_folder in [*((u, False) for u in uris), *((u, True) for u in folders)]:
        try:
            fs, path = url_to_fs(uri, storage)
        except Exception as err:  # noqa: BLE001 - reported as this URI's result
            out[uri] = err
            continue
        jobs.append((uri, fs, path, is_folder))
        key = (id(fs), fileset._parent(path.rstrip("/")))
        per_parent[key] = per_parent.get(key, 0) + 1
    lister = _Lister(storage, frozenset(k for k, n in per_parent.items() if n > HEAD_AT_MOST))

    def one(uri: str, fs: fsspec.AbstractFileSystem, path: str, is_folder: bool
            ) -> Fingerprint | BaseException:
        try:
            return set_fingerprint(file_set(fs, path, storage, folder=is_folder, lister=lister))
        except FileNotFoundError:
            return FileNotFoundError(uri)
        except fileset.FileSetError as err:
            if is_folder:  # as before file sets: the uri names a folder (plan.py words it)
                return IsADirectoryError(uri)
            return err
        except Exception as err:  # noqa: BLE001 - reported as this URI's result
            return err

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures = {uri: pool.submit(one, uri, fs, path, f) for uri, fs, path, f in jobs}
        out.update({uri: f.result() for uri, f in futures.items()})
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
    """The slide's fingerprint now: its file's, or its file set's (multi-file formats)."""
    fs, path = url_to_fs(uri, storage)
    try:
        if fileset.format_of(path) is not None:
            return set_fingerprint(file_set(fs, path, storage))
        try:
            return with_retries(lambda: fingerprint(fs, path), storage, what=f"stat {uri}")
        except IsADirectoryError:
            return set_fingerprint(file_set(fs, path, storage, folder=True))
    except FileNotFoundError:
        raise StagingError(f"slide not found: {uri} (removed during the run?)") from None
    except fileset.FileSetError as err:
        raise StagingError(str(err)) from None


@contextlib.contextmanager
def staged_slide(uri: str, storage: StorageConfig, expected: str | None = None
                 ) -> Iterator[str]:
    """Local path of a slide for the duration of the block; remote files are copied and removed.

    ``expected``: the fingerprint planned; the bytes handed over are checked to be those (a
    local file when opened, a remote one before and after its download).

    A multi-file slide (pipeline.fileset: MRXS, VMS, VSI, a DICOM series folder or one .dcm
    of it) is staged as a unit: local sets are used in place, remote ones are downloaded into
    one scratch folder keeping their layout (the budget reserves the whole set), and the path
    given is the file OpenSlide opens."""
    if fileset.format_of(uri) is not None or (is_local(uri) and os.path.isdir(
            uri.split("://", 1)[-1])):
        with _staged_set(uri, storage, expected) as local:
            yield local
        return
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
    if info.get("type") == "directory":  # a DICOM series folder (prefix)
        with _staged_set(uri, storage, expected) as local:
            yield local
        return
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


@contextlib.contextmanager
def _staged_set(uri: str, storage: StorageConfig, expected: str | None) -> Iterator[str]:
    """:func:`staged_slide` of a multi-file slide: the path of its opener, in place (local)
    or in one scratch folder holding every member at its relative path (remote)."""
    fs, rpath = url_to_fs(uri, storage)
    rpath = rpath.rstrip("/")
    local_uri = is_local(uri)
    folder = fileset.format_of(rpath) is None

    def resolve(read_index: bool) -> fileset.FileSet:
        try:
            return file_set(fs, rpath, storage, folder=folder, read_index=read_index)
        except FileNotFoundError:
            where = "" if local_uri else " in object storage"
            raise StagingError(f"slide not found{where}: {uri}") from None
        except PermissionError as err:
            raise StagingError(f"access denied reading {uri}: check credentials "
                               f"({err})") from None
        except fileset.FileSetError as err:
            raise StagingError(str(err)) from None

    fset = resolve(read_index=True)
    when = "before tiling" if local_uri else "before download"
    check_unchanged(uri, expected, set_fingerprint(fset), when)
    if local_uri:
        yield os.path.join(fset.root, fset.opener)
        return
    scratch = storage.scratch_dir or default_scratch_dir()
    budget = ScratchBudget(scratch, int(storage.scratch_limit_gb * 2**30))
    with budget.reserve(fset.size):
        local = os.path.join(scratch, f"{uuid.uuid4().hex}.set")
        try:
            def fetch(rel: str, entry: fileset.Entry) -> None:
                target = os.path.join(local, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)

                def get() -> None:
                    fs.get_file(entry.path, target)
                    got = os.path.getsize(target)
                    if got != entry.size:
                        raise ConnectionError(f"short read of {rel}: {got} of {entry.size} "
                                              "bytes")

                with_retries(get, storage, what=f"download {uri} ({rel})")

            os.makedirs(local)
            try:
                with ThreadPoolExecutor(min(4, len(fset.members))) as pool:
                    for f in [pool.submit(fetch, rel, e) for rel, e in fset.members]:
                        f.result()
            except Exception as err:  # noqa: BLE001 - reported as a slide error
                raise StagingError(
                    f"could not download {uri}: {type(err).__name__}: {err}") from err
            after = resolve(read_index=False)
            check_unchanged(uri, str(set_fingerprint(fset)), set_fingerprint(after),
                            "during download")
            yield os.path.join(local, *fset.opener.split("/"))
        finally:
            shutil.rmtree(local, ignore_errors=True)
