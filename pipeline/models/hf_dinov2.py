"""Load a transformers ``Dinov2Model`` (owkin/phikon-v2) or ``ViTModel`` (owkin/phikon)
checkpoint into a timm ViT.

transformers is not a dependency: the same network is a timm ``VisionTransformer`` with
LayerScale, and only the parameter names differ. The mapping follows the structure of
transformers' ``modeling_dinov2`` (embeddings, ``encoder.layer.N`` with separate
query/key/value, ``layer_scale{1,2}.lambda1``, final ``layernorm``). Separate q/k/v become
timm's fused ``qkv`` by concatenation along the output dimension, in q, k, v order.
``embeddings.mask_token`` is only used for masked-image training and is dropped. A
``ViTModel`` has the same embeddings and final ``layernorm``, its blocks name the norms
``layernorm_before``/``layernorm_after`` and the MLP ``intermediate.dense``/``output.dense``,
and has no LayerScale; a saved pooler (``pooler.dense``) is not part of the embedding.
"""

from __future__ import annotations

import re

import torch

DROPPED = ("embeddings.mask_token",)
_FIXED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_IN_LAYER = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_IN_VIT_LAYER = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
_VIT_DROPPED = ("pooler.dense.weight", "pooler.dense.bias")
_QKV = ("query", "key", "value")


def is_hf_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for transformers names; a checkpoint already in timm names is loaded as is."""
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in state)


def vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ViTModel state dict (owkin/phikon) to timm names."""
    if state and all(k.startswith("vit.") for k in state if not k.startswith("classifier.")):
        state = {k.removeprefix("vit."): v for k, v in state.items()}  # a ViTFor... save
    return to_timm(state, _IN_VIT_LAYER, DROPPED + _VIT_DROPPED)


def to_timm(state: dict[str, torch.Tensor], in_layer: dict[str, str] | None = None,
            dropped: tuple[str, ...] = DROPPED) -> dict[str, torch.Tensor]:
    """Rename a Dinov2Model state dict to timm names; unknown keys pass through unchanged.

    Passing unknown keys (and incomplete q/k/v triples) through keeps them visible: the strict
    load then lists them as unexpected and the timm keys they should have filled as missing.
    """
    if not is_hf_layout(state):
        return state
    in_layer = _IN_LAYER if in_layer is None else in_layer
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in dropped:
            continue
        if key in _FIXED:
            out[_FIXED[key]] = value
            continue
        m = _LAYER.match(key)
        if m is None:
            out[key] = value
            continue
        n, rest = int(m.group(1)), m.group(2)
        if rest in in_layer:
            out[f"blocks.{n}.{in_layer[rest]}"] = value
            continue
        parts = rest.split(".")  # attention.attention.{query,key,value}.{weight,bias}
        if len(parts) == 4 and parts[:2] == ["attention", "attention"] and parts[2] in _QKV:
            qkv.setdefault((n, parts[3]), {})[parts[2]] = value
            continue
        out[key] = value
    for (n, kind), parts in sorted(qkv.items()):
        if set(parts) == set(_QKV):
            out[f"blocks.{n}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
        else:  # incomplete: keep the original names so the strict check reports them
            for p, v in parts.items():
                out[f"encoder.layer.{n}.attention.attention.{p}.{kind}"] = v
    return out
