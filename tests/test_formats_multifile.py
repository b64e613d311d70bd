"""Multi-file slide formats (issue 17, items 1 and 6): file-set rules, staging a set as a unit
from a real S3 server (moto) and from local folders, fingerprints by listing, the scratch
budget counting the whole set, changed and missing members, per-format error messages, and
one job over a generated DICOM WSI series.

The DICOM series is real (wsidicomizer, read by OpenSlide 4). MRXS, VMS and VSI slides are
not generated (no writer we trust; OpenSlide does not read VSI at all): their file-set rules
and staging are tested on layouts of the right shape, never opened.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import boto3
import pytest
from wsigen_dicom import copy_series, write_dicom_wsi, write_not_wsi_dicom

from pipeline.config import StorageConfig
from pipeline.fileset import Entry, FileSetError, neighbourhood, resolve, vms_members
from pipeline.slides import SlideError, open_slide, resolve_mpp
from pipeline.storage import (
    Fingerprint,
    SlideChanged,
    StagingError,
    fingerprint,
    fingerprints,
    source_fingerprint,
    staged_slide,
    url_to_fs,
)

SLIDEDAT = """\ufeff[GENERAL]
SLIDE_VERSION=01.12
[HIERARCHICAL]
INDEXFILE=Index.dat
[DATAFILE]
FILE_COUNT=2
FILE_0=Data0000.dat
FILE_1=Data0001.dat
"""
VMS = """[Virtual Microscope Specimen]
NoLayers=1
NoJpegColumns=2
NoJpegRows=1
ImageFile=x.jpg
ImageFile(1,0)=x_1_0.jpg
MapFile=x_map.jpg
OptimisationFile=x.opt
"""


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated DICOM WSI series: 2048x1536 at 0.5 um/px, levels 1 and 4, two .dcm."""
    return write_dicom_wsi(tmp_path_factory.mktemp("dicom") / "series")[0].parent


def _entries(files: dict[str, int]) -> list[Entry]:
    return [Entry(p, n, f"etag={p}-{n}") for p, n in files.items()]


def _upload(s3_endpoint: str, bucket: str, folder: Path, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = []
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            key = f"{prefix}/{f.relative_to(folder).as_posix()}"
            s3.upload_file(str(f), bucket, key)
            keys.append(key)
    return keys


def _mrxs_layout(d: Path, *, data: bool = True, slidedat: bool = True) -> Path:
    """x.mrxs + x/ with the files its Slidedat.ini names (content is no real MRXS)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "x.mrxs").write_bytes(b"mrxs-main" * 10)
    if data:
        (d / "x").mkdir()
        if slidedat:
            (d / "x" / "Slidedat.ini").write_text(SLIDEDAT, encoding="utf-8")
        (d / "x" / "Index.dat").write_bytes(b"index" * 20)
        (d / "x" / "Data0000.dat").write_bytes(os.urandom(3000))
        (d / "x" / "Data0001.dat").write_bytes(os.urandom(2000))
    (d / "other.svs").write_bytes(b"not part of it")
    return d / "x.mrxs"


# ---- the rules (pure) ------------------------------------------------------------------------

def test_file_set_rules_per_format() -> None:
    mrxs = {"/s/x.mrxs": 10, "/s/x/Slidedat.ini": 5, "/s/x/Index.dat": 7,
            "/s/x/Data0000.dat": 100, "/s/x/Data0001.dat": 90, "/s/y.svs": 3, "/s/xx/a": 1}
    got = resolve("/s/x.mrxs", _entries(mrxs), {"/s/x/Slidedat.ini": SLIDEDAT})
    assert got.format == "mrxs" and got.root == "/s" and got.opener == "x.mrxs"
    assert [r for r, _ in got.members] == ["x.mrxs", "x/Data0000.dat", "x/Data0001.dat",
                                           "x/Index.dat", "x/Slidedat.ini"]
    assert got.size == 212 and got.version.startswith("set=mrxs:5:")
    assert neighbourhood("/s/x.mrxs").folders == (("/s/x", False),)

    with pytest.raises(FileSetError) as err:
        resolve("/s/x.mrxs", _entries({"/s/x.mrxs": 10}))
    assert str(err.value) == ("MRXS slide x.mrxs: its data folder x/ is missing (Slidedat.ini "
                              "not found); upload the folder x/ beside the .mrxs")
    gone = {k: v for k, v in mrxs.items() if k != "/s/x/Data0001.dat"}
    with pytest.raises(FileSetError, match=r"x/Data0001\.dat named by x/Slidedat\.ini is "
                                           "missing; upload the whole folder x/"):
        resolve("/s/x.mrxs", _entries(gone), {"/s/x/Slidedat.ini": SLIDEDAT})

    assert vms_members(VMS) == ["x.jpg", "x_1_0.jpg", "x_map.jpg", "x.opt"]
    vms = {"/v/x.vms": 4, "/v/x.jpg": 50, "/v/x_1_0.jpg": 40, "/v/x_map.jpg": 5, "/v/x.opt": 2,
           "/v/unrelated.jpg": 9}
    got = resolve("/v/x.vms", _entries(vms), {"/v/x.vms": VMS})
    assert [r for r, _ in got.members] == ["x.jpg", "x.opt", "x.vms", "x_1_0.jpg", "x_map.jpg"]
    with pytest.raises(FileSetError, match=r"VMS slide x\.vms: x_1_0\.jpg, x\.opt named by "
                                           r"x\.vms are missing; upload them beside the \.vms"):
        resolve("/v/x.vms", _entries({k: v for k, v in vms.items()
                                      if k not in ("/v/x_1_0.jpg", "/v/x.opt")}),
                {"/v/x.vms": VMS})

    vsi = {"/o/x.vsi": 8, "/o/_x_/stack1/frame_t.ets": 80, "/o/_x_/stack10001/frame_t.ets": 9}
    got = resolve("/o/x.vsi", _entries(vsi))
    assert [r for r, _ in got.members] == ["_x_/stack1/frame_t.ets",
                                           "_x_/stack10001/frame_t.ets", "x.vsi"]
    with pytest.raises(FileSetError, match=r"VSI slide x\.vsi: its image folder _x_/ is "
                                           "missing"):
        resolve("/o/x.vsi", _entries({"/o/x.vsi": 8}))

    dcm = {"/d/s/a.dcm": 10, "/d/s/b.DCM": 30, "/d/s/notes.txt": 1, "/d/s/sub/c.dcm": 5}
    folder = resolve("/d/s", _entries(dcm), folder=True)
    one = resolve("/d/s/a.dcm", _entries(dcm))
    assert [r for r, _ in folder.members] == ["a.dcm", "b.DCM"] == [r for r, _ in one.members]
    assert folder.opener == "b.DCM" and one.opener == "a.dcm"  # largest; the one named
    assert folder.version == one.version  # one series, one fingerprint, whichever uri
    with pytest.raises(FileSetError, match="holds no .dcm files"):
        resolve("/d/s/sub2", _entries(dcm), folder=True)


def test_a_set_version_changes_with_any_member() -> None:
    base = {"/s/x.mrxs": 10, "/s/x/Slidedat.ini": 5, "/s/x/Data0000.dat": 100}
    v0 = resolve("/s/x.mrxs", _entries(base)).version
    assert resolve("/s/x.mrxs", _entries(base)).version == v0  # deterministic
    changed = [Entry(p, n, "etag=new" if p.endswith("0.dat") else f"etag={p}-{n}")
               for p, n in base.items()]
    renamed = _entries({**{k: v for k, v in base.items() if "Data" not in k},
                        "/s/x/Data0009.dat": 100})
    added = _entries({**base, "/s/x/Data0001.dat": 1})
    versions = {resolve("/s/x.mrxs", e).version for e in (changed, renamed, added)}
    assert len(versions | {v0}) == 4


# ---- reading ---------------------------------------------------------------------------------

def test_openslide_reads_the_generated_dicom_series(series: Path) -> None:
    files = sorted(series.glob("*.dcm"), key=lambda f: -f.stat().st_size)
    assert len(files) == 2
    for f in files:  # any instance opens the whole series
        with open_slide(f) as s:
            assert s.properties["openslide.vendor"] == "dicom"
            assert s.dimensions == (2048, 1536) and s.level_count == 2
            assert resolve_mpp(s, None) == (pytest.approx(0.5), "file")
            region = s.read_region((512, 512), 0, (256, 256))
            assert region.size == (256, 256)


def test_per_format_open_errors(series: Path, tmp_path: Path) -> None:
    with pytest.raises(SlideError) as err:
        open_slide(write_not_wsi_dicom(tmp_path / "ct" / "sc.dcm"))
    assert err.value.stage == "open"
    assert "DICOM file is not a WSI" in str(err.value) and "VL Whole Slide" in str(err.value)
    assert "corrupt or truncated" not in str(err.value)

    import pydicom

    lone = tmp_path / "label"
    lone.mkdir()
    ds = pydicom.dcmread(next(series.glob("*.dcm")))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    ds.save_as(lone / "l.dcm")
    with pytest.raises(SlideError, match="has no image flavor VOLUME .* LABEL only"):
        open_slide(lone / "l.dcm")

    (tmp_path / "x.vsi").write_bytes(b"II*\0" + bytes(100))
    with pytest.raises(SlideError, match="Olympus VSI .* not read by OpenSlide.*OME-TIFF"):
        open_slide(tmp_path / "x.vsi")

    from PIL import Image

    Image.new("RGB", (64, 48), (200, 120, 160)).save(tmp_path / "roi.png")
    with open_slide(tmp_path / "roi.png") as s, pytest.raises(SlideError) as err:
        resolve_mpp(s, None)
    assert err.value.stage == "mpp" and "plain image" in str(err.value)
    assert "add an `mpp` column" in str(err.value)


# ---- local sets: used in place ---------------------------------------------------------------

def test_local_dicom_series_is_used_in_place(series: Path, tmp_path: Path) -> None:
    storage = StorageConfig(scratch_dir=str(tmp_path / "scratch"))
    files = sorted(series.glob("*.dcm"), key=lambda f: -f.stat().st_size)
    uris = [str(series), str(series) + "/", str(files[1])]
    got = fingerprints(uris, storage)
    fp = got[str(series)]
    assert isinstance(fp, Fingerprint), fp
    assert fp.size == sum(f.stat().st_size for f in files)
    assert str(fp).startswith("size=") and ";set=dicom:2:" in str(fp)
    assert got[uris[1]] == got[uris[2]] == fp == source_fingerprint(str(series), storage)
    with staged_slide(str(series), storage, str(fp)) as local:
        assert local == str(files[0])  # in place: the largest instance
    with staged_slide(str(files[1]), storage, str(fp)) as local:
        assert local == str(files[1])
    assert not (tmp_path / "scratch").exists() or not os.listdir(tmp_path / "scratch")

    mine = copy_series(series, tmp_path / "mine")
    planned = str(source_fingerprint(str(mine), storage))
    os.utime(min(mine.glob("*.dcm")), (1, 1))  # rewritten after the plan (its mtime)
    with pytest.raises(SlideChanged, match="before tiling"):
        with staged_slide(str(mine), storage, planned):
            pass


def test_local_mrxs_layout_and_its_missing_folder(tmp_path: Path) -> None:
    storage = StorageConfig()
    main = _mrxs_layout(tmp_path / "ok")
    fp = fingerprints([str(main)], storage)[str(main)]
    assert isinstance(fp, Fingerprint) and fp.version.startswith("set=mrxs:5:")
    with staged_slide(str(main), storage, str(fp)) as local:
        assert local == str(main)
    broken = _mrxs_layout(tmp_path / "bad", data=False)
    got = fingerprints([str(broken)], storage)[str(broken)]
    assert isinstance(got, FileSetError) and "data folder x/ is missing" in str(got)
    with pytest.raises(StagingError, match="data folder x/ is missing"):
        with staged_slide(str(broken), storage):
            pass


def test_single_file_slides_keep_their_fingerprints(tmp_path: Path) -> None:
    """Existing lakes must not re-run: a plain file's fingerprint string is unchanged, and a
    folder that is no series is still an IsADirectoryError."""
    for i in range(4):  # more than HEAD_AT_MOST: planned by listing
        (tmp_path / f"s{i}.svs").write_bytes(b"x" * (i + 1))
    (tmp_path / "empty").mkdir()
    uris = [str(tmp_path / f"s{i}.svs") for i in range(4)]
    got = fingerprints([*uris, str(tmp_path / "empty")], StorageConfig())
    for u in uris:
        assert got[u] == fingerprint(*url_to_fs(u, StorageConfig()))
        assert str(got[u]).startswith("size=") and ";mtime=" in str(got[u])
    assert isinstance(got[str(tmp_path / "empty")], IsADirectoryError)


# ---- remote sets: one scratch folder, the budget counting the whole set ----------------------

def test_dicom_series_staged_from_s3_as_a_unit(series: Path, s3_endpoint: str, s3_bucket: str,
                                               tmp_path: Path) -> None:
    keys = _upload(s3_endpoint, s3_bucket, series, "dicom/s1")
    _upload(s3_endpoint, s3_bucket, series, "dicom/s2")  # a neighbour series: not s1's
    scratch = tmp_path / "scratch"
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(scratch))
    folder, one = f"s3://{s3_bucket}/dicom/s1", f"s3://{s3_bucket}/{keys[0]}"
    got = fingerprints([folder, folder + "/", one, f"s3://{s3_bucket}/dicom/none"], storage)
    fp = got[folder]
    assert isinstance(fp, Fingerprint), fp
    assert got[folder + "/"] == got[one] == fp and ";set=dicom:2:" in str(fp)
    assert fp.size == sum(f.stat().st_size for f in series.glob("*.dcm"))
    assert isinstance(got[f"s3://{s3_bucket}/dicom/none"], FileNotFoundError)

    seen: dict[str, str] = {}
    with staged_slide(folder, storage, str(fp)) as local:
        staged = Path(local).parent
        assert staged.parent == scratch
        assert sorted(p.name for p in staged.iterdir()) == sorted(
            p.name for p in series.glob("*.dcm"))
        for p in staged.iterdir():
            assert p.read_bytes() == (series / p.name).read_bytes()
        seen.update({f.name: f.read_text() for f in scratch.glob(".reserve-*")})
        with open_slide(local) as s:  # the staged path is the one OpenSlide opens
            assert s.dimensions == (2048, 1536) and s.level_count == 2
    assert list(seen.values()) == [str(fp.size)]  # one reservation: the whole set
    assert not staged.exists() and not list(scratch.glob(".reserve-*"))
    with staged_slide(one, storage, str(fp)) as local:
        assert Path(local).name == Path(keys[0]).name
        assert len(list(Path(local).parent.iterdir())) == 2


def test_the_scratch_budget_counts_the_whole_set(series: Path, s3_endpoint: str,
                                                 s3_bucket: str, tmp_path: Path) -> None:
    _upload(s3_endpoint, s3_bucket, series, "s")
    sizes = sorted(f.stat().st_size for f in series.glob("*.dcm"))
    # room for the largest instance but not for the set
    limit = (sizes[-1] + sizes[0] // 2) / 2**30
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"),
                            scratch_limit_gb=limit)
    with pytest.raises(StagingError, match="larger than the scratch limit"):
        with staged_slide(f"s3://{s3_bucket}/s", storage):
            pass

    # two sets staged at once wait for each other when only one fits
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch2"),
                            scratch_limit_gb=(sum(sizes) * 1.5) / 2**30)
    inside, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with staged_slide(f"s3://{s3_bucket}/s", storage):
            order.append("first in")
            inside.set()
            release.wait(30)
        order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(30)
    threading.Timer(0.5, release.set).start()
    with staged_slide(f"s3://{s3_bucket}/s", storage):
        assert release.is_set()  # it got scratch only once the first let go of it
        order.append("second in")
    t.join(30)
    assert order[0] == "first in" and sorted(order) == ["first in", "first out", "second in"]


def test_a_member_changed_after_planning_is_caught(series: Path, s3_endpoint: str,
                                                   s3_bucket: str, tmp_path: Path) -> None:
    keys = _upload(s3_endpoint, s3_bucket, series, "s")
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"))
    uri = f"s3://{s3_bucket}/s"
    planned = str(fingerprints([uri], storage)[uri])
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    small = min(series.glob("*.dcm"), key=lambda f: f.stat().st_size)
    body = bytearray(small.read_bytes())
    body[-1] ^= 0xFF  # same size, other bytes: only the ETag tells
    s3.put_object(Bucket=s3_bucket, Key=f"s/{small.name}", Body=bytes(body))
    with pytest.raises(SlideChanged, match="before download"):
        with staged_slide(uri, storage, planned):
            pass
    replanned = str(fingerprints([uri], storage)[uri])
    assert replanned != planned
    s3.put_object(Bucket=s3_bucket, Key="s/extra.dcm", Body=b"DICM")  # a member added
    with pytest.raises(SlideChanged):
        with staged_slide(uri, storage, replanned):
            pass
    assert len(keys) == 2 and not list((tmp_path / "scratch").glob("*.set"))


def test_mrxs_shaped_layout_from_s3(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    """Staging keeps the layout OpenSlide's MRXS driver wants (x.mrxs beside x/); a missing
    member is named, at planning and at staging. Not opened: the content is no real MRXS."""
    main = _mrxs_layout(tmp_path / "src")
    _upload(s3_endpoint, s3_bucket, main.parent, "m")
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"))
    uri = f"s3://{s3_bucket}/m/x.mrxs"
    fp = fingerprints([uri], storage)[uri]
    assert isinstance(fp, Fingerprint) and fp.version.startswith("set=mrxs:5:")
    with staged_slide(uri, storage, str(fp)) as local:
        root = Path(local).parent
        assert Path(local).name == "x.mrxs"
        got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert got == ["x.mrxs", "x/Data0000.dat", "x/Data0001.dat", "x/Index.dat",
                       "x/Slidedat.ini"]
        assert (root / "x" / "Data0001.dat").read_bytes() == \
            (main.parent / "x" / "Data0001.dat").read_bytes()
    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(Bucket=s3_bucket,
                                                               Key="m/x/Data0001.dat")
    with pytest.raises(StagingError, match=r"x/Data0001\.dat named by x/Slidedat\.ini is "
                                           "missing"):
        with staged_slide(uri, storage):
            pass
    _upload(s3_endpoint, s3_bucket, _mrxs_layout(tmp_path / "bare", data=False).parent, "n")
    got = fingerprints([f"s3://{s3_bucket}/n/x.mrxs"], storage)[f"s3://{s3_bucket}/n/x.mrxs"]
    assert isinstance(got, FileSetError) and str(got).startswith(
        "MRXS slide x.mrxs: its data folder x/ is missing (Slidedat.ini not found)")


def test_vms_staged_from_s3_with_the_files_its_index_names(s3_endpoint: str, s3_bucket: str,
                                                          tmp_path: Path) -> None:
    """The .vms and the files it names, staged side by side; a file beside it that the index
    does not name stays behind; a named one missing is named. Not opened: no real VMS."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.vms").write_text(VMS, encoding="utf-8")
    for name in vms_members(VMS):
        (src / name).write_bytes(os.urandom(700))
    (src / "unrelated.jpg").write_bytes(b"not named by x.vms")
    _upload(s3_endpoint, s3_bucket, src, "v")
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"))
    uri = f"s3://{s3_bucket}/v/x.vms"
    fp = fingerprints([uri], storage)[uri]
    assert isinstance(fp, Fingerprint) and fp.version.startswith("set=vms:5:")
    with staged_slide(uri, storage, str(fp)) as local:
        root = Path(local).parent
        assert Path(local).name == "x.vms"
        got = sorted(p.name for p in root.iterdir())
        assert got == sorted(["x.vms", *vms_members(VMS)])
        assert all((root / n).read_bytes() == (src / n).read_bytes() for n in got)
    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(Bucket=s3_bucket,
                                                               Key="v/x_map.jpg")
    got = fingerprints([uri], storage)[uri]
    assert isinstance(got, FileSetError) and "x_map.jpg" in str(got)
    with pytest.raises(StagingError, match=r"x_map\.jpg named by x\.vms is missing"):
        with staged_slide(uri, storage):
            pass


def test_vsi_is_staged_as_a_unit_and_failed_with_what_to_do(s3_endpoint: str, s3_bucket: str,
                                                            tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "_x_" / "stack1").mkdir(parents=True)
    (src / "x.vsi").write_bytes(b"II*\0" + bytes(200))
    (src / "_x_" / "stack1" / "frame_t.ets").write_bytes(b"SIS\0" + bytes(500))
    _upload(s3_endpoint, s3_bucket, src, "o")
    storage = StorageConfig(endpoint_url=s3_endpoint, scratch_dir=str(tmp_path / "scratch"))
    with staged_slide(f"s3://{s3_bucket}/o/x.vsi", storage) as local:
        assert (Path(local).parent / "_x_" / "stack1" / "frame_t.ets").stat().st_size == 504
        with pytest.raises(SlideError, match="Olympus VSI .*OME-TIFF"):
            open_slide(local)
    shutil.rmtree(src / "_x_")
    with pytest.raises(StagingError, match="image folder _x_/ is missing"):
        with staged_slide(str(src / "x.vsi"), storage):
            pass


# ---- one job ---------------------------------------------------------------------------------

@pytest.mark.usefixtures("local_ray")
def test_a_job_embeds_dicom_series_from_a_folder_and_from_s3(
        series: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    from jobkit import errors_by_slide, job_config, write_manifest

    from pipeline.run import run_job
    from pipeline.sink import read_slides, read_tiles

    keys = _upload(s3_endpoint, s3_bucket, series, "dicom/s1")
    manifest = write_manifest(tmp_path / "m.csv", [
        {"slide_id": "local", "uri": str(series)},
        {"slide_id": "remote", "uri": f"s3://{s3_bucket}/{keys[-1]}"},
        {"slide_id": "mrxs", "uri": str(_mrxs_layout(tmp_path / "mrxs", data=False))},
    ])
    out = str(tmp_path / "lake")
    storage = {"endpoint_url": s3_endpoint, "scratch_dir": str(tmp_path / "scratch")}
    cfg = job_config(str(manifest), out, ["bench-null"], storage=storage)
    record = run_job(cfg)
    slides = {r["slide_id"]: r for r in read_slides(out).to_pylist()}
    assert set(slides) == {"local", "remote"}
    for r in slides.values():
        assert r["num_tiles"] > 0 and r["mpp_source"] == "file"
        assert ";set=dicom:2:" in r["fingerprint"]
    assert slides["local"]["num_tiles"] == slides["remote"]["num_tiles"]
    assert read_tiles(out).num_rows == sum(r["num_tiles"] for r in slides.values())
    err = errors_by_slide(out, record["run_id"])["mrxs"]
    assert err["stage"] == "stage" and "data folder x/ is missing" in err["reason"]
    assert run_job(cfg)["plan"]["slides_to_process"] == 0  # set fingerprints are stable
