"""A slide encoder other than Prov-GigaPath inside a job: CHIEF on CTransPath tiles at its own
tile spec (256 px at 1.0 mpp), fed per slide and committed as slides finish."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from jobkit import embeddings, write_manifest
from slidegen import write_pyramid_svs

from pipeline.config import SlideEncoderConfig, StorageConfig, build_config
from pipeline.models.weights import resolve_weights
from pipeline.run import run_job
from pipeline.sink import read_slides, read_tiles
from pipeline.slide_encode import SlideEncoderStage, get_slide_model

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]


def test_chief_slide_embeddings_from_a_job(tmp_path: Path) -> None:
    # 0.5 mpp scans read at 1.0 mpp: 2 and 3 tiles of 256 px.
    for name, seed, width in (("a", 1, 1100), ("b", 2, 1620)):
        write_pyramid_svs(tmp_path / f"{name}.svs", width=width, height=600, mpp=0.5,
                          levels=(1,), background=False, seed=seed)
    manifest = write_manifest(tmp_path / "m.csv", [
        {"slide_id": n, "uri": str(tmp_path / f"{n}.svs"), "cohort": "c"} for n in ("a", "b")])
    out = str(tmp_path / "lake")
    slide_cfg = {"id": "chief", "weights": "random"}
    cfg = build_config({
        "manifest": str(manifest), "output": out, "errors_flush_seconds": 1.0,
        "tiling": {"mpp": 1.0, "tile_size": 256, "chunk_tiles": 2},
        "models": [{"id": "ctranspath", "weights": "random", "batch_size": 8,
                    "slide_encoder": slide_cfg}]})
    record = run_job(cfg)
    assert record["status"] == "succeeded", record
    assert record["counts"]["committed"] == {"ctranspath": 2, "chief": 2}

    enc = read_slides(out, model="chief")
    assert enc.schema.field("embedding").type.list_size == 768
    assert sorted(zip(enc["slide_id"].to_pylist(), enc["layer"].to_pylist(), strict=True)) == [
        ("a", 1), ("b", 1)]
    assert set(enc["source_model"].to_pylist()) == {"ctranspath"}
    assert set(enc["aggregation"].to_pylist()) == {"chief (attention-mil)"}
    assert all(enc["random_weights"].to_pylist())

    # Independent of the sink: the same encoder on the committed tiles.
    tiles = read_tiles(out, model="ctranspath")
    assert len(tiles) == 5
    spec = get_slide_model("chief")
    stage = SlideEncoderStage(SlideEncoderConfig(**slide_cfg, device="cpu"),
                              resolve_weights(SlideEncoderConfig(**slide_cfg), StorageConfig(),
                                              spec=spec))
    for sid in ("a", "b"):
        t = tiles.filter(pc.equal(tiles["slide_id"], sid)).sort_by("tile_index")
        coords = np.stack([np.array(t["x"]), np.array(t["y"])], axis=1)
        expect = stage(embeddings(t), coords)[1]
        row = enc.filter(pc.equal(enc["slide_id"], sid))
        np.testing.assert_allclose(embeddings(row)[0].astype(np.float32),
                                   expect.astype(np.float32), atol=1e-2, rtol=1e-2)
        # CHIEF's embedding is a convex combination of the slide's tile features.
        tile_emb = embeddings(t).astype(np.float32)
        assert (expect >= tile_emb.min(0) - 1e-2).all() and (expect <= tile_emb.max(0) + 1e-2
                                                              ).all()

    again = run_job(cfg)
    assert again["plan"]["slides_to_process"] == 0
