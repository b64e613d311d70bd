"""TITAN slide encoder (MahmoodLab, TITAN-preview vision tower) in pure PyTorch.

The architecture lives only in the model's hub code (``MahmoodLab/TITAN``:
``vision_transformer.py``, ``modeling_titan.py``, ``config.json``); mahmoodlab/TITAN on
GitHub holds evaluation scripts. It was read from the verbatim copy of that hub code in
DIAGNijmegen/unicorn_baseline (``src/unicorn_baseline/vision/pathology/titan/``, commit
dec3809), the only readable source. ``encode_slide_from_patch_features`` computes:

1. ``preprocess_features``: grid cell = floor((coords - min coords) / patch_size_lv0) per
   axis; features of tiles sharing a cell are summed (``index_add_``); cells whose summed
   feature is all zero are background and dropped; tokens in row-major grid order.
2. ``patch_embed``: Linear(768, 768) + exact GELU; a CLS token in front; no position
   embedding (``pos_encode_type = "alibi"``).
3. 6 pre-LN blocks (LayerNorm eps 1e-6, qkv with bias, 12 heads of 64, MLP 3072 GELU, no
   LayerScale) with a 2-D ALiBi bias: head h adds ``-slope_h * |cell_i - cell_j|``
   (Euclidean, in grid cells) to logit (i, j); 0 on the CLS row and column. Slopes for 12
   heads: ALiBi's 8 base slopes 2**-1 .. 2**-8 plus 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5.
4. final LayerNorm (eps 1e-6), then ``attn_pool_contrastive``: AttentionalPooler(768, 768,
   8 heads, 1 query): ``nn.MultiheadAttention(ln_q(query), ln_k(tokens), ln_k(tokens))``
   over every token, CLS included (its LayerNorms eps 1e-5). With ``no_proj=True`` the
   pooled 768-d vector is the embedding: ``proj`` and the 128-query ``attn_pool`` (the
   captioning branch) are loaded and unused.

The reference builds the (N+1)^2 bias per head (and its float64 distance matrix): 120 GB at
100k tiles. Here attention runs block by block with an online softmax and the bias is made
per block from the cells, so memory is linear in the tile count (``MAX_LOGITS``).

Names are the hub checkpoint's without its ``vision_encoder.`` prefix; ``text_encoder.*``
(the text tower) is dropped by ``adapt``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 768
DEPTH = 6
NUM_HEADS = 12
MLP_DIM = 3072
POOL_HEADS = 8
CAPTION_QUERIES = 128
# Largest number of attention logits (heads x queries x keys) held at once: 64 MB in fp32.
MAX_LOGITS = 1 << 24
Q_BLOCK = 1024
TOKEN_CHUNK = 16384  # tokens through an MLP at once (the 3072-wide hidden is per token)


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes (Press et al.), as TITAN's get_slopes computes them for n heads."""
    if math.log2(n).is_integer():
        p = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [p * p ** i for i in range(n)]
    base = 2 ** math.floor(math.log2(n))
    return alibi_slopes(base) + alibi_slopes(2 * base)[0::2][: n - base]


def tile_cells(coords: torch.Tensor, features: torch.Tensor, tile_l0: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) level-0 px + (N, D) features -> (M, 2) occupied cells (row-major) and their
    summed features (M, D): preprocess_features without the dense (H, W, D) grid.

    The authors' coordinates are multiples of an integer ``patch_size_lv0``, so their floor
    division is exact; ours are rounded from col * tile_l0 with a fractional tile_l0, where
    floor can land a cell short. Nearest gives the same cells on their grids and the right
    ones on ours."""
    rel = coords.to(torch.float64) - coords.to(torch.float64).min(dim=0).values
    grid = torch.round(rel / float(tile_l0)).long()
    width = int(grid[:, 1].max()) + 1
    flat = grid[:, 0] * width + grid[:, 1]
    cells, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    summed = features.new_zeros(len(cells), features.shape[1], dtype=torch.float32)
    summed.index_add_(0, inverse, features.float())
    keep = torch.any(summed != 0, dim=1)  # background: an all-zero cell feature
    cells = torch.stack([torch.div(cells, width, rounding_mode="floor"), cells % width], 1)
    return cells[keep], summed[keep]


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cells: torch.Tensor,
                    slopes: torch.Tensor, query_rows: int | None = None) -> torch.Tensor:
    """(H, L, d) q/k/v, token 0 the CLS, (L-1, 2) grid cells of the others -> (H, L, d).

    Exact softmax attention with logits q.k / sqrt(d) - slope * distance, computed in blocks
    of queries and keys with a running max and sum: memory O(MAX_LOGITS), not O(L^2).
    ``query_rows``: only the first rows are computed, the others left zero (benchmarks time
    a fraction of a layer whose cost is quadratic)."""
    h, length, d = q.shape
    scale = d ** -0.5
    pos = torch.cat([cells.new_zeros(1, 2), cells]).to(torch.float64)  # row 0: the CLS
    not_cls = torch.ones(length, dtype=torch.float32, device=q.device)
    not_cls[0] = 0.0  # the CLS row and column carry no bias
    slopes = slopes.to(device=q.device, dtype=torch.float32).view(h, 1, 1)
    qb = max(1, min(Q_BLOCK, length))
    kb = max(256, MAX_LOGITS // (h * qb))
    out = torch.zeros_like(q) if query_rows is not None else torch.empty_like(q)
    for i0 in range(0, length if query_rows is None else min(query_rows, length), qb):
        qs = q[:, i0:i0 + qb]
        top = torch.full((h, qs.shape[1], 1), -torch.inf, device=q.device)
        total = torch.zeros((h, qs.shape[1], 1), device=q.device)
        acc = torch.zeros((h, qs.shape[1], d), device=q.device)
        for j0 in range(0, length, kb):
            ks, vs = k[:, j0:j0 + kb], v[:, j0:j0 + kb]
            # Squared distances of integer cells are exact in float64; the square root in
            # float64, then float32, as the reference (numpy float64, then float32).
            diff = pos[i0:i0 + qb, None, :] - pos[None, j0:j0 + kb, :]
            dist = diff.square().sum(-1).sqrt().to(torch.float32)
            dist = dist * not_cls[i0:i0 + qb, None] * not_cls[None, j0:j0 + kb]
            s = (qs @ ks.transpose(1, 2)).float() * scale - slopes * dist
            new_top = torch.maximum(top, s.amax(dim=-1, keepdim=True))
            p = torch.exp(s - new_top)
            keep = torch.exp(top - new_top)
            total = total * keep + p.sum(dim=-1, keepdim=True)
            acc = acc * keep + (p.to(vs.dtype) @ vs).float()
            top = new_top
        out[:, i0:i0 + qb] = (acc / total).to(q.dtype)
    return out


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_rows: int | None = None  # benchmarks: see alibi_attention
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cells: torch.Tensor, slopes: torch.Tensor
                ) -> torch.Tensor:
        length, dim = x.shape
        q, k, v = self.qkv(x).view(length, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        out = alibi_attention(q, k, v, cells, slopes, self.query_rows)
        return self.proj(out.transpose(0, 1).reshape(length, dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor, cells: torch.Tensor, slopes: torch.Tensor
                ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cells, slopes)
        # Position-wise, so chunking over tokens is exact and bounds the 4x-wide hidden.
        return torch.cat([xs + self.mlp(self.norm2(xs))
                          for xs in x.split(TOKEN_CHUNK)])


class _Blocks(nn.Module):
    def __init__(self, depth: int, **kw: int) -> None:
        super().__init__()
        self.modules_list = nn.ModuleList(_Block(**kw) for _ in range(depth))


class _AttentionalPooler(nn.Module):
    def __init__(self, dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(L, D) tokens -> (queries, D), one image (the reference's B == 1 path)."""
        kv = self.ln_k(x)
        out, _ = self.attn(self.ln_q(self.query), kv, kv, need_weights=False)
        return out


class TitanSlideEncoder(nn.Module):
    """CONCH v1.5 tile features + level-0 coords + tile size -> TITAN slide embedding (768,).

    ``depth`` exists for tests and benchmarks; the default is the released model's."""

    def __init__(self, depth: int = DEPTH) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(EMBED_DIM, EMBED_DIM), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.blocks = _Blocks(depth, dim=EMBED_DIM, heads=NUM_HEADS, hidden=MLP_DIM)
        self.norm = nn.LayerNorm(EMBED_DIM, eps=1e-6)
        self.attn_pool = _AttentionalPooler(EMBED_DIM, POOL_HEADS, CAPTION_QUERIES)
        self.attn_pool_contrastive = _AttentionalPooler(EMBED_DIM, POOL_HEADS, 1)
        self.proj = nn.Parameter(torch.zeros(EMBED_DIM, EMBED_DIM))

    def forward(self, features: torch.Tensor, coords: torch.Tensor,
                tile_l0: float) -> torch.Tensor:
        """features (N, 768), coords (N, 2) level-0 px (x, y), tile_l0: the tiles' level-0
        edge (TITAN's patch_size_lv0: 512 at 20x, 1024 at 40x) -> (768,)."""
        if features.ndim != 2 or features.shape[1] != EMBED_DIM or coords.shape != (
                len(features), 2):
            raise ValueError(f"TITAN reads (N, {EMBED_DIM}) features and (N, 2) coords, got "
                             f"{tuple(features.shape)} and {tuple(coords.shape)}")
        cells, tokens = tile_cells(coords, features, tile_l0)
        slopes = torch.tensor(alibi_slopes(NUM_HEADS), device=features.device)
        # fp32 residual stream, as the reference's cat with the fp32 CLS promotes it to.
        x = torch.cat([self.cls_token[0].float(), self.patch_embed(tokens).float()])
        for block in self.blocks.modules_list:
            x = block(x, cells, slopes)
        return self.attn_pool_contrastive(self.norm(x))[0]


def adapt(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub checkpoint (``vision_encoder.*`` + ``text_encoder.*``) -> this module's names.

    A vision-tower state dict without the prefix passes as it is; other keys pass through,
    so the strict load still names them."""
    out = {}
    for key, value in state.items():
        if key.startswith("text_encoder."):
            continue
        out[key.removeprefix("vision_encoder.")] = value
    return out
