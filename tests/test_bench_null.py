"""bench-null: the zero-cost benchmark tile encoder, through the encoder stage (CPU, no network)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import encode
from pipeline.config import ModelConfig, StorageConfig, build_config
from pipeline.models import registry
from pipeline.models.preprocess import preprocess
from pipeline.models.weights import WeightsError, load_model, resolve_weights

TILES = Path(__file__).parent / "data" / "tiles"
CPU = torch.device("cpu")
SPEC = registry.get("bench-null")
BENCHMARK_TEXT = "benchmark/test model: no network, embeddings meaningless"


def numpy_reference(tiles: np.ndarray) -> np.ndarray:
    """Written from the definition, independent of bench_null.py: 4x4 grid mean RGB in 0..1,
    ordered (cell row, cell column, channel), times default_rng(0)'s (48, 1024) / sqrt(48)."""
    n, h, w, c = tiles.shape
    cells = tiles.astype(np.float64).reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4))
    features = cells.reshape(n, 48) / 255.0
    proj = np.random.default_rng(0).standard_normal((48, 1024), dtype=np.float32)
    return features @ (proj.astype(np.float64) / np.sqrt(48.0))


def random_tiles(n: int, size: int = 224, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def real_tiles() -> np.ndarray:
    imgs = [Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)
            for p in sorted(TILES.iterdir()) if p.suffix in {".png", ".tif"}]
    return np.stack([np.asarray(im) for im in imgs[:3]])


def build_random() -> torch.nn.Module:
    ref = resolve_weights(ModelConfig(id="bench-null", weights="random"), StorageConfig())
    return load_model(SPEC, ref, StorageConfig(), CPU)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_random()


def encode_stage(model: torch.nn.Module, tiles: np.ndarray, **batch) -> np.ndarray:
    out = encode.encode_batch({"tile": tiles, **batch}, SPEC, model, CPU, "fp32")
    return out[encode.embedding_column("bench-null")]


# --- registry entry ------------------------------------------------------------------------


def test_entry_is_a_marked_benchmark_model() -> None:
    assert SPEC.benchmark and SPEC.dim == 1024 and SPEC.params == 0
    assert BENCHMARK_TEXT in SPEC.licence and BENCHMARK_TEXT in SPEC.notes
    assert not SPEC.gated and SPEC.hub_repo is None
    assert registry.tiling_spec(SPEC) == (224, 0.5) == registry.tiling_spec(
        registry.get("kaiko-vits16"))
    assert SPEC.preprocess_on == "model"  # the encoder stage hands it the uint8 tiles
    bench = {s.id for s in registry.MODELS.values() if s.benchmark}
    assert bench == {"bench-null", "bench-null-256", "bench-null-512"}
    assert [registry.tiling_spec(registry.get(m)) for m in sorted(bench)] == \
        [(224, 0.5), (256, 0.5), (512, 0.5)]


def test_not_in_the_readme_table_but_listed_as_benchmark(capsys) -> None:
    from pipeline.cli import main

    assert "bench-null" not in registry.markdown_table()
    assert main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.startswith("bench-null "))
    assert BENCHMARK_TEXT in line


def test_no_learnable_parameters_and_meta_build() -> None:
    meta = registry.build(SPEC, device="meta")
    assert list(meta.parameters()) == [] and meta.projection.is_meta
    x = torch.empty(2, 3, 224, 224, device="meta")
    assert registry.embed(SPEC, meta, x).shape == (2, 1024)


# --- config and weights --------------------------------------------------------------------


def test_config_accepts_bench_null_with_random_weights() -> None:
    cfg = build_config({"manifest": "m.csv", "output": "out",
                        "models": [{"id": "bench-null", "weights": "random"}]})
    assert [(m.id, m.weights) for m in cfg.models] == [("bench-null", "random")]
    ref = resolve_weights(cfg.models[0], cfg.storage)
    assert ref.random and ref.identity.startswith("random:seed=")


def test_hub_weights_fail_before_any_slide() -> None:
    with pytest.raises(WeightsError, match="bench-null: no hub location"):
        resolve_weights(ModelConfig(id="bench-null", weights="hub"), StorageConfig())


# --- embeddings ----------------------------------------------------------------------------


def test_embedding_equals_numpy_pool_and_projection(model: torch.nn.Module) -> None:
    tiles = np.concatenate([real_tiles(), random_tiles(3),
                            np.zeros((1, 224, 224, 3), np.uint8),
                            np.full((1, 224, 224, 3), 255, np.uint8)])
    expected = numpy_reference(tiles)
    with torch.inference_mode():
        exact = registry.embed(SPEC, model, torch.from_numpy(tiles)).double().numpy()
    np.testing.assert_allclose(exact, expected, rtol=0, atol=2e-5)
    got = encode_stage(model, tiles)  # the encoder stage: float16 out
    assert got.shape == (len(tiles), 1024) and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size", [256, 1024])  # 64-row cells (int16 sums), 256 (int32)
def test_other_tile_sizes(model: torch.nn.Module, size: int) -> None:
    tiles = random_tiles(2 if size == 1024 else 5, size)
    with torch.inference_mode():
        got = registry.embed(SPEC, model, torch.from_numpy(tiles)).double().numpy()
    np.testing.assert_allclose(got, numpy_reference(tiles), rtol=0, atol=2e-5)


def test_gpu_reduction_equals_the_cpu_one() -> None:
    from pipeline.models import bench_null

    for size in (224, 1024):
        x = torch.from_numpy(random_tiles(5 if size == 224 else 1, size))
        assert torch.equal(bench_null._cell_sums_direct(x), bench_null._cell_sums_cpu(x))


def test_generic_preprocessing_gives_the_same_embedding(model: torch.nn.Module) -> None:
    tiles = random_tiles(4)
    with torch.inference_mode():
        raw = registry.embed(SPEC, model, torch.from_numpy(tiles))
        pixels = preprocess(torch.from_numpy(tiles), SPEC)  # mean 0, std 1: pixels / 255
        torch.testing.assert_close(registry.embed(SPEC, model, pixels), raw, rtol=0, atol=1e-5)
    forced = dataclasses.replace(SPEC, preprocess_on="device")
    via = encode.encode_batch({"tile": tiles}, forced, model, CPU, "fp32")["emb__bench-null"]
    np.testing.assert_allclose(via.astype(np.float32), encode_stage(model, tiles), atol=2e-3)


def test_shape_masking_and_empty(model: torch.nn.Module) -> None:
    tiles = random_tiles(5)
    models = np.array(["bench-null", "uni", "bench-null,uni", "uni", "bench-null"], object)
    got = encode_stage(model, tiles, models=models)
    assert got.shape == (5, 1024)
    assert not got[[1, 3]].any()
    np.testing.assert_array_equal(got[[0, 2, 4]], encode_stage(model, tiles[[0, 2, 4]]))
    assert encode_stage(model, tiles[:0]).shape == (0, 1024)


def test_deterministic_across_builds_and_processes(model: torch.nn.Module) -> None:
    tiles = random_tiles(8)
    torch.manual_seed(12345)  # the global torch RNG must not matter
    again = build_random()
    assert torch.equal(again.projection, model.projection)
    first = encode_stage(model, tiles)
    np.testing.assert_array_equal(encode_stage(again, tiles), first)
    code = ("import numpy as np, torch; from pipeline.models import registry; "
            "m = registry.build(registry.get('bench-null'), device='cpu'); "
            "t = np.random.default_rng(7).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8); "
            "print(registry.embed(registry.get('bench-null'), m, torch.from_numpy(t))"
            ".to(torch.float16).numpy().tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == first.tobytes().hex()


def test_tile_encoder_actor_class() -> None:
    ref = resolve_weights(ModelConfig(id="bench-null", weights="random"), StorageConfig())
    threads = torch.get_num_threads()
    try:
        enc = encode.TileEncoder(ModelConfig(id="bench-null", weights="random", device="cpu"),
                                 ref, drop_tiles=True, threads=1)
    finally:
        torch.set_num_threads(threads)  # the actor sets it process-wide
    tiles = random_tiles(3)
    out = enc({"tile": tiles, "models": np.array(["bench-null"] * 3, object)})
    assert "tile" not in out and out["emb__bench-null"].shape == (3, 1024)
    np.testing.assert_allclose(out["emb__bench-null"].astype(np.float64), numpy_reference(tiles),
                               rtol=1e-3, atol=1e-3)
    assert enc.info["weights_random"] and enc.info["precision"] == "fp32"
