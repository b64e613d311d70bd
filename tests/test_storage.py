"""Staging slides from object storage: retries, scratch bound, cleanup."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import boto3
import pytest

from pipeline.config import StorageConfig
from pipeline.storage import (
    RetryPolicy,
    ScratchBudget,
    SlideChanged,
    StagingError,
    StorageUnavailable,
    atomic_write_bytes,
    fingerprint,
    is_transient,
    resolve_relative,
    staged_slide,
    url_to_fs,
    with_retries,
)

DATA = Path(__file__).parent / "data"


def test_stage_from_s3_and_clean_up(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    src = DATA / "CMU-1-Small-Region.svs"
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(src), s3_bucket, "a/s.svs")
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"))
    with staged_slide(f"s3://{s3_bucket}/a/s.svs", storage) as local:
        assert Path(local).read_bytes() == src.read_bytes()
        assert local.startswith(str(tmp_path / "scratch"))
    assert not Path(local).exists()
    assert not list((tmp_path / "scratch").glob(".reserve-*"))


def test_missing_object_is_a_clear_error(s3_endpoint: str, s3_bucket: str) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    with pytest.raises(StagingError, match="not found in object storage"):
        with staged_slide(f"s3://{s3_bucket}/nope.svs", storage):
            pass
    with pytest.raises(StagingError, match="slide file not found"):
        with staged_slide("/no/such/file.svs", storage):
            pass


def test_fingerprint_changes_when_file_is_rewritten(s3_endpoint: str, s3_bucket: str) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    fs, path = url_to_fs(f"s3://{s3_bucket}/f.bin", storage)
    fs.pipe_file(path, b"one")
    a = fingerprint(fs, path)
    fs.pipe_file(path, b"two")
    b = fingerprint(fs, path)
    assert a.size == b.size == 3 and a != b and "etag" in a.version


def test_a_folder_that_is_no_slide_is_a_clear_staging_error(s3_endpoint: str, s3_bucket: str,
                                                             tmp_path: Path) -> None:
    """A uri naming a folder is a DICOM series only if it holds .dcm files; otherwise staging
    says so (it used to end as an unexpected IsADirectoryError)."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="d/readme.txt", Body=b"x")
    (tmp_path / "d").mkdir()
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"))
    for uri in (f"s3://{s3_bucket}/d", str(tmp_path / "d")):
        with pytest.raises(StagingError, match=r"holds no \.dcm files"):
            with staged_slide(uri, storage):
                pass


def test_retries_transient_but_not_permanent_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    fast = RetryPolicy(retries=4, budget_s=30, base_s=0.01)
    assert with_retries(flaky, fast, what="t") == "ok"
    assert len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("x")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, fast, what="t")
    assert len(calls) == 1


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """This thread's monotonic clock, advanced only by its own sleeps: a retry loop's
    decisions without the real clock (a loaded machine oversleeps), other threads untouched."""
    me, real_sleep, real_monotonic = threading.get_ident(), time.sleep, time.monotonic
    now = [1000.0]

    def sleep(seconds: float) -> None:
        if threading.get_ident() != me:
            return real_sleep(seconds)
        now[0] += seconds

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(time, "monotonic",
                        lambda: now[0] if threading.get_ident() == me else real_monotonic())
    return now


def test_retries_stop_at_the_budget_with_a_clear_error(fake_clock: list[float]) -> None:
    calls = []

    def throttled() -> None:
        calls.append(time.monotonic())
        raise OSError(16, "Please reduce your request rate.")  # s3fs's SlowDown

    with pytest.raises(StorageUnavailable, match=r"put x: storage kept failing for 0\.[23] s .* "
                       r"storage.retry_budget_s=0.3") as info:
        with_retries(throttled, RetryPolicy(retries=1000, budget_s=0.3, base_s=0.01,
                                            max_backoff_s=0.05), what="put x")
    # Retried while a next wait still fitted in the budget, and not after.
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) > 2 and calls[-1] - calls[0] <= 0.3 and max(waits) <= 0.05
    assert calls[-1] - calls[0] >= 0.3 - 0.05, "stopped while a wait still fitted"
    assert "reduce your request rate" in str(info.value)
    # an inner call that spent its budget is not retried again by an outer one
    assert not is_transient(info.value)


class WatchedBudget(ScratchBudget):
    """Sets ``refused`` once a reservation has looked and found the budget full."""

    def __init__(self, directory: str, limit_bytes: int) -> None:
        super().__init__(directory, limit_bytes)
        self.refused = threading.Event()

    def _reserved(self) -> int:
        total = super()._reserved()
        if threading.current_thread() is not threading.main_thread() and total + 50 > self.limit:
            self.refused.set()
        return total


def test_scratch_budget_blocks_until_space_frees(tmp_path: Path) -> None:
    budget = WatchedBudget(str(tmp_path), limit_bytes=100)
    order = []
    with budget.reserve(70):
        def second() -> None:
            with budget.reserve(50):
                order.append("second")

        t = threading.Thread(target=second)
        t.start()
        assert budget.refused.wait(30), "the second reservation never looked"
        order.append("first-done")  # it looked, found 70 of 100 taken, and waits
    t.join(30)
    assert order == ["first-done", "second"]
    with pytest.raises(StagingError, match="larger than the scratch limit"):
        with budget.reserve(101):
            pass


def test_scratch_reservation_of_dead_process_is_ignored(tmp_path: Path) -> None:
    (tmp_path / ".reserve-999999999-x").write_text("100")
    budget = ScratchBudget(str(tmp_path), limit_bytes=100)
    with budget.reserve(100):
        pass


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    fs, path = url_to_fs(str(tmp_path / "d" / "x.parquet"), StorageConfig())
    atomic_write_bytes(fs, path, b"abc")
    assert Path(path).read_bytes() == b"abc"
    assert os.listdir(tmp_path / "d") == ["x.parquet"]


def test_relative_uris() -> None:
    assert resolve_relative("a/b.svs", "/data/m.csv") == "/data/a/b.svs"
    assert resolve_relative("b.svs", "s3://bkt/p/m.csv") == "s3://bkt/p/b.svs"
    assert resolve_relative("s3://x/y.svs", "/data/m.csv") == "s3://x/y.svs"


def test_an_object_overwritten_after_planning_is_not_staged(
        s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="a/s.svs", Body=b"first version")
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"))
    uri = f"s3://{s3_bucket}/a/s.svs"
    planned = str(fingerprint(*url_to_fs(uri, storage)))
    with staged_slide(uri, storage, planned) as local:
        assert Path(local).read_bytes() == b"first version"
    s3.put_object(Bucket=s3_bucket, Key="a/s.svs", Body=b"other version")  # same size
    with pytest.raises(SlideChanged, match=r"changed during the run \(before download\): "
                       r"planned size=13;etag=.*, found size=13;etag="), \
            staged_slide(uri, storage, planned):
        pass
    assert not [f for f in os.listdir(tmp_path / "scratch") if not f.startswith(".")]
