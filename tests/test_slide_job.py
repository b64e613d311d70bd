"""The Prov-GigaPath slide encoder inside a job: fed per slide, committed as slides finish."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from jobkit import embeddings, job_config, write_manifest
from slidegen import write_pyramid_svs

from pipeline.config import SlideEncoderConfig, StorageConfig
from pipeline.models.weights import resolve_weights
from pipeline.run import run_job
from pipeline.sink import read_slides, read_tiles
from pipeline.slide_encode import SlideEncoderStage, get_slide_model

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]


def test_gigapath_slide_embeddings_from_a_job(tmp_path: Path) -> None:
    # One or two tiles per slide: the 1.1B-parameter tile encoder runs on CPU here
    # (about 10-30 s per tile on 2 cores); the slide encoder's own maths is tested at scale
    # in test_gigapath_slide.py.
    for name, seed, width in (("a", 1, 304), ("b", 2, 528)):
        write_pyramid_svs(tmp_path / f"{name}.svs", width=width, height=304, mpp=0.5,
                          levels=(1,), background=False, seed=seed)
    manifest = write_manifest(tmp_path / "m.csv", [
        {"slide_id": n, "uri": str(tmp_path / f"{n}.svs"), "cohort": "c"} for n in ("a", "b")])
    out = str(tmp_path / "lake")
    cfg = job_config(str(manifest), out, models=["gigapath"],
                     tiling={"mpp": 0.5, "tile_size": 256, "chunk_tiles": 4})
    slide_cfg = {"weights": "random", "layers": [11]}
    cfg.models[0].slide_encoder = SlideEncoderConfig(**slide_cfg)
    record = run_job(cfg)
    assert record["status"] == "succeeded", record
    assert record["counts"]["committed"] == {"gigapath": 2, "gigapath-slide": 2}

    mean_rows = read_slides(out, model="gigapath")
    assert set(mean_rows["aggregation"].to_pylist()) == {"mean"}
    enc = read_slides(out, model="gigapath-slide")
    assert enc.schema.field("embedding").type.list_size == 768
    assert sorted(zip(enc["slide_id"].to_pylist(), enc["layer"].to_pylist(), strict=True)) == [
        ("a", 11), ("a", 12), ("b", 11), ("b", 12)]
    assert set(enc["aggregation"].to_pylist()) == {
        "gigapath-slide (global-pool, positions level0/256)"}
    assert set(enc["source_model"].to_pylist()) == {"gigapath"}
    assert all(enc["random_weights"].to_pylist())

    # Independent of the sink: the same encoder on the committed tiles, in tiling order.
    tiles = read_tiles(out, model="gigapath")
    weights = resolve_weights(SlideEncoderConfig(**slide_cfg), StorageConfig(),
                              spec=get_slide_model("gigapath-slide"))
    stage = SlideEncoderStage(SlideEncoderConfig(**slide_cfg, device="cpu"), weights)
    for sid in ("a", "b"):
        t = tiles.filter(pc.equal(tiles["slide_id"], sid)).sort_by("tile_index")
        coords = np.stack([np.array(t["x"]), np.array(t["y"])], axis=1)
        expect = stage(embeddings(t), coords)
        for layer in (11, 12):
            row = enc.filter(pc.and_(pc.equal(enc["slide_id"], sid),
                                     pc.equal(enc["layer"], layer)))
            np.testing.assert_allclose(embeddings(row)[0].astype(np.float32),
                                       expect[layer].astype(np.float32), atol=1e-2, rtol=1e-2)
        assert not np.allclose(expect[11], expect[12])
    assert len(tiles) == 3

    again = run_job(cfg)
    assert again["plan"]["slides_to_process"] == 0
