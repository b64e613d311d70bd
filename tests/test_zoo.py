"""Model zoo: every registry entry reproduces the authors' architecture, keys and read-out.

Big models are only ever built on ``meta`` (no memory); recipes are checked on small-width
stand-ins built through the registry's own builders and recipes, against computations written
here from the raw token outputs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from pipeline.models import registry
from pipeline.models.preprocess import preprocess_cpu, reference_preprocess_pil
from pipeline.models.weights import WeightsError, _read_state_dict, load_state_dict_strict

TILES = Path(__file__).parent / "data" / "tiles"
ALL = sorted(registry.MODELS)
EXPECTED_IDS = {
    "virchow", "virchow2", "uni", "uni2-h", "conch", "conch-v1.5", "gigapath", "kaiko-vits16",
    "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14", "h-optimus-0", "h-optimus-1",
    "phikon-v2", "phikon", "resnet50-trunc",
}
# benchmark/test stand-ins, not pathology models
BENCHMARK_IDS = {"bench-null", "bench-null-256", "bench-null-512"}


def spec_of(model_id: str, **changes) -> registry.TileModelSpec:
    return dataclasses.replace(registry.get(model_id), **changes)


def small(model_id: str, dim: int, **kwargs) -> registry.TileModelSpec:
    """Same entry, same builder and recipe, narrower/shallower network (CPU-fast)."""
    spec = registry.get(model_id)
    return dataclasses.replace(spec, id=f"{model_id}-small", dim=dim,
                               timm_kwargs={**spec.timm_kwargs, **kwargs})


def build_cpu(spec: registry.TileModelSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise(registry.build(spec, device="cpu").eval())


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """LayerScale/LayerNorm init to constants would hide wrong wiring: perturb everything."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def pixels(n: int, size: int) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(n, 3, size, size)


def meta_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in module.state_dict().items()}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head attention on (N, Lq, D), (N, Lk, D): softmax(q k^T / sqrt(d)) v."""
    n, lq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(n, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(n, lq, d)


# --- 1. architecture: parameter counts -------------------------------------------------------


def test_registry_has_the_whole_zoo() -> None:
    assert {s.id for s in registry.MODELS.values() if not s.benchmark} == EXPECTED_IDS
    assert {s.id for s in registry.MODELS.values() if s.benchmark} == BENCHMARK_IDS


@pytest.mark.parametrize("model_id", ALL)
def test_param_count_and_width_on_meta(model_id: str) -> None:
    spec = registry.get(model_id)
    model = registry.build(spec, device="meta").eval()
    assert sum(p.numel() for p in model.parameters()) == spec.params
    x = torch.empty(2, 3, spec.input_size, spec.input_size, device="meta")
    with torch.inference_mode():
        assert registry.embed(spec, model, x).shape == (2, spec.dim)


def test_recomputed_counts_break_down_as_documented() -> None:
    conch = registry.build(registry.get("conch"), device="meta")
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in conch.named_children()}
    assert counts == {"trunk": 86_250_240, "attn_pool_contrast": 1_315_840, "ln_contrast": 1024}
    # MODELS.md: whole visual 90,392,832 = ours + proj_contrast (512x512) + caption pooler
    # (256 queries x 768, LNs, MHA 768) + ln_caption.
    caption = 256 * 768 + 4 * 768 + (3 * 768 * 768 + 3 * 768) + (768 * 768 + 768) + 2 * 768
    assert registry.get("conch").params + 512 * 512 + caption == 90_392_832
    v15 = registry.build(registry.get("conch-v1.5"), device="meta")
    assert sum(p.numel() for p in v15.trunk.parameters()) == registry.get("uni").params


# --- 2. strict loading with the authors' key names -------------------------------------------


def conch_v1_reference(trunk_kwargs: dict, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A CONCH v1 checkpoint as the authors lay it out (whole CoCa, not only the tower)."""
    torch.manual_seed(seed)
    trunk = timm.create_model("vit_base_patch16_224", pretrained=False, **trunk_kwargs)
    width = trunk.num_features
    mha = torch.nn.MultiheadAttention(dim, 8, kdim=width, vdim=width)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {f"visual.attn_pool_contrast.attn.{k}": v for k, v in mha.state_dict().items()}
    state |= {
        "visual.attn_pool_contrast.query": torch.randn(1, dim),
        "visual.attn_pool_contrast.ln_q.weight": 1 + 0.1 * torch.randn(dim),
        "visual.attn_pool_contrast.ln_q.bias": 0.1 * torch.randn(dim),
        "visual.attn_pool_contrast.ln_k.weight": 1 + 0.1 * torch.randn(width),
        "visual.attn_pool_contrast.ln_k.bias": 0.1 * torch.randn(width),
        "visual.ln_contrast.weight": 1 + 0.1 * torch.randn(dim),
        "visual.ln_contrast.bias": 0.1 * torch.randn(dim),
        # present in the real checkpoint, unused by the embedding:
        "visual.proj_contrast": torch.randn(dim, dim),
        "visual.attn_pool_caption.query": torch.randn(4, width),
        "visual.ln_caption.weight": torch.ones(width),
        "text.token_embedding.weight": torch.randn(8, width),
        "logit_scale": torch.ones(()),
    }
    return {k: v.contiguous() for k, v in state.items()}


def conch_v1_manual(state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """CONCH v1 pooler + ln_contrast from the checkpoint tensors (open_clip's maths)."""
    p = "visual.attn_pool_contrast."
    dim = state[p + "query"].shape[-1]
    q = F.layer_norm(state[p + "query"], (dim,), state[p + "ln_q.weight"],
                     state[p + "ln_q.bias"], 1e-5)
    kv = F.layer_norm(tokens, (tokens.shape[-1],), state[p + "ln_k.weight"],
                      state[p + "ln_k.bias"], 1e-5)
    bq, bk, bv = state[p + "attn.in_proj_bias"].chunk(3)
    q = (q @ state[p + "attn.q_proj_weight"].T + bq).expand(tokens.shape[0], -1, -1)
    k = kv @ state[p + "attn.k_proj_weight"].T + bk
    v = kv @ state[p + "attn.v_proj_weight"].T + bv
    out = attention(q, k, v, 8) @ state[p + "attn.out_proj.weight"].T
    pooled = (out + state[p + "attn.out_proj.bias"])[:, 0]
    return F.layer_norm(pooled, (dim,), state["visual.ln_contrast.weight"],
                        state["visual.ln_contrast.bias"], 1e-5)


def load(spec: registry.TileModelSpec, state: dict[str, torch.Tensor],
         device: str = "meta") -> torch.nn.Module:
    """The loading path of weights.load_model: build on meta, adapt the authors' layout, then
    load strictly with assign (meta tensors in: no memory; real tensors in: a real model)."""
    model = registry.build(spec, device=device)
    load_state_dict_strict(spec, model, registry.adapt_checkpoint(spec, state), "test")
    return model.eval()


def test_conch_v1_full_size_checkpoint_loads_strictly(tmp_path: Path) -> None:
    spec = registry.get("conch")
    state = conch_v1_reference(dict(spec.timm_kwargs), spec.dim)
    save_file(state, str(tmp_path / "conch.safetensors"))
    model = load(spec, _read_state_dict(tmp_path / "conch.safetensors"))
    loaded = model.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[f"visual.{key}"]), key
    x = pixels(1, 448)
    with torch.inference_mode():
        tokens = model.trunk(x)  # trunk forward = all tokens after the final norm
        assert tokens.shape == (1, 785, 768)
        torch.testing.assert_close(tokens, model.trunk.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(registry.embed(spec, model, x),
                                   conch_v1_manual(state, tokens), rtol=1e-4, atol=1e-4)


def test_conch_v1_partial_checkpoint_lists_keys() -> None:
    spec = registry.get("conch")
    state = {k: v for k, v in meta_state_conch().items()
             if k != "visual.attn_pool_contrast.attn.k_proj_weight"}
    state["visual.trunk.bogus"] = torch.empty(3, device="meta")
    with pytest.raises(WeightsError) as info:
        load(spec, state)
    assert "1 missing keys: attn_pool_contrast.attn.k_proj_weight" in str(info.value)
    assert "1 unexpected keys: trunk.bogus" in str(info.value)


def meta_state_conch() -> dict[str, torch.Tensor]:
    spec = registry.get("conch")
    with torch.device("meta"):
        return conch_v1_reference(dict(spec.timm_kwargs), spec.dim)


@pytest.mark.parametrize("model_id", ["kaiko-vits8", "kaiko-vitb16"])
def test_small_kaiko_checkpoint_roundtrip(model_id: str, tmp_path: Path) -> None:
    spec = registry.get(model_id)
    torch.manual_seed(3)
    reference = timm.create_model(spec.timm_name, pretrained=False,
                                  **dict(spec.timm_kwargs)).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = load(spec, _read_state_dict(path))
    x = pixels(1, 224)
    with torch.inference_mode():
        assert torch.equal(registry.embed(spec, model, x), reference(x))


def test_kaiko_vitb8_keys_match_reference() -> None:
    spec = registry.get("kaiko-vitb8")
    with torch.device("meta"):
        reference = timm.create_model(spec.timm_name, pretrained=False, **dict(spec.timm_kwargs))
    load(spec, meta_state(reference))


TIMM_BIG = ["virchow", "virchow2", "uni", "uni2-h", "gigapath", "kaiko-vitl14", "h-optimus-0",
            "h-optimus-1"]


@pytest.mark.parametrize("model_id", TIMM_BIG)
def test_big_timm_checkpoint_keys_on_meta(model_id: str) -> None:
    """The authors' calls (timm.create_model with their kwargs) define the key set and shapes."""
    spec = registry.get(model_id)
    with torch.device("meta"):
        reference = timm.create_model(spec.timm_name, pretrained=False, **dict(spec.timm_kwargs))
    state = meta_state(reference)
    model = load(spec, state)
    assert sum(p.numel() for p in model.parameters()) == spec.params
    first = next(iter(state))
    del state[first]
    with pytest.raises(WeightsError, match=f"1 missing keys: {first}"):
        load(spec, state)


def conch_v15_authors_keys(pos_tokens: int) -> dict[str, tuple[int, ...]]:
    """pytorch_model_vision.bin layout: trunk (timm ViT-L/16 names), pooler, ln_contrast."""
    shapes = {"trunk.cls_token": (1, 1, 1024), "trunk.pos_embed": (1, pos_tokens, 1024),
              "trunk.patch_embed.proj.weight": (1024, 3, 16, 16),
              "trunk.patch_embed.proj.bias": (1024,),
              "trunk.norm.weight": (1024,), "trunk.norm.bias": (1024,)}
    for i in range(24):
        b = f"trunk.blocks.{i}."
        shapes |= {b + "norm1.weight": (1024,), b + "norm1.bias": (1024,),
                   b + "attn.qkv.weight": (3072, 1024), b + "attn.qkv.bias": (3072,),
                   b + "attn.proj.weight": (1024, 1024), b + "attn.proj.bias": (1024,),
                   b + "ls1.gamma": (1024,), b + "norm2.weight": (1024,),
                   b + "norm2.bias": (1024,), b + "mlp.fc1.weight": (4096, 1024),
                   b + "mlp.fc1.bias": (4096,), b + "mlp.fc2.weight": (1024, 4096),
                   b + "mlp.fc2.bias": (1024,), b + "ls2.gamma": (1024,)}
    p = "attn_pool_contrast."
    shapes |= {p + "query": (1, 768), p + "ln_k.weight": (1024,), p + "ln_k.bias": (1024,),
               p + "ln_q.weight": (768,), p + "ln_q.bias": (768,),
               p + "to_q.weight": (768, 768), p + "to_kv.weight": (1536, 1024),
               p + "to_out.weight": (768, 768),
               "ln_contrast.weight": (768,), "ln_contrast.bias": (768,)}
    return shapes


@pytest.mark.parametrize("pos_tokens", [197, 785])
def test_conch_v15_keys_on_meta_and_pos_embed_resize(pos_tokens: int) -> None:
    spec = registry.get("conch-v1.5")
    shapes = conch_v15_authors_keys(pos_tokens)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model = load(spec, state)
    assert model.trunk.pos_embed.shape == (1, 197, 1024)


def test_conch_v15_checkpoint_pos_embed_resized_bilinear() -> None:
    pos = torch.randn(1, 1 + 28 * 28, 8)
    out = registry.adapt_checkpoint(registry.get("conch-v1.5"), {"trunk.pos_embed": pos})
    grid = pos[:, 1:].reshape(1, 28, 28, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode="bilinear", align_corners=False)
    expected = torch.cat([pos[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 196, 8)], 1)
    torch.testing.assert_close(out["trunk.pos_embed"], expected)


# phikon-v2: transformers Dinov2Model names, written here from its module structure.


def _transformers_common(timm_state: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], int]:
    """What transformers' ViTModel and Dinov2Model name alike: embeddings, final layernorm,
    and each block's q/k/v split and attention output; plus the depth."""
    out = {
        "embeddings.cls_token": timm_state["cls_token"],
        "embeddings.position_embeddings": timm_state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "layernorm.weight": timm_state["norm.weight"],
        "layernorm.bias": timm_state["norm.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in timm_state if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = timm_state[b + f"attn.qkv.{kind}"].chunk(3)
            out[h + f"attention.attention.query.{kind}"] = q
            out[h + f"attention.attention.key.{kind}"] = k
            out[h + f"attention.attention.value.{kind}"] = v
            out[h + f"attention.output.dense.{kind}"] = timm_state[b + f"attn.proj.{kind}"]
    return out, depth


def to_transformers_dinov2(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, depth = _transformers_common(timm_state)
    out["embeddings.mask_token"] = torch.zeros(1, timm_state["cls_token"].shape[-1])
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for norm in ("norm1", "norm2"):
                out[h + f"{norm}.{kind}"] = timm_state[b + f"{norm}.{kind}"]
            for fc in ("fc1", "fc2"):
                out[h + f"mlp.{fc}.{kind}"] = timm_state[b + f"mlp.{fc}.{kind}"]
        out[h + "layer_scale1.lambda1"] = timm_state[b + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = timm_state[b + "ls2.gamma"]
    return {k: v.contiguous() for k, v in out.items()}


def test_phikon_v2_transformers_checkpoint_loads_with_identical_outputs(tmp_path: Path) -> None:
    spec = small("phikon-v2", 64, embed_dim=64, depth=2, num_heads=4)
    reference = build_cpu(spec, seed=5)
    path = tmp_path / "model.safetensors"
    save_file(to_transformers_dinov2(reference.state_dict()), str(path))
    model = load(spec, _read_state_dict(path))
    x = pixels(2, 224)
    with torch.inference_mode():
        assert torch.equal(registry.embed(spec, model, x), reference.forward_features(x)[:, 0])


def test_phikon_v2_full_size_keys_on_meta_and_partial_fails() -> None:
    spec = registry.get("phikon-v2")
    reference = registry.build(spec, device="meta")
    hf = to_transformers_dinov2(meta_state(reference))
    assert len(hf) == len(reference.state_dict()) + 24 * 4 + 1  # q/k/v split, mask_token
    load(spec, hf)
    del hf["encoder.layer.7.attention.attention.key.weight"]
    with pytest.raises(WeightsError) as info:
        load(spec, hf)
    msg = str(info.value)
    assert "1 missing keys: blocks.7.attn.qkv.weight" in msg
    assert "2 unexpected keys: encoder.layer.7.attention.attention.query.weight" in msg


# --- 3. embedding recipes against computations from the raw tokens -------------------------


@pytest.mark.parametrize(("model_id", "prefix"), [("virchow", 1), ("virchow2", 5)])
def test_virchow_recipe_cls_and_patch_mean(model_id: str, prefix: int) -> None:
    spec = small(model_id, 2 * 96, embed_dim=96, depth=1, num_heads=2)  # even SwiGLU width
    model = build_cpu(spec)
    x = pixels(2, 224)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        assert tokens.shape[1] == prefix + 16 * 16
        expected = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)
        torch.testing.assert_close(registry.embed(spec, model, x), expected, rtol=0, atol=0)
        # timm's forward with global_pool "" is forward_features: the authors' model(x).
        torch.testing.assert_close(model(x), tokens, rtol=0, atol=0)


def test_conch_v1_recipe_small() -> None:
    spec = small("conch", 32, img_size=64, embed_dim=48, depth=1, num_heads=2)
    model = build_cpu(spec)
    state = {f"visual.{k}": v for k, v in model.state_dict().items()}
    x = pixels(2, 64)
    with torch.inference_mode():
        tokens = model.trunk(x)
        torch.testing.assert_close(registry.embed(spec, model, x),
                                   conch_v1_manual(state, tokens), rtol=1e-5, atol=1e-5)


def test_conch_v15_recipe_small_with_dino_pos_interpolation() -> None:
    spec = small("conch-v1.5", 32, embed_dim=48, depth=1, num_heads=2)
    model = build_cpu(spec)
    trunk, pool = model.trunk, model.attn_pool_contrast
    x = pixels(2, 448)
    with torch.inference_mode():
        # Trunk tokens computed here: pos_embed 14x14 -> 28x28 with scale 28.1/14, bicubic.
        grid = trunk.pos_embed[:, 1:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=28.1 / 14, mode="bicubic", align_corners=False)
        assert grid.shape[-2:] == (28, 28)
        pos = torch.cat([trunk.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        patches = F.conv2d(x, trunk.patch_embed.proj.weight, trunk.patch_embed.proj.bias,
                           stride=16).flatten(2).transpose(1, 2)
        t = torch.cat([trunk.cls_token.expand(2, -1, -1), patches], dim=1) + pos
        for block in trunk.blocks:
            t = block(t)
        tokens = trunk.norm(t)
        torch.testing.assert_close(model.forward_features(x), tokens, rtol=1e-5, atol=1e-5)
        # A plain size-based resample is a different function: the quirk matters.
        sized = F.interpolate(trunk.pos_embed[:, 1:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2),
                              size=(28, 28), mode="bicubic", align_corners=False)
        assert not torch.allclose(sized.flatten(2).transpose(1, 2), pos[:, 1:], atol=1e-4)
        # Pooler: ln_q(query) -> to_q; ln_k(tokens) -> to_kv (k, v halves); 8 heads; to_out.
        q = F.layer_norm(pool.query, (32,), pool.ln_q.weight, pool.ln_q.bias, 1e-5)
        kv = F.layer_norm(tokens, (48,), pool.ln_k.weight, pool.ln_k.bias, 1e-5)
        q = (q @ pool.to_q.weight.T).expand(2, -1, -1)
        k, v = (kv @ pool.to_kv.weight.T).chunk(2, dim=-1)
        pooled = (attention(q, k, v, 8) @ pool.to_out.weight.T)[:, 0]
        expected = F.layer_norm(pooled, (32,), model.ln_contrast.weight,
                                model.ln_contrast.bias, 1e-5)
        torch.testing.assert_close(registry.embed(spec, model, x), expected,
                                   rtol=1e-5, atol=1e-5)


def test_kaiko_vitl14_resamples_pos_embed_at_run_time() -> None:
    spec = small("kaiko-vitl14", 64, embed_dim=64, depth=1, num_heads=2)
    model = build_cpu(spec)
    assert model.pos_embed.shape == (1, 37 * 37, 64)  # built at 518; no class-token slot
    x = pixels(2, 224)
    with torch.inference_mode():
        grid = model.pos_embed.reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False,
                             antialias=True).flatten(2).transpose(1, 2)
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                           stride=14).flatten(2).transpose(1, 2)
        prefix = torch.cat([model.cls_token, model.reg_token], dim=1).expand(2, -1, -1)
        t = torch.cat([prefix, patches + grid], dim=1)
        for block in model.blocks:
            t = block(t)
        expected = model.norm(t)[:, 0]
        torch.testing.assert_close(registry.embed(spec, model, x), expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_id", ["uni2-h", "h-optimus-0", "gigapath"])
def test_cls_recipe_with_registers_takes_token_0(model_id: str) -> None:
    spec = small(model_id, 96, embed_dim=96, depth=1, num_heads=2)  # even SwiGLU width
    model = build_cpu(spec)
    x = pixels(1, 224)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        assert torch.equal(registry.embed(spec, model, x), tokens[:, 0])
        assert torch.equal(registry.embed(spec, model, x), model(x))  # the authors' model(x)


# --- 4. preprocessing: exact CPU mode ---------------------------------------------------------


@pytest.mark.parametrize("model_id", ["conch", "gigapath", "h-optimus-0"])
def test_cpu_preprocess_is_the_model_card_transform(model_id: str) -> None:
    spec = registry.get(model_id)
    imgs = [Image.open(TILES / n).convert("RGB") for n in
            ("gigapath_01581x_25327y.png", "gigapath_01581x_25583y.png")]
    tiles = np.stack([np.asarray(im) for im in imgs])
    got = preprocess_cpu(tiles, spec)
    expected = torch.stack([reference_preprocess_pil(im, spec) for im in imgs])
    assert torch.equal(got, expected)
    assert preprocess_cpu(tiles[:0], spec).shape == (0, 3, spec.input_size, spec.input_size)


# --- 5/6. tiling spec, README table, CLI -------------------------------------------------------


def test_tiling_spec_groups_models() -> None:
    groups: dict[tuple[int, float], list[str]] = {}
    for spec in registry.MODELS.values():
        groups.setdefault(registry.tiling_spec(spec), []).append(spec.id)
    assert registry.tiling_spec(registry.get("virchow")) == (224, 0.5)
    assert registry.tiling_spec(registry.get("uni")) == (256, 0.5)
    assert set(groups[(512, 0.5)]) == {"conch", "conch-v1.5", "bench-null-512"}
    assert {"uni", "uni2-h", "gigapath"} <= set(groups[(256, 0.5)])


def test_markdown_table_lists_every_model() -> None:
    table = registry.markdown_table()
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(EXPECTED_IDS)  # pathology models only, no bench-null
    assert all(line.count(" | ") == 6 for line in lines[2:])
    assert "| `virchow` | 2560 | 631,229,184 | fp16 | 224 px @ 0.5 mpp -> 224 px |" in table
    assert "`MahmoodLab/conchv1_5`" in table and "512 px @ 0.5 mpp (20x)" in table


def test_models_command_lists_the_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for model_id in EXPECTED_IDS:
        assert f"\n{model_id} " in out
    assert "1,134,953,984" in out and "MahmoodLab/conchv1_5" in out


def test_specs_record_licence_and_gating() -> None:
    for spec in registry.MODELS.values():
        if spec.benchmark:  # bench-null: no network, nothing to download or gate
            assert "no network, embeddings meaningless" in spec.licence, spec.id
            assert spec.hub_repo is None and not spec.gated and spec.preprocess_on == "model"
            continue
        assert spec.licence and spec.hub_repo and spec.hub_filename, spec.id
        assert spec.gated == ("HF_TOKEN" in spec.licence), spec.id
        assert spec.preprocess_on in ("device", "cpu")


# phikon (v1): transformers ViTModel names, written here from its module structure.


def to_transformers_vit(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, depth = _transformers_common(timm_state)
    width = timm_state["norm.weight"].shape[0]
    # a pooler some saves carry: not part of the embedding
    out["pooler.dense.weight"] = torch.zeros(width, width)
    out["pooler.dense.bias"] = torch.zeros(width)
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[h + f"layernorm_before.{kind}"] = timm_state[b + f"norm1.{kind}"]
            out[h + f"layernorm_after.{kind}"] = timm_state[b + f"norm2.{kind}"]
            out[h + f"intermediate.dense.{kind}"] = timm_state[b + f"mlp.fc1.{kind}"]
            out[h + f"output.dense.{kind}"] = timm_state[b + f"mlp.fc2.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def test_phikon_transformers_vit_checkpoint_loads_with_identical_outputs(tmp_path: Path
                                                                         ) -> None:
    spec = small("phikon", 64, embed_dim=64, depth=2, num_heads=4)
    reference = build_cpu(spec, seed=6)
    assert reference.blocks[0].norm1.eps == reference.norm.eps == 1e-12  # transformers' eps
    path = tmp_path / "pytorch_model.bin"
    torch.save(to_transformers_vit(reference.state_dict()), path)
    model = load(spec, _read_state_dict(path), device="cpu")
    x = pixels(2, 224)
    with torch.inference_mode():
        # CLS of the last hidden state, written here from the raw tokens
        assert torch.equal(registry.embed(spec, model, x), reference.forward_features(x)[:, 0])
    full = registry.get("phikon")
    hf = to_transformers_vit(meta_state(registry.build(full, device="meta")))
    load(full, hf)  # the full-size layout loads strictly
    del hf["encoder.layer.3.intermediate.dense.weight"]
    with pytest.raises(WeightsError, match="1 missing keys: blocks.3.mlp.fc1.weight"):
        load(full, hf)


def test_resnet50_trunc_is_layer3_average_pooled_from_a_whole_imagenet_checkpoint(
        tmp_path: Path) -> None:
    spec = registry.get("resnet50-trunc")
    torch.manual_seed(7)
    whole = randomise(timm.create_model("resnet50", pretrained=False)).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, str(path))
    model = load(spec, _read_state_dict(path), device="cpu")
    x = pixels(2, 224)
    with torch.inference_mode():
        h = whole.maxpool(whole.act1(whole.bn1(whole.conv1(x))))
        h = whole.layer3(whole.layer2(whole.layer1(h)))  # the cut: no layer4, no fc
        expected = torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
        torch.testing.assert_close(registry.embed(spec, model, x), expected, rtol=0, atol=1e-5)
    assert expected.shape == (2, 1024)
