"""GenBio-PathFM (genbio-ai/genbio-pathfm): a single-channel ViT-g/16 with RoPE, run per colour.

Written from the architecture of the authors' ``genbio_pathfm/model.py`` (the module that
TRIDENT vendors): a DINOv3-style ViT whose parameter names are kept here so that the authors'
``model.pth`` loads strictly.

* ``patch_embed.proj``: Conv2d(1 -> D, 16, stride 16); ``cls_token`` (1, 1, D) and
  ``storage_tokens`` (1, 4, D) are prepended; no absolute position embedding.
* ``rope_embed.periods`` (persistent buffer, D_head / 4 values, kept in **bfloat16** as in the
  authors' default): patch-grid coordinates ``(i + 0.5) / H`` and ``(j + 0.5) / W`` mapped to
  [-1, 1], angles ``2 pi c / period`` for the row then the column coordinate, tiled twice to the
  head width; sine and cosine are computed in bfloat16. The training-time coordinate jitter and
  rescale do nothing in eval mode.
* attention: ``qkv`` without bias, ``proj`` with bias; q and k (all tokens, prefix included) are
  cast to the RoPE dtype, the patch tokens rotated (``x cos + rotate_half(x) sin`` with
  ``rotate_half(x) = [-x2, x1]``), then cast back before scaled dot-product attention.
* blocks: pre-norm LayerNorm(eps 1e-6), LayerScale (``ls1``/``ls2``), SwiGLU with separate
  ``w1``/``w2``/``w3``: ``w3(silu(w1 x) * w2 x)``, hidden ``int(4 D * 2 / 3)`` rounded up to 64.
* ``forward``: an RGB batch is encoded as three single-channel images (``(B, 3, H, W)`` ->
  ``(3 B, 1, H, W)``), and the final-norm CLS tokens of R, G and B are concatenated: 3 D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RopeEmbedding(nn.Module):
    def __init__(self, dim: int, heads: int, base: float = 100.0,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        head = dim // heads
        self.dtype = dtype
        exponents = 2 * torch.arange(head // 4, dtype=dtype) / (head // 2)
        self.register_buffer("periods", base ** exponents, persistent=True)

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"device": self.periods.device, "dtype": self.dtype}
        ys = torch.arange(0.5, h, **kw) / h
        xs = torch.arange(0.5, w, **kw) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0  # (h w, 2) in [-1, 1]
        periods = self.periods.to(self.dtype)  # bfloat16 as in the authors' module, whatever
        # dtype a checkpoint stored it in (their load copies into a bfloat16 buffer)
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)  # (h w, head)
        return torch.sin(angles), torch.cos(angles)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (n, heads, length, head)
        sin, cos = rope
        prefix = length - sin.shape[0]
        rotated = []
        for t in (q, k):
            t16 = t.to(sin.dtype)
            body = t16[:, :, prefix:] * cos + _rotate_half(t16[:, :, prefix:]) * sin
            rotated.append(torch.cat([t16[:, :, :prefix], body], dim=2).to(t.dtype))
        out = F.scaled_dot_product_attention(rotated[0], rotated[1], v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def swiglu_hidden(dim: int, ratio: float = 4.0, align: int = 64) -> int:
    d = int(int(dim * ratio) * 2 / 3)
    return d + (-d % align)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, init_values: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class GenBioPathFM(nn.Module):
    """The backbone (authors' names) plus the per-channel read-out as ``forward``."""

    def __init__(self, embed_dim: int = 1536, depth: int = 40, num_heads: int = 24,
                 patch_size: int = 16, storage_tokens: int = 4, ffn_ratio: float = 4.0,
                 init_values: float = 1e-5) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_storage = storage_tokens
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, storage_tokens, embed_dim))
        self.rope_embed = RopeEmbedding(embed_dim, num_heads)
        hidden = swiglu_hidden(embed_dim, ffn_ratio)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, hidden, init_values) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Single-channel images (N, 1, H, W) -> all tokens after the final norm."""
        patches = self.patch_embed.proj(x)
        h, w = patches.shape[-2:]
        n = x.shape[0]
        t = torch.cat([self.cls_token.expand(n, -1, -1),
                       self.storage_tokens.expand(n, -1, -1),
                       patches.flatten(2).transpose(1, 2)], dim=1)
        rope = self.rope_embed(h, w)
        for block in self.blocks:
            t = block(t, rope)
        return self.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, H, W) -> concatenated final-norm CLS of the R, G and B images (B, 3 D)."""
        b, c, h, w = x.shape
        if c != 3:
            raise ValueError(f"GenBio-PathFM takes RGB input, got {c} channels")
        cls = self.forward_features(x.reshape(b * 3, 1, h, w))[:, 0]
        return cls.reshape(b, 3 * cls.shape[-1])


def build(kwargs: dict) -> GenBioPathFM:
    return GenBioPathFM(**kwargs)
