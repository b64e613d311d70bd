"""The lake's commit protocol without Ray: Delta transactions, idempotent re-commits after a
kill, replacement without duplicates, compaction, orphans invisible, buffering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from rowkit import meta_column

from pipeline.handoff import embedding_column
from pipeline.qc import QC_COLUMNS
from pipeline.sink import (
    SLIDES,
    TILES,
    Lake,
    embedding_array,
    read_slides,
    read_tiles,
    safe_name,
    slides_schema,
    table_files,
    tile_files,
)
from pipeline.writer import SlideBuffer

DIM = 4


def batch(idx: list[int], value: float | None = None) -> dict[str, np.ndarray]:
    n = len(idx)
    i = np.array(idx, np.int64)
    emb = np.repeat(i[:, None], DIM, 1).astype(np.float16)
    if value is not None:
        emb[:] = value
    return {"index": i, "x": i * 10, "y": i * 20, "tissue": np.full(n, 0.5, np.float32),
            **{c: np.full(n, 0.1, np.float32) for c in QC_COLUMNS},
            embedding_column("m"): emb, "meta": meta_column(n),
            "t_chunk": np.full(n, 1.0), "rss_mb": np.full(n, 100.0, np.float32)}


def full_buffer(slide_id: str, n: int = 3, value: float | None = None) -> SlideBuffer:
    buf = SlideBuffer(slide_id, n, ("m",))
    buf.add(batch(list(range(n)), value))
    return buf


def slide_rows(rows: list[dict], emb: np.ndarray) -> pa.Table:
    schema = slides_schema(DIM)
    cols = [embedding_array(emb) if f.name == "embedding" else
            pa.array([r.get(f.name) for r in rows], f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def commit(lake: Lake, slide_id: str, cohort: str, key: str, value: float | None = None,
           replace: bool = False, replaced: tuple[str, ...] = (), tiles_only: bool = False
           ) -> str:
    buf = full_buffer(slide_id, value=value)
    f = lake.write_tiles("m", cohort, slide_id, key, buf.tiles_table("m", key, "float32"))
    lake.commit_tiles("m", DIM, [f], replaced)
    if not tiles_only:
        row = {"slide_id": slide_id, "work_key": key, "num_tiles": 3, "tiles_path": f.path,
               "cohort": cohort}
        lake.commit_slides("m", slide_rows([row], buf.mean_embedding("m")[None]), replace)
    return f.path


def test_buffer_completes_only_with_every_tile_and_ignores_redelivery() -> None:
    buf = SlideBuffer("s", 5, ("m",))
    for idx in ([3, 4], [0], [3, 4]):  # out of order, one chunk delivered twice
        buf.add(batch(idx))
    assert not buf.complete
    buf.add(batch([1, 2]))
    assert buf.complete
    t = buf.tiles_table("m", "k", "float32")
    assert t["tile_index"].to_pylist() == [0, 1, 2, 3, 4]
    assert t["x"].to_pylist() == [0, 10, 20, 30, 40]
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert buf.tiles_table("m", "k", "float16").schema.field("embedding").type == \
        pa.list_(pa.float16(), DIM)
    assert buf.mean_embedding("m").tolist() == [2.0] * DIM


def test_recommit_after_a_kill_is_idempotent_and_orphans_stay_invisible(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    commit(lake, "a", "c1", "k1")
    # killed between the two transactions: tiles committed, no slides row
    orphan = commit(lake, "b", "c1", "kb", tiles_only=True)
    assert read_slides(str(tmp_path))["slide_id"].to_pylist() == ["a"]
    assert set(read_tiles(str(tmp_path))["slide_id"].to_pylist()) == {"a"}
    # the re-run writes the same path again and commits both: one copy of each
    commit(lake, "b", "c1", "kb")
    commit(lake, "a", "c1", "k1", replace=True)
    tiles = read_tiles(str(tmp_path))
    assert sorted(tiles["slide_id"].to_pylist()) == ["a"] * 3 + ["b"] * 3
    assert sorted(read_slides(str(tmp_path))["slide_id"].to_pylist()) == ["a", "b"]
    assert orphan in table_files(lake.delta(TILES, "m"))
    assert lake.committed()[("b", "m")].tiles_path == orphan
    assert not list(tmp_path.rglob(".tmp-*"))


def test_rewritten_slide_replaces_its_rows_in_one_transaction(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    old = commit(lake, "a", "c1", "k1", value=1.0)
    commit(lake, "z", "c1", "kz")
    version = lake.delta(SLIDES, "m").version()
    # the slide file changed and the slide moved cohort: new work key, new path
    new = commit(lake, "a", "c2", "k2", value=2.0, replace=True, replaced=(old,))
    assert lake.delta(SLIDES, "m").version() == version + 1  # one transaction
    slides = read_slides(str(tmp_path))
    by_id = {r["slide_id"]: r for r in slides.to_pylist()}
    assert sorted(by_id) == ["a", "z"] and by_id["a"]["cohort"] == "c2"
    assert by_id["a"]["work_key"] == "k2" and by_id["a"]["embedding"] == [2.0] * DIM
    tiles = read_tiles(str(tmp_path))
    a = tiles.filter(pa.compute.equal(tiles["slide_id"], "a"))
    assert a.num_rows == 3 and set(a["cohort"].to_pylist()) == {"c2"}
    assert set(a["work_key"].to_pylist()) == {"k2"}
    files = table_files(lake.delta(TILES, "m"))
    assert new in files and old not in files
    # time travel still shows the old snapshot: a reader mid-commit saw a whole state
    before = DeltaTable(lake.table_url(SLIDES, "m"), version=version).to_pyarrow_table()
    assert sorted(before["slide_id"].to_pylist()) == ["a", "z"]


def test_compaction_leaves_few_files_and_drops_orphans(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    for i in range(12):
        commit(lake, f"s{i:02d}", "c1" if i % 2 else "c2", f"k{i}")
    orphan = commit(lake, "gone", "c1", "kg", tiles_only=True)
    before = read_slides(str(tmp_path)).sort_by("slide_id")
    assert len(table_files(lake.delta(SLIDES, "m"))) == 12
    report = lake.compact()
    assert len(table_files(lake.delta(SLIDES, "m"))) == 2  # one per cohort partition
    assert orphan not in table_files(lake.delta(TILES, "m"))
    assert report["tiles/m"] == {"orphans_removed": 1}
    after = read_slides(str(tmp_path)).sort_by("slide_id")
    assert after.select(["slide_id", "work_key", "embedding"]).equals(
        before.select(["slide_id", "work_key", "embedding"]))
    assert len(tile_files(str(tmp_path), "m")) == 12


def test_readers_refuse_mixed_widths_without_a_model(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    commit(lake, "a", "c1", "k1")
    wide = SlideBuffer("a", 2, ("w",))
    b = batch([0, 1])
    b[embedding_column("w")] = np.ones((2, 8), np.float16)
    wide.add(b)
    f = lake.write_tiles("w", "c1", "a", "kw", wide.tiles_table("w", "kw", "float32"))
    lake.commit_tiles("w", 8, [f])
    schema = slides_schema(8)
    row = {"slide_id": "a", "work_key": "kw", "tiles_path": f.path, "cohort": "c1"}
    lake.commit_slides("w", pa.Table.from_arrays(
        [embedding_array(np.ones((1, 8))) if x.name == "embedding" else
         pa.array([row.get(x.name)], x.type) for x in schema], schema=schema), False)
    with pytest.raises(ValueError, match="differ in width"):
        read_tiles(str(tmp_path))
    assert read_tiles(str(tmp_path), model="w").schema.field("embedding").type == \
        pa.list_(pa.float32(), 8)
    assert read_slides(str(tmp_path), columns=["slide_id"]).num_rows == 2


def test_safe_names() -> None:
    assert safe_name("TCGA-05-4244-01Z") == "TCGA-05-4244-01Z"
    odd = safe_name("a/b c")
    assert "/" not in odd and odd != safe_name("a/b_c") and odd.startswith("a_b_c-")


def test_concurrent_committers_on_s3_lose_nothing(s3_endpoint: str, s3_bucket: str) -> None:
    """Two coordinators commit to one S3 table at the same moment, each from the snapshot it
    read: delta-rs's conditional writes put both in (one retries at the next version)."""
    import threading

    from pipeline.config import StorageConfig

    storage = StorageConfig(endpoint_url=s3_endpoint)
    url = f"s3://{s3_bucket}/lake"
    first = Lake(url, storage)
    commit(first, "seed", "c1", "k0")
    lakes = [Lake(url, storage) for _ in range(4)]
    stale = [lk.delta(TILES, "m") for lk in lakes]  # all at the same version
    assert len({dt.version() for dt in stale}) == 1
    go = threading.Barrier(len(lakes))

    def one(i: int) -> None:
        go.wait()
        commit(lakes[i], f"s{i}", "c1", f"k{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(lakes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(read_slides(url, storage=storage)["slide_id"].to_pylist())
    assert ids == ["s0", "s1", "s2", "s3", "seed"]
    assert sorted(set(read_tiles(url, storage=storage)["slide_id"].to_pylist())) == ids
    assert lakes[0].delta(SLIDES, "m").version() == 5  # create, seed, one per commit


NEW_COLUMNS = {*QC_COLUMNS, "preview_path", "geojson_path"}


def test_a_lake_from_before_previews_and_qc_gains_their_columns(tmp_path: Path) -> None:
    """Tables created by an earlier version (no QC, no preview columns) take rows that have
    them: the old rows read as nulls, the new rows' values are there, in every table."""
    lake = Lake(str(tmp_path))
    buf = full_buffer("old")
    old_tiles = buf.tiles_table("m", "k1", "float32")
    old_tiles = old_tiles.drop_columns([c for c in old_tiles.column_names if c in NEW_COLUMNS])
    DeltaTable.create(lake.table_url(TILES, "m"), partition_by=["cohort"],
                      schema=old_tiles.schema.append(pa.field("cohort", pa.string())))
    f = lake.write_tiles("m", "c", "old", "k1", old_tiles)
    lake.commit_tiles("m", DIM, [f])  # an add of a file without the QC columns: still fine
    row = {"slide_id": "old", "work_key": "k1", "num_tiles": 3, "tiles_path": f.path,
           "cohort": "c"}
    rows = slide_rows([row], buf.mean_embedding("m")[None])
    lake.commit_slides("m", rows.drop_columns([c for c in rows.column_names
                                                if c in NEW_COLUMNS]), False)
    lake.write_errors([{"slide_id": "x", "stage": "open", "reason": "r"}])  # new schema

    commit(lake, "new", "c", "k2")  # QC 0.1 per tile (the batch's), a preview path below
    row = {"slide_id": "old", "work_key": "k1", "num_tiles": 3, "tiles_path": f.path,
           "cohort": "c", "preview_path": "previews/h/cohort=c/old.jpg", "qc_pen": 0.5}
    lake.commit_slides("m", slide_rows([row], buf.mean_embedding("m")[None]), True)

    tiles = read_tiles(str(tmp_path)).sort_by("slide_id")
    assert tiles["qc_pen"].to_pylist() == [pytest.approx(0.1)] * 3 + [None] * 3
    slides = {r["slide_id"]: r for r in read_slides(str(tmp_path)).to_pylist()}
    assert set(slides) == {"old", "new"}
    assert slides["old"]["preview_path"] == "previews/h/cohort=c/old.jpg"
    assert slides["old"]["qc_pen"] == 0.5 and slides["new"]["preview_path"] is None
