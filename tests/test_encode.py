"""Encoder stage: batch contract, row selection and equality with running the model directly."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import encode
from pipeline.config import ModelConfig, StorageConfig
from pipeline.encode import (
    PinnedStaging,
    TileEncoder,
    default_micro_batch,
    embedding_column,
    encode_tiles,
    micro_batch_slices,
    node_column,
    rows_for_model,
    select_device,
)
from pipeline.models import registry
from pipeline.models.preprocess import preprocess
from pipeline.models.weights import WeightsRef, load_model, random_seed, resolve_weights
from pipeline.placement import ray_node_id

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
    return TileEncoder(cfg, ref, StorageConfig())


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
    # the node that encoded them: this process's Ray node ("" when Ray is not up here)
    assert list(out[node_column("kaiko-vits16")]) == [ray_node_id()] * 5
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
    other = TileEncoder(cfg, ref)
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
    assert encode.cpu_threads(3) == 3
    assert encode.cpu_threads() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert encode.cpu_threads() == 2 and encode.cpu_threads(3) == 3


# ---- micro-batching and the pinned staging ring ---------------------------------------------

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def whole_batch(encoder: TileEncoder) -> tuple[np.ndarray, np.ndarray]:
    """Five distinct tiles and their embeddings from one whole-batch forward (the reference)."""
    tiles = real_tiles()
    emb = encode_tiles(KAIKO, encoder.model, tiles, CPU, "fp32")
    # Rows must differ clearly, or a mix-up of micro-batch order could not be seen.
    gaps = [np.abs(emb[i].astype(np.float32) - emb[j]).max()
            for i in range(len(emb)) for j in range(i)]
    assert min(gaps) > 0.05
    return tiles, emb


@pytest.mark.parametrize(("n", "micro"), [(1, 4), (5, 2), (7, 3), (64, 32), (100, 32),
                                          (101, 25), (33, 32), (8, 8), (3, 100)])
def test_micro_batch_slices_cover_in_order(n: int, micro: int) -> None:
    slices = micro_batch_slices(n, micro)
    bounds = [(s.start, s.stop) for s in slices]
    assert bounds[0][0] == 0 and bounds[-1][1] == n and all(s.step is None for s in slices)
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False))
    sizes = [s.stop - s.start for s in slices]
    assert len(slices) == -(-n // micro) and max(sizes) <= micro
    assert max(sizes) - min(sizes) <= 1  # near-equal: no runt last micro-batch


def test_micro_batch_defaults() -> None:
    assert micro_batch_slices(10) == [slice(0, 10)]  # None: the whole batch
    assert micro_batch_slices(0, 4) == []
    with pytest.raises(ValueError, match="micro_batch"):
        micro_batch_slices(5, 0)
    assert default_micro_batch(10) == 32 and len(micro_batch_slices(10, 32)) == 1
    assert default_micro_batch(64) == 32
    assert default_micro_batch(1000) == 250 and len(micro_batch_slices(1000, 250)) == 4


def test_micro_batched_equals_whole_batch(encoder: TileEncoder, whole_batch) -> None:
    tiles, whole = whole_batch
    for micro in (2, 3):  # 5 tiles: 2+2+1 and 3+2, neither divides the batch
        emb = encode_tiles(KAIKO, encoder.model, tiles, CPU, "fp32", micro_batch=micro)
        assert emb.dtype == np.float16 and emb.shape == whole.shape
        np.testing.assert_allclose(emb.astype(np.float32), whole.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


def test_encoder_micro_batch_with_row_selection(encoder: TileEncoder, whole_batch,
                                                monkeypatch) -> None:
    tiles, whole = whole_batch
    monkeypatch.setattr(encoder, "micro_batch", 2)
    keep = np.array([True, True, False, True, True])
    batch = {"tile": tiles, "models": np.array(
        ["kaiko-vits16" if k else "uni" for k in keep], dtype=object)}
    emb = encoder(batch)[embedding_column("kaiko-vits16")]
    assert not emb[~keep].any()
    np.testing.assert_allclose(emb[keep].astype(np.float32), whole[keep].astype(np.float32),
                               rtol=2e-3, atol=2e-3)


class _Event:
    def __init__(self, log: list[tuple], eid: int) -> None:
        self.log, self.id = log, eid

    def synchronize(self) -> None:
        self.log.append(("sync", self.id))


def test_staging_ring_reuses_and_grows() -> None:
    log: list[tuple] = []
    staging = PinnedStaging(slots=2, pin=False)
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8) for _ in range(3))
    va, vb = staging.stage(0, a), staging.stage(1, b)
    assert staging.capacity >= a.nbytes and staging.buffer is not None
    ptr = staging.buffer.data_ptr()
    np.testing.assert_array_equal(va.numpy(), a)  # slot 1 did not overwrite slot 0
    np.testing.assert_array_equal(vb.numpy(), b)
    staging.in_flight(0, _Event(log, 0))
    staging.in_flight(1, _Event(log, 1))
    vc = staging.stage(2, c[:2])  # slot 0 again: waits for its copy, not for slot 1's
    assert log == [("sync", 0)]
    np.testing.assert_array_equal(vc.numpy(), c[:2])
    np.testing.assert_array_equal(vb.numpy(), b)
    assert staging.buffer.data_ptr() == ptr  # smaller micro-batch: same memory
    big = rng.integers(0, 256, (2, 8 * 2**20 // (64 * 3) + 1, 64, 3), dtype=np.uint8)
    staging.in_flight(0, _Event(log, 2))
    vbig = staging.stage(3, big)  # larger than a slot: grows after every pending copy is done
    assert {("sync", 1), ("sync", 2)} <= set(log)
    assert staging.capacity >= big.nbytes and staging.capacity % 2**20 == 0
    np.testing.assert_array_equal(vbig.numpy(), big)
    with pytest.raises(ValueError, match="uint8"):
        staging.stage(0, a.astype(np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_micro_batched_equals_whole_batch() -> None:
    cuda = torch.device("cuda")
    ref = WeightsRef(source="random", identity=f"random:seed={random_seed(KAIKO.id)}",
                     sha256=None, random=True)
    model = load_model(KAIKO, ref, StorageConfig(), cuda)
    tiles = np.concatenate([real_tiles()] * 15)  # 75 tiles
    whole = encode_tiles(KAIKO, model, tiles, cuda, "fp16", micro_batch=len(tiles))
    staging = PinnedStaging()
    for micro in (7, 32):  # 11 micro-batches (slots reused), then 3 x 25 (buffer regrown)
        for _ in range(2):  # second pass reuses the staging buffer
            emb = encode_tiles(KAIKO, model, tiles, cuda, "fp16", micro, staging)
            np.testing.assert_allclose(emb.astype(np.float32), whole.astype(np.float32),
                                       rtol=1e-2, atol=1e-2)
    with torch.inference_mode():
        x = preprocess(torch.from_numpy(tiles[:5]).to(cuda), KAIKO)
        direct = registry.embed(KAIKO, model, x).float().cpu().numpy()
    np.testing.assert_allclose(whole[:5].astype(np.float32), direct, rtol=2e-2, atol=2e-2)


class _CastCounter(contextlib.AbstractContextManager):
    """Counts dtype casts (aten.to.dtype, aten._to_copy) applied to the given tensors."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        ptrs = {t.data_ptr() for t in tensors}
        casts = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                if func in casts and args[0].data_ptr() in ptrs:
                    counter.casts += 1
                return func(*args, **(kwargs or {}))

        self.casts, self.mode = 0, Mode()

    def __enter__(self) -> _CastCounter:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def test_weights_are_cast_once_at_load_not_every_forward() -> None:
    """bf16 autocast on CPU runs the same weight casts as fp16 autocast on CUDA."""
    spec = registry.get("kaiko-vits16")
    ref = resolve_weights(ModelConfig(id="kaiko-vits16", weights="random"), StorageConfig())
    model = load_model(spec, ref, StorageConfig(), torch.device("cpu"))
    x = preprocess(torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8), spec)

    def three_forwards() -> tuple[int, torch.Tensor]:
        params = list(model.parameters())
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), \
                _CastCounter(params) as counter:
            outs = [registry.embed(spec, model, x) for _ in range(3)]
        return counter.casts, outs[-1]

    before, expected = three_forwards()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert before >= 3 * linears  # every forward re-cast every matmul weight
    cast = encode.cast_matmul_weights(model, torch.bfloat16)
    assert cast >= 2 * linears
    after, got = three_forwards()
    assert after == 0
    assert torch.equal(got, expected)  # the same bits: autocast used these very casts
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.pos_embed.dtype == torch.float32
