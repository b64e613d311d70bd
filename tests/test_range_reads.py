"""Range reads of TIFF slides in object storage (pipeline.remote) against a real S3 server
(moto) behind the fault proxy: the same tiles as staging, fewer bytes, rewrites caught,
fallbacks to staging, storage failures retried and reported."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import tifffile
from lake_fixtures import FaultProxy
from slidegen import tissue_renderer, write_not_a_slide, write_slide

from pipeline import remote
from pipeline.config import StorageConfig, TilingConfig
from pipeline.handoff import (
    ERROR,
    ERROR_STAGE,
    INDEX,
    META,
    SLIDE_ID,
    TILE_COLUMN,
    TilingMeta,
    X,
    Y,
)
from pipeline.storage import StagingError, fingerprint, url_to_fs
from pipeline.tiling import tile_slide, tiling_stage

CFG = TilingConfig(mpp=0.5, tile_size=224, chunk_tiles=4)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated Aperio slide with tissue pieces on glass (~0.8 MB)."""
    path = tmp_path_factory.mktemp("rr") / "s.svs"
    return write_slide(path, tissue_renderer(3000, 2400), width=3000, height=2400, mpp=0.25,
                       levels=(1, 4, 16), tile=256)


@pytest.fixture
def proxy(fault_proxy: FaultProxy) -> Iterator[FaultProxy]:
    fault_proxy.set()
    yield fault_proxy
    fault_proxy.set()


def _upload(endpoint: str, bucket: str, key: str, data: bytes) -> str:
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def _storage(proxy: FaultProxy, tmp_path: Path, **kw: object) -> StorageConfig:
    return StorageConfig(endpoint_url=proxy.url, scratch_dir=str(tmp_path / "scratch"), **kw)


def _run(uri: str, storage: StorageConfig, expected: str | None = None,
         cfg: TilingConfig = CFG, mpp: float = float("nan")) -> list[dict[str, np.ndarray]]:
    batch = {SLIDE_ID: np.array(["s"], object), "uri": np.array([uri], object),
             "mpp": np.array([mpp]), "models": np.array(["m"], object),
             "fingerprint": np.array([expected], object)}
    return list(tiling_stage(batch, tiling=cfg, storage=storage))


def _tiles(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    assert not any(r[ERROR][0] for r in rows), [r[ERROR][0] for r in rows]
    return {k: np.concatenate([r[k] for r in rows]) for k in (TILE_COLUMN, X, Y, INDEX)}


def _meta(rows: list[dict[str, np.ndarray]]) -> TilingMeta:
    return TilingMeta.decode(rows[-1][META][0])


def _left(tmp_path: Path) -> list[str]:
    return [f for f in os.listdir(tmp_path / "scratch") if not f.startswith(".")]


def test_range_reads_give_the_staged_tiles_from_fewer_bytes(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, slide: Path,
        tmp_path: Path) -> None:
    uri = _upload(s3_endpoint, s3_bucket, "a/s.svs", slide.read_bytes())
    size = slide.stat().st_size
    planned = str(fingerprint(*url_to_fs(uri, StorageConfig(endpoint_url=s3_endpoint))))
    staged_rows = _run(uri, _storage(proxy, tmp_path, range_reads=False), planned)
    staged_bytes = proxy.report()["bytes_out"]
    proxy.set()  # counts from zero
    ranged_rows = _run(uri, _storage(proxy, tmp_path), planned)
    ranged_bytes = proxy.report()["bytes_out"]
    staged, ranged = _tiles(staged_rows), _tiles(ranged_rows)
    assert len(staged[INDEX]) > 4
    for key in staged:  # bit-identical rows
        assert np.array_equal(staged[key], ranged[key]), key
    assert staged_bytes >= size > ranged_bytes  # counted by the proxy, not by us
    meta = _meta(ranged_rows)
    assert meta.reader == "tiff" and meta.read_note is not None
    assert meta.read_note.startswith("range reads: ") and "%) in " in meta.read_note
    assert _meta(staged_rows).read_note is None
    assert _left(tmp_path) == []


def test_scratch_holds_the_skeleton_not_the_file(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, slide: Path,
        tmp_path: Path) -> None:
    uri = _upload(s3_endpoint, s3_bucket, "s.svs", slide.read_bytes())
    limit = 0.5 * slide.stat().st_size / 2**30  # half the file
    with remote.slide_bytes(uri, _storage(proxy, tmp_path, scratch_limit_gb=limit), None,
                            CFG) as got:
        assert got.ranged and 0 < got.skeleton_bytes < slide.stat().st_size / 2
        blocks = os.stat(got.path).st_blocks * 512  # sparse: only the skeleton is on disk
        assert os.path.getsize(got.path) == slide.stat().st_size and blocks < limit * 2**30
    staged = _run(uri, _storage(proxy, tmp_path, scratch_limit_gb=limit, range_reads=False))
    assert staged[0][ERROR_STAGE][0] == "stage" and "scratch limit" in staged[0][ERROR][0]


def test_a_slide_rewritten_before_or_while_it_is_read_is_caught(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, slide: Path,
        tmp_path: Path) -> None:
    data = slide.read_bytes()
    marker = b"generated by tests/slidegen.py"
    assert marker in data
    other = data.replace(marker, marker.upper(), 1)  # same size, same tiles, new ETag
    uri = _upload(s3_endpoint, s3_bucket, "s.svs", data)
    planned = str(fingerprint(*url_to_fs(uri, StorageConfig(endpoint_url=s3_endpoint))))
    storage = _storage(proxy, tmp_path)
    # rewritten between planning and reading
    _upload(s3_endpoint, s3_bucket, "s.svs", other)
    rows = _run(uri, storage, planned)
    assert rows[-1][ERROR_STAGE][0] == "changed"
    assert "before reading" in rows[-1][ERROR][0]
    # rewritten while its tiles are read: the slide's last chunk never goes out
    _upload(s3_endpoint, s3_bucket, "s.svs", data)
    batch = {SLIDE_ID: np.array(["s"], object), "uri": np.array([uri], object),
             "mpp": np.array([np.nan]), "models": np.array(["m"], object),
             "fingerprint": np.array([planned], object)}
    gen = tiling_stage(batch, tiling=CFG, storage=storage)
    first = next(gen)
    assert not first[ERROR][0] and first[META][0] == ""  # a chunk, not the last
    _upload(s3_endpoint, s3_bucket, "s.svs", other)
    rest = list(gen)
    assert rest[-1][ERROR_STAGE][0] == "changed"
    assert "while its tiles were read" in rest[-1][ERROR][0]
    assert all(r[META][0] == "" for r in rest[:-1])  # no tile row carries the slide's meta
    assert _left(tmp_path) == []


def test_a_file_that_is_no_tiff_is_staged_as_before(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    bad = write_not_a_slide(tmp_path / "bad.svs")
    uri = _upload(s3_endpoint, s3_bucket, "bad.svs", bad.read_bytes())
    ranged = _run(uri, _storage(proxy, tmp_path))
    staged = _run(uri, _storage(proxy, tmp_path, range_reads=False))
    assert ranged[0][ERROR_STAGE][0] == staged[0][ERROR_STAGE][0] == "open"
    assert "not a readable slide" in ranged[0][ERROR][0]


def test_a_slide_the_fast_reader_declines_is_staged_whole(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    """A tiled zlib TIFF: OpenSlide reads it (generic-tiff), the direct JPEG reader does not."""
    path = tmp_path / "z.tif"
    render = tissue_renderer(1024, 768)
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate((1, 4)):
            w, h = 1024 // ds, 768 // ds
            tw.write(render(0, 0, w, h, ds), tile=(128, 128), photometric="rgb",
                     compression="zlib", metadata=None, subfiletype=1 if i else 0)
    uri = _upload(s3_endpoint, s3_bucket, "z.tif", path.read_bytes())
    ranged = _run(uri, _storage(proxy, tmp_path), mpp=0.25)
    staged = _run(uri, _storage(proxy, tmp_path, range_reads=False), mpp=0.25)
    for key, values in _tiles(staged).items():
        assert np.array_equal(values, _tiles(ranged)[key]), key
    meta = _meta(ranged)
    assert meta.reader == "openslide"
    assert meta.read_note is not None and "staged whole, not range reads" in meta.read_note
    assert "not JPEG" in meta.read_note
    assert _left(tmp_path) == []


def test_transient_read_failures_are_retried(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, slide: Path,
        tmp_path: Path) -> None:
    uri = _upload(s3_endpoint, s3_bucket, "s.svs", slide.read_bytes())
    staged = _tiles(_run(uri, _storage(proxy, tmp_path, range_reads=False)))
    proxy.set(every={"reset": 3, "truncate": 5}, methods=["GET"])
    ranged = _tiles(_run(uri, _storage(proxy, tmp_path, retry_max_backoff_s=0.05)))
    injected = proxy.report()["injected"]
    assert injected["reset"] > 0 and injected["truncate"] > 0
    for key in staged:
        assert np.array_equal(staged[key], ranged[key]), key


def test_storage_that_keeps_failing_fails_the_slide_as_staging_does(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, slide: Path,
        tmp_path: Path) -> None:
    uri = _upload(s3_endpoint, s3_bucket, "s.svs", slide.read_bytes())
    quick = {"retries": 3, "retry_budget_s": 1.0, "retry_max_backoff_s": 0.05}
    proxy.set(outage_s=600, methods=["GET"])
    ranged = _run(uri, _storage(proxy, tmp_path, **quick))
    staged = _run(uri, _storage(proxy, tmp_path, range_reads=False, **quick))
    assert ranged[0][ERROR_STAGE][0] == staged[0][ERROR_STAGE][0] == "stage"
    assert "could not read" in ranged[0][ERROR][0] and "could not download" in staged[0][ERROR][0]
    assert "storage kept failing" in ranged[0][ERROR][0]


def test_a_read_failing_after_planning_fails_the_slide(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, slide: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles fetched one small GET at a time: the outage starts once the slide is planned,
    before most of its tiles are fetched."""
    monkeypatch.setattr(remote, "WINDOW_BYTES", 1)
    monkeypatch.setattr(remote, "CHUNK_BYTES", 4096)
    uri = _upload(s3_endpoint, s3_bucket, "s.svs", slide.read_bytes())
    storage = _storage(proxy, tmp_path, retries=2, retry_budget_s=1.0, retry_max_backoff_s=0.05)
    with remote.slide_bytes(uri, storage, None, CFG) as got:
        assert got.ranged
        plan, chunks = tile_slide(got.path, mpp_override=None, cfg=CFG, source=got.source)
        proxy.set(outage_s=600, methods=["GET"])
        with chunks, pytest.raises(StagingError, match=r"could not read .* \(range reads\)"):
            for _ in chunks:
                pass
    assert plan.num_tiles > 4 and _left(tmp_path) == []


def test_only_a_reader_that_takes_the_source_reads_a_skeleton(
        s3_endpoint: str, s3_bucket: str, proxy: FaultProxy, slide: Path,
        tmp_path: Path) -> None:
    """OpenSlide would read the skeleton's holes as pixels: asked to, the slide fails."""
    from pipeline.slides import SlideError

    uri = _upload(s3_endpoint, s3_bucket, "o.svs", slide.read_bytes())
    with remote.slide_bytes(uri, _storage(proxy, tmp_path), None, CFG) as got:
        assert got.ranged and got.source is not None
        with pytest.raises(SlideError, match="openslide reader reads local files only"):
            tile_slide(got.path, mpp_override=None,
                       cfg=CFG.model_copy(update={"reader": "openslide"}), source=got.source)
