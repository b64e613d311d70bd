"""Encoder stage: batch contract, row selection and equality with running the model directly."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import encode
from pipeline.config import ModelConfig, StorageConfig
from pipeline.encode import (
    TileEncoder,
    embedding_column,
    node_column,
    rows_for_model,
    select_device,
)
from pipeline.models import registry
from pipeline.models.preprocess import preprocess
from pipeline.models.weights import resolve_weights

TILES = Path(__file__).parent / "data" / "tiles"
KAIKO = registry.get("kaiko-vits16")


def real_tiles(size: int = 224) -> np.ndarray:
    """The five test tiles at one size (centre crop if larger, bilinear resize if smaller)."""
    out = []
    for path in sorted(TILES.iterdir()):
        if path.suffix not in {".png", ".tif"}:
            continue
        img = Image.open(path).convert("RGB")
        w, h = img.size
        if w >= size:
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        else:
            img = img.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img))
    return np.stack(out)


@pytest.fixture(scope="module")
def encoder() -> TileEncoder:
    cfg = ModelConfig(id="kaiko-vits16", weights="random", device="cpu")
    ref = resolve_weights(cfg, StorageConfig())
    return TileEncoder(cfg.model_dump(), dataclasses.asdict(ref), StorageConfig().model_dump())


def test_embedding_column() -> None:
    assert embedding_column("uni") == "emb__uni" == encode.EMB_PREFIX + "uni"


def test_rows_for_model_parses_lists() -> None:
    models = np.array(["kaiko-vits16", "uni", "uni,kaiko-vits16", "", " kaiko-vits16 , uni ",
                       b"kaiko-vits16", None, ["uni", "kaiko-vits16"], "kaiko-vits16x"],
                      dtype=object)
    assert rows_for_model(models, "kaiko-vits16").tolist() == [
        True, False, True, False, True, True, False, True, False]


def test_encoder_end_to_end_on_real_tiles(encoder: TileEncoder) -> None:
    tiles = real_tiles()
    assert tiles.shape == (5, 224, 224, 3)
    batch = {
        "tile": tiles,
        "models": np.array(["kaiko-vits16", "uni", "uni,kaiko-vits16", "", "kaiko-vits16,uni"],
                           dtype=object),
        "slide_id": np.array([f"s{i}" for i in range(5)], dtype=object),
        "x": np.arange(5, dtype=np.int64) * 224,
    }
    out = encoder(batch)
    col = embedding_column("kaiko-vits16")
    assert set(out) == set(batch) | {col, node_column("kaiko-vits16")}
    assert list(out[node_column("kaiko-vits16")]) == [""] * 5  # outside Ray: no node id
    for key in batch:  # pass-through columns are the very same arrays
        assert out[key] is batch[key]
    emb = out[col]
    assert emb.dtype == np.float16 and emb.shape == (5, 384)
    keep = np.array([True, False, True, False, True])
    assert not emb[~keep].any()
    assert np.isfinite(emb).all() and (np.abs(emb[keep]).sum(axis=1) > 0).all()
    with torch.inference_mode():
        direct = registry.embed(KAIKO, encoder.model,
                                preprocess(torch.from_numpy(tiles[keep]), KAIKO)).numpy()
    np.testing.assert_allclose(emb[keep].astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    assert encoder.info["device"] == "cpu" and encoder.info["precision"] == "fp32"
    assert encoder.info["weights_identity"].startswith("random:seed=")


def test_encoder_is_deterministic_across_actors(encoder: TileEncoder) -> None:
    cfg = ModelConfig(id="kaiko-vits16", weights="random", device="cpu")
    ref = resolve_weights(cfg, StorageConfig())
    other = TileEncoder(cfg.model_dump(), dataclasses.asdict(ref), {})
    batch = {"tile": real_tiles()[:2], "models": np.array(["kaiko-vits16"] * 2, dtype=object)}
    col = embedding_column("kaiko-vits16")
    np.testing.assert_array_equal(encoder(batch)[col], other(batch)[col])


def test_rows_for_other_models_are_not_computed(encoder: TileEncoder, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("encoded rows that did not ask for this model")

    monkeypatch.setattr(encode, "encode_tiles", boom)
    batch = {"tile": np.zeros((3, 32, 32, 3), np.uint8),
             "models": np.array(["uni", "", "uni"], dtype=object)}
    out = encoder(batch)
    assert out[embedding_column("kaiko-vits16")].shape == (3, 384)
    assert not out[embedding_column("kaiko-vits16")].any()
    empty = encoder({"tile": np.zeros((0, 224, 224, 3), np.uint8),
                     "models": np.array([], dtype=object)})
    assert empty[embedding_column("kaiko-vits16")].shape == (0, 384)


def test_bad_tile_dtype_is_rejected(encoder: TileEncoder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encoder({"tile": np.zeros((1, 224, 224, 3), np.float32),
                 "models": np.array(["kaiko-vits16"], dtype=object)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_device_selection_without_gpu(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.encode"):
        assert select_device("auto").type == "cpu"
    assert "no GPU visible to this actor; encoding on CPU" in caplog.text
    assert select_device("cpu").type == "cpu"
    with pytest.raises(RuntimeError, match="cuda requested but no GPU"):
        select_device("cuda")


def test_cpu_threads_defaults(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert encode.cpu_threads({"cpu_threads": 3}) == 3
    assert encode.cpu_threads({}) >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert encode.cpu_threads({}) == 2
