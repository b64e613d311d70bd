"""Slide encoders beyond Prov-GigaPath (TITAN, PRISM, CHIEF, MADELEINE) and the stage that
dispatches by spec: layouts, strict loading of the authors' key layouts, the maths against
naive references, positions, config validation, memory.

Each naive reference below is written from the authors' code (named in the spec's
``source``), independently of pipeline.models: float64, dense, explicit loops and masks, the
authors' own tensor layouts (dense feature grid, full ALiBi matrix, shared Perceiver layers,
einops channel split). Weights are random with non-trivial LayerNorms, so every parameter
matters; checkpoints are written by the tests in the authors' layouts.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_gigapath_slide import LargestTensor

from pipeline.config import ConfigError, SlideEncoderConfig, StorageConfig, build_config
from pipeline.models import chief, madeleine, prism, registry, specs, titan
from pipeline.models.weights import (
    WeightsError,
    check_slide_checkpoint,
    load_slide_model,
    load_state_dict_strict,
    resolve_weights,
)
from pipeline.slide_encode import (
    SlideEncoderStage,
    aggregation_label,
    position_rule,
    tile_positions,
    work_key_settings,
)

CPU = torch.device("cpu")
SPEC = {k: specs.get_slide_model(k) for k in ("titan", "prism", "chief", "madeleine")}


def randomise(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights where init would leave parameters trivial (LayerNorms 1/0, zero CLS,
    latents and queries), scaled so that attention is neither uniform nor one-hot."""
    torch.manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        v = torch.empty_like(v, device="cpu")
        if v.ndim == 1:
            v.copy_((1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn_like(v))
        else:
            fan_in = v.shape[-1]
            v.copy_(torch.randn_like(v) / math.sqrt(fan_in))
        state[k] = v
    model.load_state_dict(state, assign=True)
    return state


def ln(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    out = x @ sd[name + ".weight"].T
    return out + sd[name + ".bias"] if name + ".bias" in sd else out


def naive_softmax_attention(q, k, v, bias=None):
    logits = q @ k.T / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1) @ v


def naive_mha(q_in, kv_in, sd: dict, name: str, heads: int) -> torch.Tensor:
    """torch.nn.MultiheadAttention's maths, written out (packed in_proj, then out_proj)."""
    w = sd[name + ".in_proj_weight"]
    b = sd.get(name + ".in_proj_bias")
    dim = w.shape[1]
    wq, wk, wv = w.split(dim)
    bq, bk, bv = b.split(dim) if b is not None else (0, 0, 0)
    q, k, v = q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv
    d = dim // heads
    out = torch.cat([naive_softmax_attention(q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d],
                                             v[:, h * d:(h + 1) * d]) for h in range(heads)], 1)
    return lin(out, sd, name + ".out_proj")


# --- TITAN -------------------------------------------------------------------------------------


def titan_slopes(n: int) -> list[float]:
    # get_slopes of TITAN's get_alibi, for n = 12: 8 powers of 2 from 2**-1, then 4 of the 16
    # slopes (every other one, starting at 2**-0.5).
    assert n == 12
    return [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]


def naive_titan(sd: dict, feats: np.ndarray, coords: np.ndarray, patch: int) -> torch.Tensor:
    """encode_slide_from_patch_features, as the hub code lays it out: dense grid, boolean
    background mask, the full (n+1)^2 ALiBi matrix from numpy meshgrid distances."""
    sd = {k: v.double() for k, v in sd.items()}
    grid = (coords - coords.min(0)) // patch
    hh, ww = grid.max(0) + 1
    dense = np.zeros((hh, ww, feats.shape[1]))
    np.add.at(dense, (grid[:, 0], grid[:, 1]), feats)
    fg = (dense != 0).any(-1)
    tokens = torch.from_numpy(dense[fg])
    xs, ys = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
    pts = np.stack([xs[fg], ys[fg]], 1)
    dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    n = len(tokens)
    bias = torch.zeros(12, n + 1, n + 1, dtype=torch.float64)
    bias[:, 1:, 1:] = -torch.tensor(titan_slopes(12)).view(12, 1, 1).double() * torch.from_numpy(
        dist.astype(np.float32)).double()
    x = F.gelu(lin(tokens, sd, "patch_embed.0"))
    x = torch.cat([sd["cls_token"][0], x])
    for i in range(6):
        p = f"blocks.modules_list.{i}."
        y = ln(x, sd, p + "norm1", 1e-6)
        q, k, v = lin(y, sd, p + "attn.qkv").view(n + 1, 3, 12, 64).unbind(1)
        att = torch.cat([naive_softmax_attention(q[:, h], k[:, h], v[:, h], bias[h])
                         for h in range(12)], 1)
        x = x + lin(att, sd, p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")), sd,
                    p + "mlp.fc2")
    x = ln(x, sd, "norm", 1e-6)
    pool = "attn_pool_contrastive."
    q = ln(sd[pool + "query"], sd, pool + "ln_q", 1e-5)
    kv = ln(x, sd, pool + "ln_k", 1e-5)
    return naive_mha(q, kv, sd, pool + "attn", 8)[0]


def titan_slide(n: int, seed: int, cols: int = 11, patch: int = 512) -> tuple[np.ndarray, ...]:
    """A slide with holes, tiles in tiling (row-major) order, on an integer grid."""
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(cols * cols, n, replace=False))
    rows, cs = np.divmod(cells, cols)
    coords = np.stack([cs, rows], 1) * patch + np.array([3 * patch, 5 * patch])
    return rng.standard_normal((n, 768)), coords


@pytest.fixture(scope="module")
def titan_weights() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = titan.TitanSlideEncoder().eval()
    return model, randomise(model, 3)


def test_titan_matches_the_hub_codes_maths(titan_weights) -> None:
    model, state = titan_weights
    feats, coords = titan_slide(40, seed=1)
    with torch.inference_mode():
        got = model(torch.from_numpy(feats).float(), torch.from_numpy(coords), 512.0)
    expected = naive_titan(state, feats, coords, 512)
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-4)
    assert got.shape == (768,)

    # Token order does not matter (ALiBi depends on distances; the pool is a set function).
    perm = np.random.default_rng(0).permutation(len(feats))
    with torch.inference_mode():
        shuffled = model(torch.from_numpy(feats[perm]).float(), torch.from_numpy(coords[perm]),
                         512.0)
    torch.testing.assert_close(shuffled, got, rtol=1e-4, atol=1e-5)


def test_titan_grid_quirks_sum_shared_cells_and_drop_zero_features(titan_weights) -> None:
    model, state = titan_weights
    feats, coords = titan_slide(30, seed=2)
    feats = np.concatenate([feats, feats[:1] * 0.5, np.zeros((1, 768))])  # same cell; zero
    coords = np.concatenate([coords, coords[:1] + 100, coords[1:2] + 5 * 512])
    with torch.inference_mode():
        got = model(torch.from_numpy(feats).float(), torch.from_numpy(coords), 512.0)
    torch.testing.assert_close(got.double(), naive_titan(state, feats, coords, 512),
                               rtol=2e-4, atol=2e-4)


def test_titan_cells_from_fractional_tile_sizes(titan_weights) -> None:
    """Tiling places tile (col, row) at round(col * tile_l0): with tile_l0 = 506.4 (a 0.2532
    mpp scan at 0.5 mpp target, 512 px) floor would put col 1 at 506 // 506.4 = 0."""
    model, _ = titan_weights
    feats, coords = titan_slide(30, seed=4)
    cells = coords // 512
    ours = np.rint(cells * 506.4)
    with torch.inference_mode():
        a = model(torch.from_numpy(feats).float(), torch.from_numpy(ours), 506.4)
        b = model(torch.from_numpy(feats).float(), torch.from_numpy(coords), 512.0)
    torch.testing.assert_close(a, b)
    assert (np.floor(ours / 506.4) != cells).any()  # what floor would have done


def titan_authors_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub checkpoint's layout: the Titan model's vision and text towers."""
    out = {f"vision_encoder.{k}": v.contiguous() for k, v in state.items()}
    out["text_encoder.token_embedding.weight"] = torch.zeros(4, 8)
    out["text_encoder.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(24, 8)
    return out


def test_titan_strict_load_of_the_hub_layout(titan_weights, tmp_path: Path) -> None:
    model, state = titan_weights
    path = tmp_path / "model.safetensors"
    save_file(titan_authors_state(state), str(path))
    loaded = load(SPEC["titan"], path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert check_slide_checkpoint(SPEC["titan"], ref(SPEC["titan"], path), StorageConfig())

    partial = {k: v for k, v in titan_authors_state(state).items()
               if "attn_pool_contrastive" not in k}
    partial["vision_encoder.head.weight"] = torch.zeros(2, 768)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError) as info:
        load(SPEC["titan"], tmp_path / "partial.safetensors")
    msg = str(info.value)
    assert "9 missing keys" in msg and "attn_pool_contrastive.query" in msg
    assert "1 unexpected keys: head.weight" in msg


def test_titan_memory_is_linear_in_tiles(monkeypatch) -> None:
    n, depth = 6000, 1
    monkeypatch.setattr(titan, "MAX_LOGITS", 1 << 20)
    monkeypatch.setattr(titan, "TOKEN_CHUNK", 2048)
    model = titan.TitanSlideEncoder(depth).eval()
    feats, coords = titan_slide(n, seed=5, cols=90)
    x = torch.from_numpy(feats).float()
    with torch.inference_mode(), LargestTensor() as seen:
        out = model(x, torch.from_numpy(coords), 512.0)
    assert torch.isfinite(out).all()
    length = n + 1
    # The reference's bias alone: 12 (n+1)^2; ours: O(L * 3 * 768) or a bounded block.
    bound = max(length * 3 * 768, titan.TOKEN_CHUNK * 3072, 2 * titan.MAX_LOGITS)
    print(f"largest tensor {seen.largest:,} elements; (n+1)^2 = {length ** 2:,}")
    assert seen.largest <= bound < length * length


# --- PRISM -------------------------------------------------------------------------------------

SMALL_PRISM = {"dim": 48, "context_dim": 80, "latents": 6, "heads": 4, "depth": 8,
               "transformer_depth": 2}


def naive_prism(sd: dict, tiles: torch.Tensor, depth: int, tf_depth: int, heads: int
                ) -> torch.Tensor:
    """Perceiver.forward as the hub code runs it: layer i's cross-attention module is its own
    for i <= share_xattn_start_layer (1), else layer 1's, and it then takes layer 1's key-value
    cache instead of the context; every layer runs layer 0's transformer."""
    sd = {k.removeprefix("image_resampler."): v.double() for k, v in sd.items()}
    x = sd["perceiver.latents"]
    c = tiles.double()
    kv = None

    def ff(t, p):
        h = lin(ln(t, sd, p + "norm", 1e-5), sd, p + "net.0")
        a, gates = h.chunk(2, dim=-1)
        return lin(a * F.gelu(gates), sd, p + "net.2")

    for i in range(depth):
        p = f"perceiver.layers.{i}.xattn."  # every layer's own name (aliases when shared)
        q = lin(ln(x, sd, p + "xattn.x_norm", 1e-5), sd, p + "xattn.to_q")
        if i <= 1:
            kvs = lin(c, sd, p + "xattn.to_kv")
            dim = q.shape[1]
            kv = kvs[:, :dim], kvs[:, dim:]
        x = x + lin(naive_softmax_attention(q, *kv), sd, p + "xattn.to_out")
        x = x + ff(x, p + "ff.")
        for j in range(tf_depth):
            t = f"perceiver.layers.{i}.tf.{j}."
            h = ln(x, sd, t + "mhsa.norm", 1e-5)
            x = x + naive_mha(h, h, sd, t + "mhsa.mha", heads)
            x = x + ff(x, t + "ff.")
    return ln(x[0], sd, "cls_norm", 1e-5)


def prism_authors_state(state: dict[str, torch.Tensor], depth: int, aliases: bool
                        ) -> dict[str, torch.Tensor]:
    """The Prism model's state dict: shared modules under every layer's name (torch.save
    keeps them all) or only the first (safetensors drops shared tensors), plus the parts
    that are not the slide encoder."""
    out = {}
    for k, v in state.items():
        out[f"image_resampler.{k}"] = v
        if not aliases:
            continue
        if k.startswith("perceiver.layers.1.xattn."):
            for i in range(2, depth):
                out[f"image_resampler.perceiver.layers.{i}.xattn.{k.split('.xattn.', 1)[1]}"] = v
        if k.startswith("perceiver.layers.0.tf."):
            for i in range(1, depth):
                out[f"image_resampler.perceiver.layers.{i}.tf.{k.split('.tf.', 1)[1]}"] = v
    out["text_decoder.model.biogpt.embed_tokens.weight"] = torch.zeros(5, 4)
    out["img_to_latents.to_latents.weight"] = torch.zeros(8, 4)
    out["text_to_latents.to_latents.weight"] = torch.zeros(8, 4)
    out["temperature"] = torch.zeros(())
    return out


@pytest.mark.parametrize("aliases", [True, False])
def test_prism_matches_the_hub_codes_maths_from_its_checkpoint(aliases: bool) -> None:
    small = prism.PrismSlideEncoder(**SMALL_PRISM).eval()
    state = randomise(small, 7)
    authors = prism_authors_state(state, SMALL_PRISM["depth"], aliases=True)
    tiles = torch.randn(37, SMALL_PRISM["context_dim"])
    expected = naive_prism(authors, tiles, SMALL_PRISM["depth"],
                           SMALL_PRISM["transformer_depth"], SMALL_PRISM["heads"])

    loaded = prism.PrismSlideEncoder(**SMALL_PRISM)
    checkpoint = prism_authors_state(state, SMALL_PRISM["depth"], aliases)
    load_state_dict_strict(SPEC["prism"], loaded, prism.adapt(checkpoint), "test")
    with torch.inference_mode():
        got = loaded.eval()(tiles)
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-4)


def test_prism_refuses_shared_copies_that_differ() -> None:
    small = prism.PrismSlideEncoder(**SMALL_PRISM)
    state = prism_authors_state(randomise(small, 8), SMALL_PRISM["depth"], aliases=True)
    key = "image_resampler.perceiver.layers.5.xattn.xattn.to_q.weight"
    state[key] = state[key] + 1
    with pytest.raises(WeightsError, match="layers.5.xattn.xattn.to_q.weight differs"):
        prism.adapt(state)


def test_prism_full_size_hub_layout_on_meta() -> None:
    with torch.device("meta"):
        model = prism.PrismSlideEncoder()
    state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    for aliases in (True, False):
        layout = prism_authors_state(state, prism.PERCEIVER_DEPTH, aliases)
        with torch.device("meta"):
            target = prism.PrismSlideEncoder()
        load_state_dict_strict(SPEC["prism"], target, prism.adapt(layout), "meta")
    assert sum(p.numel() for p in model.parameters()) == SPEC["prism"].params
    assert model.perceiver.latents.shape == (513, 1280)


# --- CHIEF -------------------------------------------------------------------------------------


def naive_chief(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """CHIEF.forward's result['WSI_feature'] = torch.mm(softmax(A^T, dim=1), h_ori)."""
    sd = {k: v.double() for k, v in sd.items()}
    h = torch.relu(lin(x.double(), sd, "attention_net.0"))
    a = torch.tanh(lin(h, sd, "attention_net.3.attention_a.0"))
    b = torch.sigmoid(lin(h, sd, "attention_net.3.attention_b.0"))
    scores = lin(a * b, sd, "attention_net.3.attention_c")  # (N, 1)
    return torch.mm(torch.softmax(scores.T, dim=1), x.double())[0]


CHIEF_KEYS = ["attention_net.0", "attention_net.3.attention_a.0", "attention_net.3.attention_b.0",
              "attention_net.3.attention_c", "classifiers", "instance_classifiers.0",
              "instance_classifiers.1", "att_head.fc1", "att_head.fc2", "text_to_vision.0"]


def test_chief_layout_maths_and_strict_load(tmp_path: Path) -> None:
    model = chief.CHIEFSlideEncoder().eval()
    state = randomise(model, 11)
    expected_keys = {f"{m}.{p}" for m in CHIEF_KEYS for p in ("weight", "bias")}
    assert set(state) == expected_keys | {"organ_embedding"}
    path = tmp_path / "CHIEF_pretraining.pth"
    torch.save(state, path)  # the authors' file: a bare state dict
    loaded = load(SPEC["chief"], path)
    x = torch.randn(300, 768)
    with torch.inference_mode():
        got = loaded(x)
    torch.testing.assert_close(got.double(), naive_chief(state, x), rtol=1e-5, atol=1e-5)
    monkey = chief.CHUNK
    try:  # chunked scoring gives the same result
        chief.CHUNK = 7
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), got)
    finally:
        chief.CHUNK = monkey
    torch.save({k: v for k, v in state.items() if k != "organ_embedding"},
               tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="1 missing keys: organ_embedding"):
        load(SPEC["chief"], tmp_path / "partial.pth")


# --- MADELEINE ---------------------------------------------------------------------------------


def naive_madeleine(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """encode_he: pre_attn, rearrange 'b t (e c) -> b t e c' (c = 4 heads), one BatchedABMIL
    per head (softmax over tokens), sum over tokens, view (e c) -> projector."""
    sd = {k.removeprefix("module."): v.double() for k, v in sd.items()}
    h = x.double()
    for i in (0, 4, 8):
        p = f"wsi_embedders.pre_attn.{i}"
        h = F.gelu(F.layer_norm(lin(h, sd, p), (sd[f"wsi_embedders.pre_attn.{i + 1}.weight"]
                                                .shape[0],),
                                sd[f"wsi_embedders.pre_attn.{i + 1}.weight"],
                                sd[f"wsi_embedders.pre_attn.{i + 1}.bias"], 1e-5))
    heads = 4
    slide = torch.zeros(512, heads, dtype=torch.float64)
    for c in range(heads):
        e = h[:, c::heads]  # channels e * 4 + c
        p = f"wsi_embedders.attn.{c}."
        a = torch.tanh(lin(e, sd, p + "attention_a.0"))
        b = torch.sigmoid(lin(e, sd, p + "attention_b.0"))
        att = torch.softmax(lin(a * b, sd, p + "attention_c"), dim=0)  # (N, 1)
        slide[:, c] = (e * att).sum(0)
    return lin(slide.reshape(-1), sd, "projector")


def test_madeleine_layout_maths_and_strict_load(tmp_path: Path, monkeypatch) -> None:
    model = madeleine.MadeleineSlideEncoder().eval()
    state = randomise(model, 13)
    pre = {f"wsi_embedders.pre_attn.{i}.{p}" for i in (0, 1, 4, 5, 8, 9)
           for p in ("weight", "bias")}
    heads = {f"wsi_embedders.attn.{c}.{m}.{p}" for c in range(4)
             for m in ("attention_a.0", "attention_b.0", "attention_c") for p in ("weight", "bias")}
    heads_out = {f"{m}.{p}" for m in ("projector", "token_projector") for p in ("weight", "bias")}
    assert set(state) == pre | heads | heads_out
    path = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # saved from DDP
    loaded = load(SPEC["madeleine"], path)
    x = torch.randn(500, 512)
    expected = naive_madeleine(state, x)
    with torch.inference_mode():
        got = loaded(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(madeleine, "CHUNK", 64)  # the running softmax over chunks
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), got, rtol=1e-5, atol=1e-6)
    # Contiguous head slices (a plausible misreading of the einops split) give another result.
    assert not torch.allclose(expected, naive_madeleine_contiguous(state, x), atol=1e-3)


def naive_madeleine_contiguous(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Heads reading channels c * 512 .. c * 512 + 511: the interleaved read of channels
    permuted so that channel e * 4 + c holds what was channel c * 512 + e."""
    perm = torch.arange(2048).view(4, 512).T.reshape(-1)
    sd = dict(sd)
    for name in ("weight", "bias"):
        sd[f"wsi_embedders.pre_attn.8.{name}"] = sd[f"wsi_embedders.pre_attn.8.{name}"][perm]
        sd[f"wsi_embedders.pre_attn.9.{name}"] = sd[f"wsi_embedders.pre_attn.9.{name}"][perm]
    return naive_madeleine(sd, x)


# --- all encoders: counts, stage, positions, config ----------------------------------------


def ref(spec: specs.SlideModelSpec, path: Path):
    return resolve_weights(SlideEncoderConfig(id=spec.id, weights=str(path)), StorageConfig(),
                           spec=spec)


def load(spec: specs.SlideModelSpec, path: Path) -> torch.nn.Module:
    return load_slide_model(spec, ref(spec, path), StorageConfig(), CPU)


def test_counts_on_meta_and_input_models() -> None:
    expected = {"gigapath-slide": 86_330_880,  # published (slide_encoder.pth)
                # snapshots, counted from the authors' constructions:
                "titan": 48_539_904, "prism": 99_037_440, "chief": 1_185_032,
                "madeleine": 4_996_740}
    assert set(specs.SLIDE_MODELS) == set(expected)
    for sid, n in expected.items():
        spec = specs.get_slide_model(sid)
        model = registry.build_slide(spec, "meta")
        assert sum(p.numel() for p in model.parameters()) == spec.params == n, sid
        tile = specs.get(spec.input_model)
        assert tile.dim == spec.input_dim, sid
        assert spec.source and spec.licence, sid
    # TITAN: vision tower 6 x 768 + poolers; the breakdown the snapshot rests on.
    block = 2 * 1536 + (768 * 2304 + 2304) + (768 * 768 + 768) + 2 * (768 * 3072) + 3072 + 768
    pooler = 768 * 2304 + 2304 + 768 * 768 + 768 + 2 * 1536
    assert expected["titan"] == (768 * 768 + 768) + 768 + 6 * block + 1536 + (
        pooler + 128 * 768) + (pooler + 768) + 768 * 768


@pytest.mark.parametrize("sid", ["titan", "chief", "madeleine", "gigapath-slide"])
def test_stage_dispatches_by_spec(sid: str) -> None:
    spec = specs.get_slide_model(sid)
    cfg = SlideEncoderConfig(id=sid, weights="random", device="cpu")
    stage = SlideEncoderStage(cfg, resolve_weights(cfg, StorageConfig(), spec=spec))
    rng = np.random.default_rng(0)
    n = 25
    emb = rng.standard_normal((n, spec.input_dim)).astype(np.float16)
    tile_l0 = spec.tile_px * spec.mpp / 0.25  # a 40x scan
    coords = np.stack([np.arange(n) % 5, np.arange(n) // 5], 1) * tile_l0
    out = stage(emb, coords, tile_l0)
    assert list(out) == [spec.depth] and out[spec.depth].shape == (spec.dim,)
    assert out[spec.depth].dtype == np.float16 and np.isfinite(out[spec.depth]).all()
    again = SlideEncoderStage(cfg, resolve_weights(cfg, StorageConfig(), spec=spec))
    np.testing.assert_array_equal(again(emb, coords, tile_l0)[spec.depth], out[spec.depth])
    if spec.family in ("chief", "madeleine"):  # position-free: coords are not read
        np.testing.assert_array_equal(stage(emb, coords[::-1] * 3)[spec.depth],
                                      out[spec.depth])
    if sid == "titan":
        with pytest.raises(ValueError, match="the tiles' level-0 size"):
            stage(emb, coords)
    with pytest.raises(ValueError, match=f"reads {spec.input_model} embeddings"):
        stage(emb[:, :-1], coords, tile_l0)


def test_prism_stage_dispatch(monkeypatch) -> None:
    """The stage builds PRISM through its family and reads it out (a small one here: the
    released 99M model costs ~600 GFLOP per slide whatever the tile count, a minute on this
    CPU; its full-size layout is checked on meta above)."""
    small = {**SMALL_PRISM, "context_dim": 2560}
    monkeypatch.setitem(registry.SLIDE_FAMILIES, "prism", registry.SlideFamily(
        lambda spec: prism.PrismSlideEncoder(**small), prism.adapt,
        registry.SLIDE_FAMILIES["prism"].run))
    emb = np.random.default_rng(1).standard_normal((9, 2560)).astype(np.float16)
    cfg = SlideEncoderConfig(id="prism", weights="random", device="cpu")
    stage = SlideEncoderStage(cfg, resolve_weights(cfg, StorageConfig(), spec=SPEC["prism"]))
    with pytest.raises(RuntimeError, match=r"read-out gave shapes \{8: \(48,\)\}"):
        stage(emb, np.zeros((9, 2)))  # the shape check guards every family's read-out
    monkeypatch.setitem(specs.SLIDE_MODELS, "prism",
                        dataclasses.replace(SPEC["prism"], dim=SMALL_PRISM["dim"]))
    stage = SlideEncoderStage(cfg, resolve_weights(cfg, StorageConfig(), spec=SPEC["prism"]))
    out = stage(emb, np.zeros((9, 2)))
    with torch.inference_mode():
        direct = stage.model(torch.from_numpy(emb.astype(np.float32)))
    assert list(out) == [8]
    np.testing.assert_allclose(out[8].astype(np.float32), direct.numpy(), atol=2e-3)


def test_gigapath_position_rules_in_the_stage() -> None:
    """level0/256 (the authors') vs level0/tile (TRIDENT, slide2vec) on a 40x scan: tiles of
    256 px at 0.5 mpp are 512 level-0 px, so neighbours are 2 positions apart under the
    authors' rule and 1 apart under the other."""
    coords = np.array([[0, 0], [512, 0], [1024, 0], [0, 512], [512, 512]], np.float64) + 3
    assert tile_positions(coords, "level0/256", None)[:3, 0].tolist() == [0, 2, 4]
    assert tile_positions(coords, "level0/tile", 512.0)[:3, 0].tolist() == [0, 1, 2]
    assert tile_positions(coords, None, None) is None
    with pytest.raises(ValueError, match="need the tiles' level-0 size"):
        tile_positions(coords, "level0/tile", None)

    from pipeline.models.gigapath_slide import GigaPathSlideEncoder
    spec = specs.get_slide_model("gigapath-slide")
    outs = {}
    for rule in ("level0/256", "level0/tile"):
        cfg = SlideEncoderConfig(weights="random", device="cpu", positions=rule, layers=[3])
        stage = SlideEncoderStage(cfg, resolve_weights(cfg, StorageConfig(), spec=spec))
        emb = np.random.default_rng(2).standard_normal((5, 1536)).astype(np.float32)
        outs[rule] = stage(emb, coords, 512.0)
        assert list(outs[rule]) == [12, 3]
        direct = stage.model  # the model fed the rule's grid directly
        assert isinstance(direct, GigaPathSlideEncoder)
        unit = 256.0 if rule == "level0/256" else 512.0
        with torch.inference_mode():
            want = direct(torch.from_numpy(emb), torch.from_numpy(coords), unit,
                          all_layers=True)["layer_12_embed"]
        np.testing.assert_allclose(outs[rule][12].astype(np.float32), want.numpy(), atol=2e-3)
    assert not np.allclose(outs["level0/256"][12], outs["level0/tile"][12], atol=1e-2)


def test_labels_and_work_key_settings_record_the_convention() -> None:
    def cfg(**kw):
        return SlideEncoderConfig(weights="random", **kw)

    assert aggregation_label(cfg()) == "gigapath-slide (global-pool, positions level0/256)"
    assert aggregation_label(cfg(global_pool=False, positions="level0/tile")) == (
        "gigapath-slide (cls, positions level0/tile)")
    assert aggregation_label(cfg(id="titan")) == "titan (attn-pool, positions level0/tile)"
    assert aggregation_label(cfg(id="prism")) == "prism (perceiver-cls)"
    assert aggregation_label(cfg(id="chief")) == "chief (attention-mil)"
    assert aggregation_label(cfg(id="madeleine")) == "madeleine (4-head-attention-mil)"
    assert position_rule(cfg()) == "level0/256" and position_rule(cfg(id="chief")) is None
    # The authors' defaults add nothing to a slide's work key (existing lakes keep theirs).
    assert work_key_settings(cfg()) == work_key_settings(cfg(positions="level0/256")) == []
    assert work_key_settings(cfg(positions="level0/tile")) == ["positions=level0/tile"]
    assert work_key_settings(cfg(id="titan", positions="level0/tile")) == []


def job(models: list[dict], tiling: dict | None = None):
    return build_config({"manifest": "m.csv", "output": "out", "models": models,
                         "tiling": tiling or {}})


@pytest.mark.parametrize(("tile_model", "sid", "tiling"), [
    ("gigapath", "gigapath-slide", {}),
    ("conch-v1.5", "titan", {}),
    ("virchow", "prism", {}),
    ("ctranspath", "chief", {"tile_size": 256}),
    ("conch", "madeleine", {"tile_size": 256, "mpp": 1.0}),
])
def test_config_enforces_input_model_and_tile_spec(tile_model: str, sid: str,
                                                   tiling: dict) -> None:
    spec = specs.get_slide_model(sid)
    enc = {"id": sid, "weights": "random"}
    cfg = job([{"id": tile_model, "weights": "random", "slide_encoder": enc}], tiling)
    assert cfg.models[0].slide_encoder.id == sid
    other = "uni" if tile_model != "uni" else "kaiko-vits16"
    with pytest.raises(ConfigError, match=f"reads {tile_model} tile embeddings"):
        job([{"id": other, "weights": "random", "slide_encoder": enc}], tiling)
    wrong = {"tile_size": spec.tile_px * 2, "mpp": spec.mpp}
    with pytest.raises(ConfigError) as info:
        job([{"id": tile_model, "weights": "random", "slide_encoder": enc}], wrong)
    assert f"{sid} was trained on {tile_model} features of {spec.tile_px} px tiles" in str(
        info.value) and f"set tiling.tile_size: {spec.tile_px}" in str(info.value)


def test_config_refuses_settings_an_encoder_does_not_have() -> None:
    SlideEncoderConfig(layers=[11], positions="level0/tile", global_pool=False)
    SlideEncoderConfig(id="titan", positions="level0/tile")
    with pytest.raises(ValueError, match="titan outputs its final embedding only"):
        SlideEncoderConfig(id="titan", layers=[3])
    with pytest.raises(ValueError, match="global_pool is gigapath-slide's"):
        SlideEncoderConfig(id="chief", global_pool=True)
    with pytest.raises(ValueError, match="chief does not use tile positions"):
        SlideEncoderConfig(id="chief", positions="level0/tile")
    with pytest.raises(ValueError, match="titan uses level0/tile only"):
        SlideEncoderConfig(id="titan", positions="level0/256")
    with pytest.raises(ValueError, match="positions"):
        SlideEncoderConfig(positions="tile")


def test_readme_slide_encoder_table_is_the_registry() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    for s in specs.SLIDE_MODELS.values():
        row = (f"| `{s.id}` | `{s.input_model}` @ {s.tile_px} px, {s.mpp:.1f} mpp | {s.dim} | "
               f"{s.params:,} |")
        assert row in text, f"README slide-encoder table: expected a row starting {row!r}"
