"""Every documented client reads the committed rows of a multi-model lake, offline, and never
an orphan: pyarrow, pandas, Polars, DuckDB, ``pipeline.sink.read_*`` and Spark.

The lake is built without Ray through the real sink API (``Lake.write_tiles``, then
``commit_tiles`` and ``commit_slides`` as ``Coordinator.commit`` does): two models of different
widths, two cohorts, and two orphans, i.e. tiles files added to the tiles table whose slides
commit never happened (a kill between the two transactions): one of a slide with no slides row
at all, one of a re-run of a committed slide under a new work key. Every client below must
return the committed rows only, embeddings equal (bit for bit) to what was written.

What each client gives for ``embedding`` (asserted below):

- tiles files (pyarrow writes them with its schema): ``fixed_size_list<float, D>`` in pyarrow,
  ``pl.Array(pl.Float32, D)`` in Polars, ``FLOAT[D]`` in the DuckDB views, but ``FLOAT[]`` in a
  plain DuckDB ``read_parquet`` (DuckDB ignores the Arrow schema: cast to ``FLOAT[D]`` or use
  ``list_cosine_similarity``), ``array<float>`` in Spark;
- slides table (written by delta-rs, Delta has no fixed-size list): ``list<float>`` in pyarrow
  and Polars, ``FLOAT[]`` in plain DuckDB, ``array<float>`` in Spark; ``read_slides`` and the
  DuckDB views give ``fixed_size_list<float, D>`` / ``FLOAT[D]`` back.

Spark (``-m spark``) reads the Parquet files the Delta snapshot lists (no delta-spark jars),
through the README's own ``read_committed``, run as written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from jobkit import exec_snippet, readme_read_snippets
from rowkit import PLAN, meta_column

from pipeline.handoff import embedding_column
from pipeline.qc import QC_COLUMNS
from pipeline.sink import (
    Lake,
    duckdb_connect,
    embedding_array,
    now,
    read_slides,
    read_tiles,
    slides_schema,
    tile_files,
    tiles_dataset,
)
from pipeline.writer import SlideBuffer

MODELS = {"kaiko-vits16": 384, "kaiko-vitb16": 768}
# cohort -> slide ids; one id that is not a safe file name (the file gets a hashed name)
SLIDES = {"A": ["A-0", "A-1"], "B": ["B-0", "B 1/rescan"]}
COHORT = {s: c for c, ids in SLIDES.items() for s in ids}
NUM_TILES = {"A-0": 3, "A-1": 5, "B-0": 2, "B 1/rescan": 4}
ORPHAN_SLIDE = "A-orphan"  # kaiko-vits16: tiles committed, no slides row
RERUN_SLIDE = "B-0"        # kaiko-vitb16: a re-run's tiles committed, its slides row not


@dataclass
class Written:
    url: str
    tiles: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # model -> sid -> (n, D)
    slides: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # model -> sid -> (D,)
    work_keys: dict[str, dict[str, str]] = field(default_factory=dict)      # model -> sid -> key
    orphans: dict[str, tuple[str, str]] = field(default_factory=dict)       # model -> (sid, key)

    def table(self, kind: str, model: str) -> str:
        return f"{self.url}/{kind}/{model}"


def work_key(model: str, slide_id: str, run: int = 0) -> str:
    return hashlib.sha256(f"{model}/{slide_id}/{run}".encode()).hexdigest()


def buffer(model: str, slide_id: str, emb: np.ndarray) -> SlideBuffer:
    """The writer's buffer of one slide, filled as the encoders' batches fill it."""
    n = len(emb)
    idx = np.arange(n, dtype=np.int64)
    buf = SlideBuffer(slide_id, n, (model,))
    buf.add({"index": idx, "x": idx * 448, "y": idx * 448 + 1,
             "tissue": np.linspace(0.5, 1.0, n, dtype=np.float32), embedding_column(model): emb,
             **{c: np.full(n, 0.1, np.float32) for c in QC_COLUMNS},
             "meta": meta_column(n),
             "t_chunk": np.full(n, 1.0), "rss_mb": np.full(n, 100.0, np.float32)})
    assert buf.complete
    return buf


def slides_rows(model: str, dim: int, rows: list[dict], embs: list[np.ndarray]) -> pa.Table:
    """The slides rows table exactly as ``Coordinator.commit`` builds it."""
    schema = slides_schema(dim)
    cols = [embedding_array(np.stack(embs)) if f.name == "embedding"
            else pa.array([r.get(f.name) for r in rows], f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Written:
    url = str(tmp_path_factory.mktemp("clients") / "out")
    out = Written(url)
    sink = Lake(url)
    rng = np.random.default_rng(7)
    for model, dim in MODELS.items():
        out.tiles[model], out.slides[model], out.work_keys[model] = {}, {}, {}
        files, rows, means = [], [], []
        for cohort, ids in SLIDES.items():
            for sid in ids:
                emb = rng.standard_normal((NUM_TILES[sid], dim)).astype(np.float32)
                key = work_key(model, sid)
                buf = buffer(model, sid, emb)
                f = sink.write_tiles(model, cohort, sid, key, buf.tiles_table(model, key,
                                                                               "float32"))
                files.append(f)
                rows.append({"slide_id": sid, "uri": f"s3://slides/{sid}.svs", "cohort": cohort,
                             "num_tiles": len(emb), "aggregation": "mean",
                             "source_model": model, "model_dim": dim, "work_key": key,
                             "tiles_path": f.path, "run_id": "run-1", "committed_at": now(),
                             **{k: getattr(PLAN, k) for k in ("width", "height", "mpp",
                                                              "tile_px", "tile_l0", "level",
                                                              "target_mpp")}})
                means.append(buf.mean_embedding(model))
                out.tiles[model][sid], out.slides[model][sid] = emb, means[-1]
                out.work_keys[model][sid] = key
        sink.commit_tiles(model, dim, files)
        sink.commit_slides(model, slides_rows(model, dim, rows, means), replace=False)

    # Kills between the two commits: tiles in the tiles table, no slides row names them.
    for model, sid, run in (("kaiko-vits16", ORPHAN_SLIDE, 0), ("kaiko-vitb16", RERUN_SLIDE, 1)):
        dim, key = MODELS[model], work_key(model, sid, run)
        emb = rng.standard_normal((6, dim)).astype(np.float32)
        f = sink.write_tiles(model, COHORT.get(sid, "A"), sid, key,
                             buffer(model, sid, emb).tiles_table(model, key, "float32"))
        sink.commit_tiles(model, dim, [f])
        out.orphans[model] = (sid, key)
    return out


# ---- checks shared by the clients --------------------------------------------------------------


def committed_ids() -> list[str]:
    return sorted(COHORT)


def check_tiles(lake: Written, model: str, slide_ids, tile_index, embeddings, cohorts=None,
                keys=None) -> None:
    """The rows of one model's tiles are exactly the committed slides' tiles, as written."""
    sids = np.asarray(list(slide_ids), dtype=object)
    idx = np.asarray(list(tile_index))
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in embeddings])
    dim = MODELS[model]
    assert emb.shape == (sum(NUM_TILES.values()), dim)
    assert sorted(set(sids)) == committed_ids()
    orphan_sid, orphan_key = lake.orphans[model]
    if keys is not None:
        keys = np.asarray(list(keys), dtype=object)
        assert orphan_key not in set(keys)
        assert all(k == lake.work_keys[model][s] for s, k in zip(sids, keys, strict=True))
    if cohorts is not None:
        assert [str(c) for c in cohorts] == [COHORT[s] for s in sids]
    for sid in committed_ids():
        rows = np.nonzero(sids == sid)[0]
        order = rows[np.argsort(idx[rows])]
        assert idx[order].tolist() == list(range(NUM_TILES[sid]))
        np.testing.assert_array_equal(emb[order], lake.tiles[model][sid])


def check_slides(lake: Written, model: str, slide_ids, embeddings, cohorts=None,
                 tiles_paths=None) -> None:
    sids = list(slide_ids)
    assert sorted(sids) == committed_ids()  # one row per committed slide, no orphan
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in embeddings])
    assert emb.shape == (len(sids), MODELS[model])
    for s, e in zip(sids, emb, strict=True):
        np.testing.assert_array_equal(e, lake.slides[model][s])
    if cohorts is not None:
        assert [str(c) for c in cohorts] == [COHORT[s] for s in sids]
    if tiles_paths is not None:
        assert all(p.startswith(f"cohort={COHORT[s]}/") for s, p in zip(sids, tiles_paths,
                                                                         strict=True))


def committed_files(lake: Written, model: str) -> list[str]:
    files = tile_files(lake.url, model)
    assert sorted(files) == committed_ids()
    return sorted(files.values())


def test_the_lake_has_orphans_that_a_naive_tiles_reader_would_return(lake: Written) -> None:
    """The premise: each tiles table's own snapshot holds an orphan no slides row names."""
    for model in MODELS:
        sid, key = lake.orphans[model]
        naive = DeltaTable(lake.table("tiles", model)).to_pyarrow_dataset().to_table(
            columns=["slide_id", "work_key"])
        assert key in set(naive["work_key"].to_pylist())
        assert naive.num_rows == sum(NUM_TILES.values()) + 6
        named = set(DeltaTable(lake.table("slides", model)).to_pyarrow_dataset()
                    .to_table(columns=["tiles_path"])["tiles_path"].to_pylist())
        assert len(DeltaTable(lake.table("tiles", model)).file_uris()) == len(named) + 1
        assert not any(key[:16] in p for p in named)


# ---- pyarrow, pandas ---------------------------------------------------------------------------


def test_pyarrow_reads_committed_rows(lake: Written) -> None:
    for model, dim in MODELS.items():
        slides = DeltaTable(lake.table("slides", model)).to_pyarrow_dataset()
        assert slides.schema.field("embedding").type == pa.list_(pa.float32())  # Delta: no width
        s = slides.to_table(columns=["slide_id", "cohort", "tiles_path", "embedding"])
        check_slides(lake, model, s["slide_id"].to_pylist(), s["embedding"].to_numpy(False),
                     s["cohort"].to_pylist(), s["tiles_path"].to_pylist())

        tiles = tiles_dataset(lake.url, model)
        assert tiles.schema.field("embedding").type == pa.list_(pa.float32(), dim)
        assert tiles.schema.field("cohort").type == pa.string()  # from the paths
        t = tiles.to_table()
        flat = t["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
        check_tiles(lake, model, t["slide_id"].to_pylist(), t["tile_index"].to_numpy(), flat,
                    t["cohort"].to_pylist(), t["work_key"].to_pylist())
        # a filter on the partition column and a subset of slides
        one = tiles_dataset(lake.url, model, slide_ids=["A-1"])
        assert one.count_rows() == NUM_TILES["A-1"]
        assert tiles.count_rows(filter=pa.compute.field("cohort") == "B") == \
            NUM_TILES["B-0"] + NUM_TILES["B 1/rescan"]


def test_pandas_reads_committed_rows(lake: Written) -> None:
    for model, dim in MODELS.items():
        s = DeltaTable(lake.table("slides", model)).to_pandas()
        assert isinstance(s["embedding"].iloc[0], np.ndarray)
        assert s["embedding"].iloc[0].dtype == np.float32 and s["embedding"].iloc[0].shape == (dim,)
        check_slides(lake, model, s["slide_id"], s["embedding"], s["cohort"], s["tiles_path"])

        t = tiles_dataset(lake.url, model).to_table().to_pandas()
        assert t["embedding"].dtype == object
        assert isinstance(t["embedding"].iloc[0], np.ndarray)
        assert t["embedding"].iloc[0].dtype == np.float32 and t["embedding"].iloc[0].shape == (dim,)
        check_tiles(lake, model, t["slide_id"], t["tile_index"], t["embedding"], t["cohort"],
                    t["work_key"])
        # a slide's bag as one (n, D) matrix, the MIL loader's view
        bag = np.stack(t.loc[t["slide_id"] == "A-1"].sort_values("tile_index")["embedding"])
        np.testing.assert_array_equal(bag, lake.tiles[model]["A-1"])


# ---- Polars ------------------------------------------------------------------------------------


def test_polars_reads_committed_rows(lake: Written) -> None:
    pl = pytest.importorskip("polars")
    for model, dim in MODELS.items():
        files = committed_files(lake, model)
        lf = pl.scan_parquet(files, hive_partitioning=True)
        schema = lf.collect_schema()
        assert schema["embedding"] == pl.Array(pl.Float32, dim)
        assert schema["cohort"] == pl.String
        t = lf.collect()
        check_tiles(lake, model, t["slide_id"], t["tile_index"], t["embedding"].to_numpy(),
                    t["cohort"], t["work_key"])
        # lazily, one slide's bag
        bag = (lf.filter(pl.col("slide_id") == "B 1/rescan").sort("tile_index")
               .select("embedding").collect()["embedding"].to_numpy())
        np.testing.assert_array_equal(bag, lake.tiles[model]["B 1/rescan"])

        # slides: the Delta table, with Polars' own Delta reader and through pyarrow
        s = pl.read_delta(lake.table("slides", model), use_pyarrow=True)
        assert s.schema["embedding"] == pl.List(pl.Float32)  # Delta stores no width
        s = s.with_columns(pl.col("embedding").cast(pl.Array(pl.Float32, dim)))
        check_slides(lake, model, s["slide_id"], s["embedding"].to_numpy(), s["cohort"],
                     s["tiles_path"])
        assert pl.scan_delta(lake.table("slides", model), use_pyarrow=True) \
            .filter(pl.col("cohort") == "A").select(pl.len()).collect().item() == 2


def test_polars_native_scan_delta(lake: Written) -> None:
    """Polars' own Delta reader (no pyarrow) takes every key=value folder above a table's
    files for a Hive partition: the tables sit in plain ``<model>/`` folders so it works."""
    pl = pytest.importorskip("polars")
    for model, dim in MODELS.items():
        s = pl.read_delta(lake.table("slides", model))
        check_slides(lake, model, s["slide_id"],
                     s["embedding"].cast(pl.Array(pl.Float32, dim)).to_numpy(), s["cohort"])


# ---- DuckDB ------------------------------------------------------------------------------------


def arrow(rel) -> pa.Table:
    """A relation's result as a table (DuckDB 2 returns a RecordBatchReader from ``arrow()``)."""
    out = rel.arrow()
    return out.read_all() if isinstance(out, pa.RecordBatchReader) else out


def test_duckdb_views_read_committed_rows(lake: Written) -> None:
    pytest.importorskip("duckdb")
    con = duckdb_connect(lake.url)
    views = {r[0] for r in con.sql("SHOW TABLES").fetchall()}
    assert views == {f"{kind}_{m}" for kind in ("tiles", "slides") for m in MODELS} | {
        "errors", "errors_now"}
    for model, dim in MODELS.items():
        tiles, slides = f'"tiles_{model}"', f'"slides_{model}"'
        for view in (tiles, slides):
            assert con.sql(f"SELECT DISTINCT typeof(embedding) FROM {view}").fetchall() == \
                [(f"FLOAT[{dim}]",)]
        # FLOAT[D]: the array functions take it as it is
        lo, hi = con.sql("SELECT min(c), max(c) FROM (SELECT array_cosine_similarity("
                         f"embedding, embedding) AS c FROM {tiles})").fetchall()[0]
        assert lo == pytest.approx(1.0, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-5)
        t = arrow(con.sql(f"SELECT slide_id, tile_index, cohort, work_key, embedding "
                          f"FROM {tiles}"))
        assert t.schema.field("embedding").type.list_size == dim
        check_tiles(lake, model, t["slide_id"].to_pylist(), t["tile_index"].to_numpy(),
                    t["embedding"].to_numpy(False), t["cohort"].to_pylist(),
                    t["work_key"].to_pylist())
        s = arrow(con.sql(f"SELECT slide_id, cohort, tiles_path, embedding FROM {slides}"))
        check_slides(lake, model, s["slide_id"].to_pylist(), s["embedding"].to_numpy(False),
                     s["cohort"].to_pylist(), s["tiles_path"].to_pylist())
        # the documented join: each committed slide's tiles, once, and its row's count
        joined = con.sql(
            f"SELECT s.slide_id, count(*), any_value(s.num_tiles), "
            f"min(array_cosine_similarity(t.embedding, s.embedding)) > -1 "
            f"FROM {tiles} t JOIN {slides} s ON t.slide_id = s.slide_id "
            f"AND t.work_key = s.work_key GROUP BY ALL ORDER BY 1").fetchall()
        assert joined == [(sid, NUM_TILES[sid], NUM_TILES[sid], True)
                          for sid in committed_ids()]


def test_duckdb_sql_over_the_committed_file_lists(lake: Written) -> None:
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    for model, dim in MODELS.items():
        tiles = committed_files(lake, model)
        slides = DeltaTable(lake.table("slides", model)).file_uris()
        con.execute(f"CREATE OR REPLACE VIEW t AS SELECT * FROM read_parquet({tiles!r}, "
                    "hive_partitioning = true)")
        con.execute(f"CREATE OR REPLACE VIEW s AS SELECT * FROM read_parquet({slides!r}, "
                    "hive_partitioning = true)")
        # plain Parquet: DuckDB ignores the Arrow schema, a fixed-size list reads as FLOAT[]
        assert con.sql("SELECT DISTINCT typeof(embedding) FROM t").fetchall() == [("FLOAT[]",)]
        assert con.sql("SELECT DISTINCT typeof(embedding) FROM s").fetchall() == [("FLOAT[]",)]
        sims = con.sql(
            "SELECT min(list_cosine_similarity(embedding, embedding)), "
            f"min(array_cosine_similarity(embedding::FLOAT[{dim}], embedding::FLOAT[{dim}])) "
            "FROM t").fetchall()[0]
        assert sims == pytest.approx((1.0, 1.0), abs=1e-5)
        t = arrow(con.sql("SELECT slide_id, tile_index, cohort, work_key, embedding FROM t"))
        check_tiles(lake, model, t["slide_id"].to_pylist(), t["tile_index"].to_numpy(),
                    t["embedding"].to_numpy(False), t["cohort"].to_pylist(),
                    t["work_key"].to_pylist())
        s = arrow(con.sql("SELECT slide_id, cohort, embedding FROM s"))
        check_slides(lake, model, s["slide_id"].to_pylist(), s["embedding"].to_numpy(False),
                     s["cohort"].to_pylist())
        joined = con.sql("SELECT s.slide_id, count(*) FROM t JOIN s USING (slide_id, work_key) "
                         "GROUP BY ALL ORDER BY 1").fetchall()
        assert joined == [(sid, NUM_TILES[sid]) for sid in committed_ids()]


# ---- pipeline.sink readers ---------------------------------------------------------------------


def test_sink_readers_return_committed_rows(lake: Written) -> None:
    for model, dim in MODELS.items():
        files = tile_files(lake.url, model)
        assert sorted(files) == committed_ids()
        assert all(Path(p).is_file() and f"/tiles/{model}/cohort={COHORT[s]}/" in p
                   for s, p in files.items())
        sid, key = lake.orphans[model]
        assert not any(key[:16] in p for p in files.values())
        assert tile_files(lake.url, model, slide_ids=["A-0", ORPHAN_SLIDE]) == \
            {"A-0": files["A-0"]}

        t = read_tiles(lake.url, model)
        assert t.schema.field("embedding").type == pa.list_(pa.float32(), dim)
        assert set(t["model"].to_pylist()) == {model}
        check_tiles(lake, model, t["slide_id"].to_pylist(), t["tile_index"].to_numpy(),
                    t["embedding"].to_numpy(False), t["cohort"].to_pylist(),
                    t["work_key"].to_pylist())

        s = read_slides(lake.url, model)
        assert pa.types.is_fixed_size_list(s.schema.field("embedding").type)
        assert s.schema.field("embedding").type.list_size == dim
        assert s.schema.field("embedding").type.value_type == pa.float32()
        check_slides(lake, model, s["slide_id"].to_pylist(), s["embedding"].to_numpy(False),
                     s["cohort"].to_pylist(), s["tiles_path"].to_pylist())


def test_sink_readers_across_models_of_different_widths(lake: Written) -> None:
    for reader in (read_tiles, read_slides):
        with pytest.raises(ValueError, match="differ in width: pass model="):
            reader(lake.url)
    # without the embedding, all models read as one table
    t = read_tiles(lake.url, columns=["slide_id", "tile_index", "work_key"])
    assert t.num_rows == len(MODELS) * sum(NUM_TILES.values())
    assert sorted(set(t["model"].to_pylist())) == sorted(MODELS)
    orphan_keys = {key for _, key in lake.orphans.values()}
    assert not orphan_keys & set(t["work_key"].to_pylist())
    s = read_slides(lake.url, columns=["slide_id", "num_tiles"])
    assert sorted(zip(s["model"].to_pylist(), s["slide_id"].to_pylist(), strict=True)) == \
        sorted((m, sid) for m in MODELS for sid in committed_ids())


# ---- Spark -------------------------------------------------------------------------------------


def _java_ok() -> bool:
    java = (Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME")
            else shutil.which("java"))
    if not java or not Path(java).exists():
        return False
    return subprocess.run([str(java), "-version"], capture_output=True).returncode == 0


@pytest.mark.spark
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_reads_the_committed_parquet_files(lake: Written) -> None:
    pytest.importorskip("pyspark")
    if not _java_ok():
        pytest.skip("no Java runtime for Spark (JAVA_HOME or java on PATH)")
    from pyspark import SparkContext
    from pyspark.sql import SparkSession
    from pyspark.sql.types import ArrayType, FloatType

    spark = (SparkSession.builder.master("local[1]").appName("test_clients")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "1")
             .config("spark.driver.memory", "512m")
             .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -Xshare:auto")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    # The README's Spark snippet, as written: tiles from the files the slides rows name
    # (basePath makes cohort a column), slides from the data files of the Delta snapshot.
    (read_committed,) = (exec_snippet(code, lake.url)["read_committed"]
                         for code in readme_read_snippets() if "def read_committed" in code)
    try:
        for model, dim in MODELS.items():
            committed_files(lake, model)  # asserts: the slides rows name committed slides only
            tiles, slides = read_committed(spark, lake.url, model)
            assert tiles.schema["embedding"].dataType == ArrayType(FloatType(), True)
            rows = tiles.select("slide_id", "tile_index", "cohort", "work_key",
                                "embedding").collect()
            check_tiles(lake, model, [r.slide_id for r in rows], [r.tile_index for r in rows],
                        [r.embedding for r in rows], [r.cohort for r in rows],
                        [r.work_key for r in rows])

            assert slides.schema["embedding"].dataType == ArrayType(FloatType(), True)
            rows = slides.select("slide_id", "cohort", "tiles_path", "embedding").collect()
            check_slides(lake, model, [r.slide_id for r in rows], [r.embedding for r in rows],
                         [r.cohort for r in rows], [r.tiles_path for r in rows])
            assert {len(r.embedding) for r in rows} == {dim}
    finally:
        spark.stop()
        # stop() leaves the JVM up (and ticking: a few % of a core) for the rest of this pytest
        # worker; an EOF on its stdin is pyspark's own signal for it to exit.
        gateway = SparkContext._gateway
        if gateway is not None and getattr(gateway, "proc", None) is not None:  # we launched it
            gateway.shutdown()
            gateway.proc.stdin.close()
            gateway.proc.wait(60)
            SparkContext._gateway = SparkContext._jvm = None
