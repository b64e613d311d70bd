"""Planning by listing: fingerprints() from directory listings agrees with per-file fingerprint()
and costs one LIST per 1,000 objects instead of one HEAD per slide (real moto S3 server)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from lake_fixtures import dead_endpoint

from pipeline.config import StorageConfig
from pipeline.storage import (
    Fingerprint,
    StorageUnavailable,
    fingerprint,
    fingerprints,
    is_transient,
    url_to_fs,
)


def per_file(uri: str, storage: StorageConfig) -> Fingerprint | BaseException:
    """The old path: one fs.info (HEAD / stat) per slide."""
    try:
        return fingerprint(*url_to_fs(uri, storage))
    except Exception as err:  # noqa: BLE001 - compared by type
        return err


def assert_agree(uris: list[str], storage: StorageConfig) -> dict:
    got = fingerprints(uris, storage, max_workers=4)
    assert set(got) == set(uris)
    for uri in uris:
        old, new = per_file(uri, storage), got[uri]
        if isinstance(old, BaseException):
            assert type(new) is type(old), (uri, new, old)
            assert str(new) == uri
        else:
            assert new == old, uri
    return got


@contextmanager
def counting_requests(fs) -> Iterator[list[tuple[str, str, str]]]:
    """Every HTTP request the s3fs client sends (botocore fires before-send once per attempt,
    retries included): (operation, method, url)."""
    sent: list[tuple[str, str, str]] = []

    def on_send(request, event_name: str, **_) -> None:
        sent.append((event_name.rsplit(".", 1)[-1], request.method, request.url))

    events = fs.s3.meta.events
    events.register("before-send.s3", on_send)
    try:
        yield sent
    finally:
        events.unregister("before-send.s3", on_send)


def test_local_listing_agrees_with_stat(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    (d1 / "sub").mkdir(parents=True)
    d2.mkdir()
    for name, data in [("a.svs", b"a"), ("b b.svs", b"bb"), ("c.tiff", b"ccc")]:
        (d1 / name).write_bytes(data)
    (d2 / "only.svs").write_bytes(b"only")
    os.utime(d1 / "a.svs", (1_700_000_000.123456, 1_700_000_000.123456))
    os.symlink(d2 / "only.svs", d1 / "link.svs")  # listing stats the link; info its target
    os.utime(d1 / "link.svs", (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    uris = [str(d1 / "a.svs"), f"file://{d1 / 'b b.svs'}", str(d1 / "c.tiff"),
            str(d1 / "link.svs"), str(d1 / "sub"), str(d1 / "missing.svs"),
            str(d2 / "only.svs"), str(d2 / "missing.svs"), str(tmp_path / "nodir" / "x.svs")]
    got = assert_agree(uris, StorageConfig())
    assert got[str(d1 / "a.svs")] == Fingerprint(1, "mtime=1700000000.123456")
    assert got[str(d1 / "link.svs")] == got[str(d2 / "only.svs")]
    assert isinstance(got[str(d1 / "missing.svs")], FileNotFoundError)
    assert isinstance(got[str(d1 / "sub")], IsADirectoryError)
    assert isinstance(got[str(tmp_path / "nodir" / "x.svs")], FileNotFoundError)
    assert fingerprints([], StorageConfig()) == {}


def test_s3_listing_agrees_with_head(s3_endpoint: str, s3_bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {"p1/a.svs": b"a", "p1/b b.svs": b"bb", "p1/c.svs": b"ccc", "p1/sub/x.svs": b"x",
            "p2/only.svs": b"only", "root.svs": b"r1", "root2.svs": b"r2", "root3.svs": b"r3"}
    for key, data in keys.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
    storage = StorageConfig(endpoint_url=s3_endpoint, retries=0)
    u = f"s3://{s3_bucket}/"
    uris = [u + k for k in ("p1/a.svs", "p1/b b.svs", "p1/c.svs", "p1/sub", "p1/missing.svs",
                            "p2/only.svs", "p2/missing.svs", "root.svs", "root2.svs",
                            "root3.svs", "p3/x.svs", "p3/y.svs", "p3/z.svs")]
    got = assert_agree(uris, storage)
    head = s3.head_object(Bucket=s3_bucket, Key="p1/b b.svs")
    assert head["ETag"].startswith('"')  # S3 quotes ETags; fingerprints carry them unquoted
    assert got[u + "p1/b b.svs"] == Fingerprint(2, "etag=" + head["ETag"].strip('"'))
    assert isinstance(got[u + "p1/sub"], IsADirectoryError)
    for k in ("p1/missing.svs", "p2/missing.svs", "p3/x.svs", "p3/z.svs"):
        assert isinstance(got[u + k], FileNotFoundError)
    nobucket = fingerprints(["s3://no-such-bucket-x/a/" + n for n in "abc"], storage)
    assert all(isinstance(v, FileNotFoundError) for v in nobucket.values())


def test_s3_listing_cache_never_hides_a_rewrite(s3_endpoint: str, s3_bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    uris = [f"s3://{s3_bucket}/p/{i}.svs" for i in range(3)]
    for i in range(3):
        s3.put_object(Bucket=s3_bucket, Key=f"p/{i}.svs", Body=b"old")
    fs, _ = url_to_fs(uris[0], storage)
    before = fingerprints(uris, storage)
    assert f"{s3_bucket}/p" not in fs.dircache  # nothing left behind for fs.info to trust
    fs.ls(f"{s3_bucket}/p", detail=True)  # someone else's listing, now cached by s3fs
    s3.put_object(Bucket=s3_bucket, Key="p/0.svs", Body=b"new")  # rewritten behind its back
    s3.put_object(Bucket=s3_bucket, Key="p/3.svs", Body=b"added")
    after = fingerprints([*uris, f"s3://{s3_bucket}/p/3.svs"], storage)
    assert after[uris[0]] != before[uris[0]] and after[uris[1]] == before[uris[1]]
    assert isinstance(after[f"s3://{s3_bucket}/p/3.svs"], Fingerprint)
    fs.ls(f"{s3_bucket}/p", detail=True)
    s3.put_object(Bucket=s3_bucket, Key="p/1.svs", Body=b"new")
    few = fingerprints(uris[1:2], storage)  # the HEAD path bypasses the cache too
    assert few[uris[1]] != before[uris[1]]


def test_listing_costs_one_request_per_thousand_objects(s3_endpoint: str,
                                                        s3_bucket: str) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    sizes = {"a": 1200, "b": 250, "c": 50}  # 1,500 objects; "a" needs two listing pages
    fs, _ = url_to_fs(f"s3://{s3_bucket}/a/0.svs", storage)
    fs.pipe({f"{s3_bucket}/{p}/{i:05d}.svs": b"x" * (i % 7 + 1)
             for p, n in sizes.items() for i in range(n)})
    wanted = {"a": 1000, "b": 150, "c": 50}
    uris = [f"s3://{s3_bucket}/{p}/{i:05d}.svs" for p, n in wanted.items() for i in range(n)]
    assert len(uris) == 1200
    t0 = time.monotonic()
    with counting_requests(fs) as sent:
        got = fingerprints(uris, storage)
    listing_s = time.monotonic() - t0
    assert all(isinstance(v, Fingerprint) for v in got.values())
    ops = [op for op, _, _ in sent]
    print(f"fingerprints(1200 uris): {len(sent)} requests {ops} in {listing_s:.2f}s")
    assert ops == ["ListObjectsV2"] * 4  # a: 2 pages, b: 1, c: 1
    assert len(sent) <= 10

    sample = uris[::240]  # the old path: one HEAD per slide
    with counting_requests(fs) as sent:
        old = {u: per_file(u, storage) for u in sample}
    assert [op for op, _, _ in sent] == ["HeadObject"] * len(sample) == ["HeadObject"] * 5
    assert old == {u: got[u] for u in sample}

    few = [f"s3://{s3_bucket}/a/00007.svs", f"s3://{s3_bucket}/a/01100.svs"]
    with counting_requests(fs) as sent:  # 2 slides in a prefix of 1,200: HEAD, don't list
        got_few = fingerprints(few, storage)
    assert [op for op, _, _ in sent] == ["HeadObject"] * 2
    assert got_few == {u: got[u] if u in got else per_file(u, storage) for u in few}


def test_listing_failure_is_every_uri_of_that_parent(tmp_path: Path) -> None:
    uris = [f"s3://bkt-dead/p/{i}.svs" for i in range(3)]
    with dead_endpoint() as url:
        dead = StorageConfig(endpoint_url=url, retries=0)
        t0 = time.monotonic()
        got = fingerprints([*uris, str(tmp_path / "gone.svs")], dead)
        assert time.monotonic() - t0 < 60  # refused at once, not retried for minutes
    errs = [got[u] for u in uris]
    assert all(isinstance(e, Exception) and not isinstance(e, FileNotFoundError)
               for e in errs), errs
    # a connection error, retried (here 0 times) and then reported as storage unavailable
    assert isinstance(errs[0], StorageUnavailable) and is_transient(errs[0].__cause__)
    assert len({id(e) for e in errs}) == 1  # one failed listing, reported for each of its URIs
    assert isinstance(got[str(tmp_path / "gone.svs")], FileNotFoundError)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_head_or_list_rule_gives_the_same_answer(tmp_path: Path, n: int) -> None:
    for i in range(5):
        (tmp_path / f"{i}.svs").write_bytes(b"z" * i)
    assert_agree([str(tmp_path / f"{i}.svs") for i in range(n)] + [str(tmp_path / "no.svs")],
                 StorageConfig())
