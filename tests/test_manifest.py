"""Manifest rows: good ones run, bad ones become error rows with a reason."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageConfig
from pipeline.manifest import ManifestError, read_manifest

S = StorageConfig()


def write(tmp_path: Path, text: str, name: str = "m.csv") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_good_and_bad_rows(tmp_path: Path) -> None:
    url = write(tmp_path, "\n".join([
        "slide_id,uri,cohort,mpp,stain",
        "0012,a.svs,lung,,H&E",          # id stays text, relative uri resolved
        "s2,/abs/b.svs,,0.25,IHC",       # default cohort, mpp override
        "s3,,lung,,H&E",                 # empty uri
        ",c.svs,lung,,H&E",              # empty id
        "s4,d.svs,lung,zero,H&E",        # bad mpp
        "s5,e.svs,lung/x,,H&E",          # bad cohort
        "s6,f.svs,lung,,H&E",
        "s6,f.svs,lung,,H&E",            # exact duplicate: first kept
        "s7,g.svs,lung,,H&E",
        "s7,h.svs,lung,,H&E",            # same id, different files: both rejected
    ]) + "\n")
    m = read_manifest(url, S, default_cohort="dflt")
    ids = [e.slide_id for e in m.entries]
    assert ids == ["0012", "s2", "s6"]
    first = m.entries[0]
    assert first.uri == str(tmp_path / "a.svs") and first.cohort == "lung"
    assert first.extra == {"stain": "H&E"} and first.mpp is None
    assert m.entries[1].cohort == "dflt" and m.entries[1].mpp == 0.25
    reasons = {(p.row, p.slide_id): p.reason for p in m.problems}
    assert "empty uri" in reasons[(3, "s3")]
    assert "empty slide_id" in reasons[(4, None)]
    assert "not a positive number" in reasons[(5, "s4")]
    assert "not a valid partition value" in reasons[(6, "s5")]
    assert "duplicate row" in reasons[(8, "s6")]
    assert "different uris" in reasons[(9, "s7")] and "different uris" in reasons[(10, "s7")]
    # nothing lost: every data row is an entry or a problem
    assert len(m.entries) + len(m.problems) == 10


def test_parquet_manifest(tmp_path: Path) -> None:
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"slide_id": ["a", "b"], "uri": ["/x/a.svs", "/x/b.svs"],
                             "mpp": [0.5, None], "site": [1, 2]}), p)
    m = read_manifest(str(p), S)
    assert [(e.slide_id, e.mpp, e.extra) for e in m.entries] == [
        ("a", 0.5, {"site": 1}), ("b", None, {"site": 2})]


def test_missing_column_stops_the_job(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no 'uri' column .found: slide_id, path"):
        read_manifest(write(tmp_path, "slide_id,path\na,x.svs\nb,y.svs\n"), S)


def test_unreadable_manifest_stops_the_job(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "missing.csv"), S)
    with pytest.raises(ManifestError, match="unknown format"):
        read_manifest(write(tmp_path, "x", "m.xlsx"), S)


def test_csv_placeholders_are_values_not_missing(tmp_path: Path) -> None:
    # The CSV reader's default null tokens ("NA", "null", "N/A") are real ids and cohorts here;
    # only an empty cell is missing.
    url = write(tmp_path, "slide_id,uri,cohort\nNA,a.svs,NA\nnull,b.svs,N/A\n,c.svs,x\nd,d.svs,\n")
    m = read_manifest(url, StorageConfig())
    assert [(e.slide_id, e.cohort) for e in m.entries] == [("NA", "NA"), ("d", "default")]
    assert [(p.row, p.slide_id, p.reason.split(" is ")[0]) for p in m.problems] == [
        (2, "null", "cohort 'N/A'"), (3, None, "empty slide_id")]
