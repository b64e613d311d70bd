"""Registry, preprocessing and weights loading for the tile encoders (CPU, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file

try:  # huggingface_hub >= 2 ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from pipeline.config import ModelConfig, StorageConfig
from pipeline.models import registry, weights
from pipeline.models.preprocess import (
    denormalise,
    preprocess,
    reference_preprocess_pil,
    resize_like_pil,
)
from pipeline.models.weights import WeightsError, WeightsRef, load_model, resolve_weights

TILES = Path(__file__).parent / "data" / "tiles"
CPU = torch.device("cpu")
KAIKO = registry.get("kaiko-vits16")
UNI = registry.get("uni")


def reference_model(spec: registry.TileModelSpec, seed: int = 0) -> torch.nn.Module:
    """The model-card construction, independent of registry.build."""
    torch.manual_seed(seed)
    return timm.create_model(spec.timm_name, pretrained=False, **registry.arch_kwargs(spec)).eval()


def tile_images() -> dict[str, Image.Image]:
    return {p.name: Image.open(p).convert("RGB") for p in sorted(TILES.iterdir())
            if p.suffix in {".png", ".tif"}}


@pytest.fixture(scope="module")
def uni_random() -> torch.nn.Module:
    """UNI is 300M params: ~10 s and ~1.2 GB to build on CPU, so once per module."""
    ref = resolve_weights(ModelConfig(id="uni", weights="random"), StorageConfig())
    return load_model(UNI, ref, StorageConfig(), CPU)


@pytest.fixture(scope="module")
def kaiko_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A reference kaiko model and its weights saved in the three supported layouts."""
    model = reference_model(KAIKO, seed=1)
    root = tmp_path_factory.mktemp("ckpt")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "kaiko.safetensors"))
    torch.save({"state_dict": state}, root / "kaiko.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, root / "pytorch_model.bin")
    return model, root


def sample(n: int = 2, size: int = 224) -> torch.Tensor:
    imgs = list(tile_images().values())[:n]
    arr = np.stack([np.asarray(im.resize((size, size), Image.BILINEAR)) for im in imgs])
    return preprocess(torch.from_numpy(arr), KAIKO)


# --- registry -----------------------------------------------------------------------------


def test_get_unknown_lists_known_ids() -> None:
    with pytest.raises(KeyError, match="kaiko-vits16.*uni"):
        registry.get("unii")
    with pytest.raises(ValidationError, match="unknown model"):
        ModelConfig(id="unii")
    assert ModelConfig(id="uni").id == "uni"


def test_specs_are_consistent() -> None:
    for spec in registry.MODELS.values():
        assert spec.family in registry.BUILDERS and spec.embedding in registry.RECIPES
        assert spec.resize_size >= spec.input_size and len(spec.mean) == len(spec.std) == 3
        if spec.benchmark:  # bench-null: no network, nothing to download
            assert "benchmark/test model" in spec.licence and spec.hub_repo is None
            continue
        assert spec.licence and spec.hub_repo and spec.hub_filename
    assert UNI.gated and "HF_TOKEN" in UNI.licence
    assert "(verify)" in KAIKO.licence


# --- embedding recipe -----------------------------------------------------------------------


def manual_cls(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS token after the final norm, computed layer by layer (independent of embed())."""
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.norm_pre(t)
    for block in model.blocks:
        t = block(t)
    return model.norm(t)[:, 0]


def test_cls_recipe_kaiko() -> None:
    model = reference_model(KAIKO)
    x = sample(3)
    with torch.inference_mode():
        got = registry.embed(KAIKO, model, x)
        assert got.shape == (3, 384)
        torch.testing.assert_close(got, manual_cls(model, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, model.forward_features(x)[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)  # num_classes=0: pooled CLS


def test_cls_recipe_uni(uni_random: torch.nn.Module) -> None:
    x = sample(1)
    with torch.inference_mode():
        got = registry.embed(UNI, uni_random, x)
        assert got.shape == (1, 1024)
        torch.testing.assert_close(got, manual_cls(uni_random, x), rtol=1e-4, atol=1e-4)


def test_cls_patch_mean_recipe_plugs_in() -> None:
    spec = registry.TileModelSpec(**{**KAIKO.__dict__, "id": "t", "embedding": "cls_patch_mean",
                                     "dim": 768})
    model = reference_model(KAIKO)
    x = sample(1)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
        torch.testing.assert_close(registry.embed(spec, model, x), expected)


# --- preprocessing ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", sorted(registry.MODELS))
def test_device_preprocess_gives_the_model_cards_pixels(model_id: str) -> None:
    """PIL's bytes exactly, up-, down- and not resampled: only float normalisation differs."""
    spec = registry.get(model_id)
    sizes = set()
    for name, img in tile_images().items():
        dev = preprocess(torch.from_numpy(np.asarray(img).copy())[None], spec)[0]
        ref = reference_preprocess_pil(img, spec)
        assert dev.shape == ref.shape == (3, spec.input_size, spec.input_size)
        pixels = (denormalise(dev, spec) * 255, denormalise(ref, spec) * 255)
        assert torch.equal(*(p.round() for p in pixels)), name
        torch.testing.assert_close(dev, ref, rtol=0, atol=1e-6)
        sizes.add(img.size[0])
    assert sizes >= {128, 224, 256}  # up, none, down


@pytest.mark.parametrize("n_in, n_out", [(512, 448), (128, 224), (1024, 224), (37, 500)])
@pytest.mark.parametrize("mode, pil_mode", [("bilinear", Image.BILINEAR),
                                            ("bicubic", Image.BICUBIC)])
@pytest.mark.parametrize("kernel", ["gemm", "taps"])
def test_resize_is_pils_integer_arithmetic(n_in: int, n_out: int, mode: str, pil_mode: int,
                                           kernel: str) -> None:
    """Both exact kernels (float64 matmul; int32 taps for weak-FP64 GPUs) give PIL's bytes;
    a float resize rounded once per pass does not (PIL's quantised weights decide ties)."""
    rng = np.random.default_rng(n_in * n_out)
    tiles = rng.integers(0, 256, (2, n_in, n_in, 3), dtype=np.uint8)
    ref = np.stack([np.asarray(Image.fromarray(t).resize((n_out, n_out), pil_mode))
                    for t in tiles])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    got = resize_like_pil(x, (n_out, n_out), mode, kernel).permute(0, 2, 3, 1)
    assert np.array_equal(got.numpy(), ref)
    if (n_in, n_out) == (128, 224):  # 7/4: weights like 9/14 land values on ties
        y = x.float()
        for size in ((n_in, n_out), (n_out, n_out)):
            y = torch.nn.functional.interpolate(y, size=size, mode=mode, antialias=True,
                                                align_corners=False)
            y = (y + 0.5).floor().clamp(0, 255)
        assert not np.array_equal(y.permute(0, 2, 3, 1).numpy(), ref)


def test_preprocess_without_resize_is_exact_normalisation() -> None:
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    got = preprocess(tiles, UNI)
    mean = torch.tensor(UNI.mean).view(1, 3, 1, 1)
    std = torch.tensor(UNI.std).view(1, 3, 1, 1)
    expected = (tiles.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --- weights: resolve and load ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["kaiko.safetensors", "kaiko.pth", "pytorch_model.bin"])
def test_checkpoint_roundtrip_is_exact(kaiko_ckpt, name: str) -> None:
    reference, root = kaiko_ckpt
    ref = resolve_weights(ModelConfig(id="kaiko-vits16", weights=str(root / name)),
                          StorageConfig())
    assert ref.identity == f"sha256:{weights.file_sha256(root / name)}" and not ref.random
    model = load_model(KAIKO, ref, StorageConfig(), CPU)
    assert not model.training
    for (k, a), (k2, b) in zip(reference.state_dict().items(), model.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = sample(2)
    with torch.inference_mode():
        assert torch.equal(registry.embed(KAIKO, model, x), reference(x))


def test_directory_finds_the_hub_filename(kaiko_ckpt, tmp_path: Path) -> None:
    _, root = kaiko_ckpt
    (tmp_path / "model.safetensors").write_bytes((root / "kaiko.safetensors").read_bytes())
    ref = resolve_weights(ModelConfig(id="kaiko-vits16", weights=str(tmp_path)), StorageConfig())
    assert ref.source.endswith("model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="holds none of pytorch_model.bin, model.safetensors"):
        resolve_weights(ModelConfig(id="uni", weights=str(empty)), StorageConfig())


def test_partial_checkpoint_names_missing_and_unexpected(kaiko_ckpt, tmp_path: Path) -> None:
    reference, _ = kaiko_ckpt
    state = dict(reference.state_dict())
    del state["blocks.3.attn.qkv.weight"]
    state["bogus.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 10, 384)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    ref = resolve_weights(ModelConfig(id="kaiko-vits16", weights=str(path)), StorageConfig())
    with pytest.raises(WeightsError) as info:
        load_model(KAIKO, ref, StorageConfig(), CPU)
    msg = str(info.value)
    assert "1 missing keys: blocks.3.attn.qkv.weight" in msg
    assert "1 unexpected keys: bogus.weight" in msg
    assert "pos_embed (1, 10, 384) vs (1, 197, 384)" in msg


def test_sha256_mismatch_reports_both_digests(kaiko_ckpt) -> None:
    _, root = kaiko_ckpt
    path = root / "kaiko.safetensors"
    actual = weights.file_sha256(path)
    with pytest.raises(WeightsError, match=f"expected {'0' * 64}.*file has {actual}"):
        resolve_weights(ModelConfig(id="kaiko-vits16", weights=str(path), sha256="0" * 64),
                        StorageConfig())
    ok = resolve_weights(ModelConfig(id="kaiko-vits16", weights=str(path), sha256=actual),
                         StorageConfig())
    assert ok.sha256 == actual


def test_missing_weights_file_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found: stage the file or use weights: hub"):
        resolve_weights(ModelConfig(id="uni", weights=str(tmp_path / "uni.bin")), StorageConfig())


def test_random_weights_are_deterministic_and_per_model(uni_random: torch.nn.Module) -> None:
    cfg = ModelConfig(id="kaiko-vits16", weights="random")
    ref = resolve_weights(cfg, StorageConfig())
    assert ref.random and ref.identity.startswith("random:seed=")
    rng = torch.get_rng_state()
    a = load_model(KAIKO, ref, StorageConfig(), CPU)
    b = load_model(KAIKO, resolve_weights(cfg, StorageConfig()), StorageConfig(), CPU)
    assert torch.equal(rng, torch.get_rng_state()), "global RNG disturbed"
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    uni_ref = resolve_weights(ModelConfig(id="uni", weights="random"), StorageConfig())
    assert uni_ref.identity != ref.identity
    n = 384
    assert not torch.equal(a.cls_token.flatten()[:n], uni_random.cls_token.flatten()[:n])
    assert not torch.equal(a.patch_embed.proj.weight.flatten()[:1000],
                           uni_random.patch_embed.proj.weight.flatten()[:1000])


def test_fsspec_url_downloads_once_into_cache(kaiko_ckpt, monkeypatch, tmp_path: Path) -> None:
    reference, root = kaiko_ckpt
    monkeypatch.setenv("WSI_WEIGHTS_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    data = (root / "kaiko.safetensors").read_bytes()
    fs.pipe("/weights-test/kaiko.safetensors", data)
    url = "memory://weights-test/kaiko.safetensors"
    sha = weights.file_sha256(root / "kaiko.safetensors")
    try:
        unpinned = resolve_weights(ModelConfig(id="kaiko-vits16", weights=url), StorageConfig())
        assert unpinned.identity.startswith(f"url:{url}:") and f"size={len(data)}" in \
            unpinned.identity
        ref = resolve_weights(ModelConfig(id="kaiko-vits16", weights=url, sha256=sha),
                              StorageConfig())
        assert ref.identity == f"sha256:{sha}"
        model = load_model(KAIKO, ref, StorageConfig(), CPU)
        assert torch.equal(model.pos_embed, reference.pos_embed)
        assert (tmp_path / "cache" / sha / "kaiko.safetensors").is_file()
        fs.rm("/weights-test/kaiko.safetensors")  # second load must come from the node cache
        load_model(KAIKO, ref, StorageConfig(), CPU)
        bad = WeightsRef(source="memory://weights-test/bad.safetensors",
                         identity="sha256:" + "1" * 64, sha256="1" * 64, random=False)
        fs.pipe("/weights-test/bad.safetensors", data)
        with pytest.raises(WeightsError, match="sha256 mismatch"):
            load_model(KAIKO, bad, StorageConfig(), CPU)
        assert not any((tmp_path / "cache" / ("1" * 64)).iterdir())  # no partial file left
        with pytest.raises(WeightsError, match="not found: stage the file"):
            resolve_weights(ModelConfig(id="kaiko-vits16", weights="memory://weights-test/no"),
                            StorageConfig())
    finally:
        if fs.exists("/weights-test"):
            fs.rm("/weights-test", recursive=True)


# --- weights: Hugging Face hub (no network: offline cache and injected failures) -------------


def fake_hf_cache(root: Path, repo: str, filename: str, data: bytes, sha: str) -> str:
    commit = "c" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "blobs" / sha).write_bytes(data)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    os.symlink(base / "blobs" / sha, snap / filename)
    return commit


def test_hub_offline_uses_local_cache(kaiko_ckpt, monkeypatch, tmp_path: Path) -> None:
    reference, root = kaiko_ckpt
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = ModelConfig(id="kaiko-vits16", weights="hub")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE is set.*stage the file"):
        resolve_weights(cfg, StorageConfig())
    path = root / "kaiko.safetensors"
    sha = weights.file_sha256(path)
    commit = fake_hf_cache(tmp_path, KAIKO.hub_repo, KAIKO.hub_filename, path.read_bytes(), sha)
    ref = resolve_weights(cfg, StorageConfig())
    assert ref.source == f"hub:{KAIKO.hub_repo}@{commit}/{KAIKO.hub_filename}"
    assert ref.identity == f"{ref.source}:{sha}" and ref.sha256 == sha
    model = load_model(KAIKO, ref, StorageConfig(), CPU)
    assert torch.equal(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


def _http_error(cls: type, status: int) -> Exception:
    request = httpx.Request("HEAD", "https://huggingface.co/x")
    return cls("boom", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: _http_error(hf_errors.GatedRepoError, 401),
         r"gated or unauthorised \(HF_TOKEN is not set\)\. Request access at "
         r"https://huggingface\.co/MahmoodLab/UNI"),
        (lambda: _http_error(hf_errors.RepositoryNotFoundError, 404), "repository not found"),
        (lambda: _http_error(hf_errors.RemoteEntryNotFoundError, 404),
         "file 'pytorch_model.bin' not found"),
        (lambda: ConnectionError("no route to host"),
         "hub unreachable.*offline or no network.*stage the file"),
    ],
)
def test_hub_errors_are_actionable(monkeypatch, tmp_path: Path, error, expected: str) -> None:
    import huggingface_hub

    def fail(*args, **kwargs):
        raise error()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fail)
    with pytest.raises(WeightsError, match=expected):
        resolve_weights(ModelConfig(id="uni", weights="hub"), StorageConfig())


# --- weights: checked in the driver before Ray starts -----------------------------------------


def _ref(path: Path) -> WeightsRef:
    return resolve_weights(ModelConfig(id="kaiko-vits16", weights=str(path)), StorageConfig())


@pytest.mark.parametrize("name", ["kaiko.safetensors", "kaiko.pth", "pytorch_model.bin"])
def test_driver_check_accepts_every_layout(kaiko_ckpt, name: str) -> None:
    _, root = kaiko_ckpt
    assert weights.check_checkpoint(KAIKO, _ref(root / name), StorageConfig()) is True


@pytest.mark.parametrize("name", ["kaiko.safetensors", "kaiko.pth"])
def test_driver_check_refuses_truncated_and_corrupt_files(kaiko_ckpt, tmp_path: Path,
                                                         name: str) -> None:
    _, root = kaiko_ckpt
    data = (root / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated|cannot read checkpoint"):
        weights.check_checkpoint(KAIKO, _ref(cut), StorageConfig())
    junk = tmp_path / f"junk-{name}"
    junk.write_bytes(b"\x00\x01 not a checkpoint" * 100)
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        weights.check_checkpoint(KAIKO, _ref(junk), StorageConfig())


def test_driver_check_names_key_differences(kaiko_ckpt, tmp_path: Path) -> None:
    reference, _ = kaiko_ckpt
    state = {k: v for k, v in reference.state_dict().items() if k != "norm.weight"}
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match="1 missing keys: norm.weight"):
        weights.check_checkpoint(KAIKO, _ref(path), StorageConfig())
    # a UNI checkpoint given for kaiko: every shape differs, said before any actor starts
    with pytest.raises(WeightsError, match="does not match"):
        weights.check_checkpoint(UNI, _ref(kaiko_ckpt[1] / "kaiko.safetensors"),
                                 StorageConfig())


def test_driver_check_reads_only_the_header_of_remote_safetensors(
        kaiko_ckpt, s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    import boto3

    monkeypatch.setenv("WSI_WEIGHTS_CACHE", str(tmp_path / "cache"))
    _, root = kaiko_ckpt
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.upload_file(str(root / "kaiko.safetensors"), s3_bucket, "w/kaiko.safetensors")
    data = (root / "kaiko.safetensors").read_bytes()
    s3.put_object(Bucket=s3_bucket, Key="w/cut.safetensors", Body=data[: len(data) - 100])
    storage = StorageConfig(endpoint_url=s3_endpoint)
    good = resolve_weights(ModelConfig(id="kaiko-vits16",
                                       weights=f"s3://{s3_bucket}/w/kaiko.safetensors"), storage)
    assert weights.check_checkpoint(KAIKO, good, storage) is True
    assert not (tmp_path / "cache").exists()  # nothing downloaded: the header was enough
    cut = resolve_weights(ModelConfig(id="kaiko-vits16",
                                      weights=f"s3://{s3_bucket}/w/cut.safetensors"), storage)
    with pytest.raises(WeightsError, match=r"is truncated: \d+ bytes"):
        weights.check_checkpoint(KAIKO, cut, storage)


def _plain(value: object) -> bool:
    """Data a config check can read without torch: no classes, callables or tensors."""
    from pipeline.models.specs import Layer

    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Layer):
        return isinstance(value.path, str) and all(_plain(v) for v in value.kwargs.values())
    return value is None or isinstance(value, (bool, int, float, str))


def test_model_facts_are_plain_data_and_layers_resolve_in_the_builders() -> None:
    from timm.layers import SwiGLUPacked

    from pipeline.models import specs

    assert registry.MODELS is specs.MODELS and registry.get is specs.get
    for spec in specs.MODELS.values():
        assert all(_plain(v) for v in spec.timm_kwargs.values()), spec.id
        for value in registry.arch_kwargs(spec).values():  # every named layer imports
            assert not isinstance(value, specs.Layer), spec.id
    virchow = registry.arch_kwargs(registry.get("virchow"))
    assert virchow["mlp_layer"] is SwiGLUPacked and virchow["act_layer"] is torch.nn.SiLU
    norm = registry.arch_kwargs(registry.get("phikon"))["norm_layer"]
    assert norm.func is torch.nn.LayerNorm and norm.keywords == {"eps": 1e-12}
    assert norm(8).eps == 1e-12
    with pytest.raises(ValueError, match="dotted import path"):
        registry.resolve_layer(specs.Layer("SiLU"))


def test_slide_encoder_facts_live_with_the_tile_models() -> None:
    from pipeline import slide_encode
    from pipeline.models import specs

    assert slide_encode.get_slide_model is specs.get_slide_model
    assert registry.SLIDE_MODELS is specs.SLIDE_MODELS
    for spec in specs.SLIDE_MODELS.values():
        assert spec.input_model in specs.MODELS
        assert specs.get(spec.input_model).dim == spec.input_dim
        assert spec.family in registry.SLIDE_FAMILIES, spec.id
        assert spec.positions in (None, *specs.POSITION_RULES), spec.id
    with pytest.raises(KeyError, match="known: chief, gigapath-slide, madeleine, prism, titan"):
        specs.get_slide_model("nope")
