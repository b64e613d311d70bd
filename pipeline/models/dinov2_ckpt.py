"""DINOv2-family checkpoints (Meta's layout, transformers' layouts) -> timm ViT names.

The networks are timm ``VisionTransformer``s (``vit_*_patch14[_reg4]_dinov2``); only the
authors' parameter names and a few tensor layouts differ:

* Meta's ``dinov2`` code (facebookresearch/dinov2 and its forks: HistAI/hibou, OpenMidnight,
  GPFM's training code): ``mask_token`` (masked-image training only: dropped), ``pos_embed``
  with a class-token slot, ``register_tokens``, the fused SwiGLU as ``mlp.w12``/``mlp.w3``
  (timm ``SwiGLUPacked``: ``mlp.fc1``/``mlp.fc2``, same packing: first half gated by SiLU),
  and with ``block_chunks > 0`` the blocks as ``blocks.<chunk>.<index>``.
* transformers' ``Dinov2Model`` (and HistAI's register variant of it): see ``hf_dinov2``;
  the SwiGLU is ``mlp.weights_in``/``mlp.weights_out`` (same packing) and the registers are
  ``embeddings.register_tokens``.

With registers, timm's DINOv2 models use ``no_embed_class``: no position embedding on the
class and register tokens. Meta's code adds ``pos_embed[:, 0]`` to the class token and none to
the registers, so the class token becomes ``cls_token + pos_embed[:, 0]`` (one addition either
way: the same float result) and ``pos_embed`` loses its first slot, as timm's own converter
does. A timm-named checkpoint passes through unchanged.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from pipeline.models import hf_dinov2

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_META_MLP = {"mlp.w12.": "mlp.fc1.", "mlp.w3.": "mlp.fc2."}
_HF_SWIGLU = {
    "mlp.weights_in.weight": "mlp.fc1.weight",
    "mlp.weights_in.bias": "mlp.fc1.bias",
    "mlp.weights_out.weight": "mlp.fc2.weight",
    "mlp.weights_out.bias": "mlp.fc2.bias",
}


def _fold_registers(state: dict[str, torch.Tensor], registers: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    out = dict(state)
    out["reg_token"] = registers
    if "cls_token" in out and "pos_embed" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def meta_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta DINOv2 names -> timm names; unknown keys pass through (the strict load lists them)."""
    out: dict[str, torch.Tensor] = {}
    registers = None
    for key, value in state.items():
        if key == "mask_token":
            continue
        if key == "register_tokens":
            registers = value
            continue
        m = _CHUNKED.match(key)
        if m is not None:  # block_chunks > 0: blocks.<chunk>.<global index>.<rest>
            key = f"blocks.{m.group(2)}.{m.group(3)}"
        for old, new in _META_MLP.items():
            if key.startswith("blocks.") and f".{old}" in key:
                key = key.replace(f".{old}", f".{new}")
        out[key] = value
    return _fold_registers(out, registers) if registers is not None else out


def transformers_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers Dinov2Model (MLP or SwiGLU, with or without registers) -> timm names."""
    out = hf_dinov2.to_timm(state, {**hf_dinov2._IN_LAYER, **_HF_SWIGLU})
    registers = out.pop("embeddings.register_tokens", None)
    return _fold_registers(out, registers) if registers is not None else out


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either authors' layout (or timm's own) -> timm names."""
    if hf_dinov2.is_hf_layout(state):
        return transformers_to_timm(state)
    return meta_to_timm(state)


def resample_like_transformers(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """A (1, 1 + n*n, D) position embedding resampled to ``grid`` x ``grid`` as transformers'
    Dinov2 does at every forward when the input grid differs from the stored one: patch part
    only, bicubic by output size, ``align_corners=False``, no antialias, in float32. Done once
    at load it gives the same tensor, so the timm module needs no run-time resampling."""
    n = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if n * n != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed of {pos_embed.shape[1]} tokens is not 1 + a square grid")
    if n == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic",
                            align_corners=False).to(pos_embed.dtype)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos_embed[:, :1], patches], dim=1)
