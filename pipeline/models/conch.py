"""CONCH v1 and v1.5 vision towers, rebuilt from timm parts so the conch package is not needed.

Both towers are a timm ViT trunk whose tokens (after the final norm) go through an attentional
pooler with one learned query, then a LayerNorm. The embedding is that normalised pooled vector:
no retrieval projection and no L2 normalisation, which are for image-text matching only.

v1 (MahmoodLab/CONCH, open_clip custom code): ViT-B/16 at 448, pooler =
``torch.nn.MultiheadAttention(512, 8, kdim=768, vdim=768)`` (separate q/k/v projection weights),
checkpoint keys under ``visual.``. v1.5 (MahmoodLab/conchv1_5, vision-only checkpoint
``pytorch_model_vision.bin``): ViT-L/16 with LayerScale built at 224, bias-free ``to_q`` /
``to_kv`` / ``to_out`` pooler, and DINO-style pos_embed interpolation at run time (scale
``(grid + 0.1) / 14``, bicubic, no antialias), so 448 input sees a slightly shifted sampling grid
that a size-based resample would not reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Checkpoint prefixes kept for CONCH v1; text tower, caption pooler and proj_contrast are dropped.
V1_KEEP = ("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast.")
V1_STRIP = "visual."
POOLER_HEADS = 8
POOLER_LN_EPS = 1e-5  # nn.LayerNorm default in the authors' pooler and ln_contrast


class MHAPooler(nn.Module):
    """CONCH v1 ``attn_pool_contrast``: one query attends over the trunk tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model, eps=POOLER_LN_EPS)
        self.ln_k = nn.LayerNorm(context_dim, eps=POOLER_LN_EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens).transpose(0, 1)  # (L, N, C): MultiheadAttention is seq-first
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)
        out = self.attn(q, kv, kv, need_weights=False)[0]
        return out.transpose(0, 1)  # (N, n_queries, d_model)


class BiasFreePooler(nn.Module):
    """CONCH v1.5 ``attn_pool_contrast``: same maths, bias-free to_q / to_kv / to_out."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim, eps=POOLER_LN_EPS)
        self.ln_q = nn.LayerNorm(d_model, eps=POOLER_LN_EPS)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, h = tokens.shape[0], self.heads
        q = self.to_q(self.ln_q(self.query)).expand(n, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as the authors'
        return self.to_out(out.transpose(1, 2).flatten(2))


def _vit_class() -> type[nn.Module]:
    from timm.models.vision_transformer import VisionTransformer

    class DinoInterpViT(VisionTransformer):  # type: ignore[misc, valid-type]
        """timm ViT whose pos_embed follows DINO's run-time interpolation (CONCH v1.5 trunk)."""

        def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
            b, gh, gw, c = x.shape  # dynamic_img_size: patch_embed gives NHWC
            pos = dino_interpolate_pos_embed(self.pos_embed, gh, gw)
            x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, -1, c)], dim=1)
            return self.pos_drop(x + pos)

    return DinoInterpViT


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(1, 1 + n*n, C) -> (1, 1 + gh*gw, C) with the +0.1 scale trick, bicubic, no antialias."""
    n = int(math.sqrt(pos_embed.shape[1] - 1))
    if gh == gw == n:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    c = grid.shape[-1]
    grid = grid.reshape(1, n, n, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), scale_factor=((gh + 0.1) / n, (gw + 0.1) / n),
                         mode="bicubic", align_corners=False).to(pos_embed.dtype)
    if grid.shape[-2:] != (gh, gw):
        raise RuntimeError(f"pos_embed interpolation gave {tuple(grid.shape[-2:])}, "
                           f"expected {(gh, gw)}")
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, c)], dim=1)


class ConchTower(nn.Module):
    """trunk -> pooler -> token 0 -> ln_contrast; ``forward_features`` gives the trunk tokens."""

    def __init__(self, trunk: nn.Module, pooler: nn.Module, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(dim, eps=POOLER_LN_EPS)
        self.num_features = dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(x))[:, 0])


def build_v1(timm_name: str, timm_kwargs: Mapping[str, Any], dim: int) -> ConchTower:
    """ViT-B/16 trunk at 448 (global_pool '' so its forward returns all tokens) + MHA pooler."""
    import timm

    trunk = timm.create_model(timm_name, pretrained=False, **dict(timm_kwargs))
    pooler = MHAPooler(dim, trunk.num_features, POOLER_HEADS)
    return ConchTower(trunk, pooler, dim)


def build_v15(timm_name: str, timm_kwargs: Mapping[str, Any], dim: int) -> ConchTower:
    """ViT-L/16 (LayerScale) built at 224 with DINO pos_embed interpolation + bias-free pooler."""
    kwargs = {**_VIT_ARCH[timm_name], **dict(timm_kwargs), "dynamic_img_size": True}
    trunk = _vit_class()(**kwargs)
    pooler = BiasFreePooler(dim, trunk.num_features, POOLER_HEADS)
    return ConchTower(trunk, pooler, dim)


# timm's architecture kwargs for the names a subclassed trunk can take (create_model cannot
# build a subclass); the values are those of timm's own model functions.
_VIT_ARCH: dict[str, dict[str, Any]] = {
    "vit_large_patch16_224": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def adapt_v1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the vision-tower keys the embedding uses (``V1_KEEP``), without ``visual.``.

    The text tower, caption pooler and ``proj_contrast`` are dropped; the kept keys then load
    strictly. A state dict with none of these prefixes is returned unchanged so that the strict
    check names what it holds instead of reporting an empty checkpoint.
    """
    if not any(k.startswith(V1_KEEP) for k in state):
        return state  # not a CONCH layout (e.g. a bare tower state dict): strict check decides
    return {k.removeprefix(V1_STRIP): v for k, v in state.items() if k.startswith(V1_KEEP)}


def adapt_v15(state: dict[str, torch.Tensor], grid: int = 14) -> dict[str, torch.Tensor]:
    """The authors resize a checkpoint pos_embed of another grid to 14x14 (bilinear, no AA)."""
    from timm.layers import resample_abs_pos_embed

    pos = state.get("trunk.pos_embed")
    if pos is None or pos.shape[1] == 1 + grid * grid:
        return state
    out = dict(state)
    out["trunk.pos_embed"] = resample_abs_pos_embed(pos, new_size=[grid, grid],
                                                    num_prefix_tokens=1,
                                                    interpolation="bilinear", antialias=False)
    return out
