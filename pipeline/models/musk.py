"""MUSK (lilab-stanford/MUSK, xiangjx/musk): the image path of a BEiT-3 multiway encoder.

Written from the authors' ``musk/modeling.py`` and the torchscale code it vendors
(``model/BEiT3.py``, ``architecture/encoder.py``, ``component/{embedding, multihead_attention,
feedforward_network, multiway_network}.py``), configuration ``musk_large_patch16_384``:
1024 wide, 24 layers, 16 heads, FFN 4096, GELU, pre-LN with sub-LN, LayerNorm eps 1e-5.

An image alone runs every multiway module on its ``A`` (vision) branch, so only those weights
are built here. Per layer: ``x + out_proj(inner_attn_ln(attn(self_attn_layer_norm(x))))`` with
separate q/k/v projections (q scaled by head_dim^-0.5, softmax in fp32), then
``x + fc2(ffn_layernorm(gelu(fc1(final_layer_norm(x)))))``; the encoder ends with
``layer_norm``. Tokens are CLS + 24 x 24 patches plus a learned position table read from row 2
(fairseq's offset). The image embedding without projection or normalisation is the final CLS.

``forward`` is the authors' ``ms_aug=True`` read-out, recommended for linear probes and MIL:
the CLS at the input size concatenated with the mean CLS of the 2 x 2 crops of the input
upsampled twofold (bicubic, fp32) -> 2 x 1024.

Checkpoint: ``beit3.vision_embed.*``, ``beit3.encoder.embed_positions.{A,B}``,
``beit3.encoder.layers.N.<module>.{A,B}.*``, ``beit3.encoder.layer_norm.{A,B}``, plus the text
embedding, the heads and ``logit_scale``; ``adapt`` keeps the ``A`` branch under the names
below and drops the rest (the mask token is for masked-image pre-training).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        hd = dim // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, self.heads, hd).transpose(1, 2)

        q = split(self.q_proj(x)) * hd**-0.5
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1).type_as(q)
        out = (weights @ v).transpose(1, 2).reshape(n, length, dim)
        return self.out_proj(self.inner_attn_ln(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.ffn_layernorm(F.gelu(h.float()).type_as(h)))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SelfAttention(dim, heads, eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class MuskImageEncoder(nn.Module):
    POSITION_OFFSET = 2  # fairseq: position rows start at 2

    def __init__(self, img_size: int = 384, patch_size: int = 16, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, ffn_dim: int = 4096,
                 eps: float = 1e-5, scales: tuple[int, ...] = (1, 2)) -> None:
        super().__init__()
        self.img_size = img_size
        self.scales = tuple(scales)
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        tokens = (img_size // patch_size) ** 2 + 1
        self.embed_positions = nn.Embedding(tokens + self.POSITION_OFFSET, embed_dim)
        self.layers = nn.ModuleList(Layer(embed_dim, num_heads, ffn_dim, eps)
                                    for _ in range(depth))
        self.layer_norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) at the built size -> all tokens after the encoder's layer_norm."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"MUSK takes {self.img_size} px inputs, got {tuple(x.shape[-2:])}")
        t = self.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), t], dim=1)
        t = t + self.embed_positions.weight[self.POSITION_OFFSET:][None]
        for layer in self.layers:
            t = layer(t)
        return self.layer_norm(t)

    def cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ms_aug read-out: per scale s, the input resized to s x size (bicubic, fp32),
        cut into s x s crops of the input size; the CLS of each crop averaged per scale; the
        scales concatenated (scale 1 is the CLS of the input itself)."""
        n, _, size, _ = x.shape
        parts = []
        for s in self.scales:
            if s == 1:
                parts.append(self.cls(x))
                continue
            up = F.interpolate(x.float(), size=s * size, mode="bicubic").to(x.dtype)
            crops = (up.reshape(n, 3, s, size, s, size).permute(2, 4, 0, 1, 3, 5)
                     .reshape(s * s * n, 3, size, size))  # crop-major, as the authors split
            parts.append(self.cls(crops).reshape(s * s, n, -1).mean(0))
        return torch.cat(parts, dim=-1)


def build(kwargs: dict) -> MuskImageEncoder:
    return MuskImageEncoder(**kwargs)


_A_BRANCH = re.compile(r"\.A(?=\.|$)")
_DROPPED_PREFIX = ("beit3.text_embed.", "language_head.", "vision_head.", "logit_scale",
                   "beit3.vision_embed.mask_token")


def adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole MUSK checkpoint -> the vision path's names; unknown keys pass through."""
    if not any(k.startswith("beit3.") for k in state):
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_DROPPED_PREFIX) or re.search(r"\.B(\.|$)", key):
            continue
        if key.startswith("beit3.vision_embed."):
            key = key.removeprefix("beit3.vision_embed.")
        elif key.startswith("beit3.encoder."):
            key = _A_BRANCH.sub("", key.removeprefix("beit3.encoder."))
        out[key] = value
    return out
