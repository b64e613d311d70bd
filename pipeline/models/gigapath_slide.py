"""Prov-GigaPath slide encoder (LongNet, 12 layers x 768) in pure PyTorch, CPU or GPU.

The authors' code (prov-gigapath/prov-gigapath ``gigapath/slide_encoder.py`` with its vendored
``torchscale``) needs flash-attn, hence CUDA, and precomputes a 1,000,001-row position table
(3 GB). This module reproduces the same maths without either:

* the 2D sin-cos position embedding is computed on the fly for the tiles in use only;
* dilated attention runs segment by segment with a kernel that also returns the log-sum-exp
  needed to merge the five branches; memory is linear in the number of tiles (no L x L
  matrix is ever built, see ``MAX_LOGITS``).

Parameter names follow the official ``slide_encoder.pth`` (``["model"]``) exactly, so the
checkpoint loads strictly. Inference only: every dropout / drop-path of the reference is a
no-op in eval mode (attention dropout is 0.0 in its config), so none is implemented.

Reference quirks reproduced on purpose (the weights were trained with them):

* padded keys inside a segment are zeros and are *not* masked (logit 0, value 0);
* a branch log-sum-exp that is exactly 0.0 is treated as "absent" (set to -1e8);
* when a segment length is not a multiple of its dilation ratio (185363 with ratio 8) and the
  sequence spans several segments (more than 185,362 tiles), the reference reads outputs back
  at the wrong offsets (segments are re-concatenated at their padded length); we do the same.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.weights import WeightsError

EMBED_DIM = 768
IN_CHANS = 1536
DEPTH = 12
NUM_HEADS = 16
FFN_DIM = 3072
SLIDE_NGRIDS = 1000  # position grid is 1000 x 1000 tiles
# 2 ** linspace(log2(1024), log2((262144 // 256) ** 2), 5), truncated to int as the reference.
SEGMENT_LENGTHS: tuple[int, ...] = (1024, 5792, 32768, 185363, 1048576)
DILATED_RATIOS: tuple[int, ...] = (1, 2, 4, 8, 16)
ABSENT_LSE = -1e8  # the reference's log-sum-exp for (position, head) pairs a branch skips
# Largest number of attention logits materialised at once by the "math" kernel (fp32: 64 MB).
MAX_LOGITS = 1 << 24
# Tokens per FFN chunk: the 3072-wide intermediate would otherwise be 12 KB per tile.
FFN_CHUNK = 16384

ATTN_IMPLS = ("auto", "math", "sdpa_cpu", "sdpa_cuda", "flash_attn")
# torch's CUDA flash kernel: Ampere (sm80) and newer, half precision, head dim <= 256
SDPA_CUDA_MIN_CAPABILITY = (8, 0)


# --- position embedding ------------------------------------------------------------------------


def coords_to_pos(coords: torch.Tensor, tile_size_l0: float) -> torch.Tensor:
    """Flat grid index ``floor(x/tile) * 1000 + floor(y/tile) + 1`` (0 is the CLS slot).

    The reference divides by a hard-coded 256.0; ``tile_size_l0`` makes the unit explicit
    (pass 256 with level-0 px of a 0.5 mpp scan to match it). Tiles outside the 1000 x 1000
    grid raise instead of silently wrapping into a neighbouring row as the reference would.
    """
    if tile_size_l0 <= 0:
        raise ValueError(f"tile_size_l0 must be > 0, got {tile_size_l0}")
    grid = torch.floor(coords.to(torch.float64) / float(tile_size_l0))
    if grid.numel() and (grid.min() < 0 or grid.max() >= SLIDE_NGRIDS):
        raise ValueError(
            f"tile grid index out of [0, {SLIDE_NGRIDS}) (min {grid.min().item():.0f}, max "
            f"{grid.max().item():.0f}): coords must be level-0 px >= 0 and the slide at most "
            f"{SLIDE_NGRIDS} tiles of {tile_size_l0} px wide/high"
        )
    grid = grid.long()
    return grid[..., 0] * SLIDE_NGRIDS + grid[..., 1] + 1


def sincos_pos_embed(pos: torch.Tensor, dim: int = EMBED_DIM) -> torch.Tensor:
    """Rows ``pos`` of the reference's fixed 2D sin-cos table, without building the table.

    Row ``p > 0`` is grid cell (i, j) = divmod(p - 1, 1000) with i the x and j the y tile index;
    the first half of the vector encodes j, the second i, each as [sin(t*w), cos(t*w)] with
    w_k = 1 / 10000 ** (k / (dim/4)). Computed in float64 and cast to float32 like the
    reference; row 0 (the CLS slot) is zeros.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    idx = pos.to(torch.int64) - 1
    i = torch.div(idx, SLIDE_NGRIDS, rounding_mode="floor").to(torch.float64)
    j = torch.remainder(idx, SLIDE_NGRIDS).to(torch.float64)
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=pos.device)
                              / quarter)
    parts = []
    for t in (j, i):
        angles = t.unsqueeze(-1) * omega
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=-1)
    emb = torch.where((pos == 0).unsqueeze(-1), torch.zeros_like(emb), emb)
    return emb.to(torch.float32)


# --- dilated attention -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _flash_attn_func() -> Any:
    """flash-attn's kernel, imported once per process (None when not installed)."""
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - optional accelerator, any import failure means "absent"
        return None
    return flash_attn_func


def choose_impl(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None,
                has_flash_attn: bool, has_cpu_flash: bool, head_dim: int = 48) -> str:
    """The kernel "auto" means for these inputs: flash-attn where installed, else torch's own
    flash kernel (CUDA sm80+, half precision; returns the fp32 log-sum-exp that merging
    branches needs), the CPU flash kernel on CPU, else the exact chunked "math" fallback."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device_type == "cuda" and half:
        if has_flash_attn:
            return "flash_attn"
        if capability is not None and capability >= SDPA_CUDA_MIN_CAPABILITY and head_dim <= 256:
            return "sdpa_cuda"
    if device_type == "cpu" and has_cpu_flash:
        return "sdpa_cpu"
    return "math"


def _pick_impl(impl: str, q: torch.Tensor) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    return choose_impl(q.device.type, q.dtype, capability, _flash_attn_func() is not None,
                       hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
                       q.shape[-1])


def _attend_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention + log-sum-exp, chunked so at most MAX_LOGITS logits exist."""
    s, h, m, d = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty((s, h, m), dtype=acc_dtype, device=q.device)
    per_query = h * k.shape[2]  # logits one query row of one segment needs
    q_chunk = max(1, min(m, MAX_LOGITS // per_query))
    seg_chunk = max(1, min(s, MAX_LOGITS // (per_query * q_chunk)))
    # Logits and softmax in fp32 whatever the inputs (a half-precision matmul would round the
    # logits before the softmax); autocast off, or it would cast the matmul back to half.
    with torch.autocast(q.device.type, enabled=False):
        for s0 in range(0, s, seg_chunk):
            ks = k[s0:s0 + seg_chunk].transpose(-1, -2).to(acc_dtype)
            vs = v[s0:s0 + seg_chunk]
            for q0 in range(0, m, q_chunk):
                qs = q[s0:s0 + seg_chunk, :, q0:q0 + q_chunk].to(acc_dtype)
                logits = torch.matmul(qs, ks).mul_(scale)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                probs = logits.sub_(chunk_lse.unsqueeze(-1)).exp_()
                out[s0:s0 + seg_chunk, :, q0:q0 + q_chunk] = torch.matmul(probs.to(v.dtype), vs)
                lse[s0:s0 + seg_chunk, :, q0:q0 + q_chunk] = chunk_lse
    return out, lse


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention within each segment: (S, H, m, D) -> out (S, H, m, D), lse (S, H, m).

    Public SDPA does not return the log-sum-exp, which merging branches needs; "sdpa_cpu" is
    the blocked flash kernel behind CPU SDPA (returns it, O(m) memory), "flash_attn" the
    reference's CUDA kernel, "math" a chunked exact fallback for any device.
    """
    if impl == "sdpa_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale)
        return out, lse
    if impl == "sdpa_cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse.float()
    if impl == "flash_attn":
        fn = _flash_attn_func()
        out, lse, _ = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0,
                         softmax_scale=scale, causal=False, return_attn_probs=True)
        return out.transpose(1, 2), lse[..., : q.shape[2]].float()
    return _attend_math(q, k, v, scale)


def _branch_geometry(length: int, segment_length: int, ratio: int) -> tuple[int, int, int]:
    """(s, n, g): segment length used, number of segments, segment length padded to ratio."""
    s = min(segment_length, length)
    n = -(-length // s)
    g = -(-s // ratio) * ratio
    return s, n, g


def _to_sparse(x: torch.Tensor, s: int, n: int, g: int, r: int) -> torch.Tensor:
    """(B, L, H, D) -> (B*n, H, g/r, D): head group j keeps segment positions = j (mod r)."""
    b, length, h, d = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, n * s - length)).view(b, n, s, h, d)
    if g != s:
        x = F.pad(x, (0, 0, 0, 0, 0, g - s))
    x = x.reshape(b, n, g // r, r, r, h // r, d)  # positions (m, r1), heads (r2, h')
    x = torch.diagonal(x, dim1=3, dim2=4)  # (b, n, m, h', d, r)
    return x.permute(0, 1, 5, 3, 2, 4).reshape(b * n, h, g // r, d)


def _to_dense(out: torch.Tensor, lse: torch.Tensor, b: int, n: int, g: int, r: int,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _to_sparse; skipped (position, head) pairs get out 0 and lse ABSENT_LSE.

    Like the reference, segments are re-concatenated at their padded length g and the first
    ``length`` rows are kept.
    """
    _, h, m, d = out.shape
    dense = out.new_zeros(b, n, m, r, r, h // r, d)
    torch.diagonal(dense, dim1=3, dim2=4).copy_(
        out.view(b, n, r, h // r, m, d).permute(0, 1, 4, 3, 5, 2))
    dense_lse = lse.new_full((b, n, m, r, r, h // r), ABSENT_LSE)
    torch.diagonal(dense_lse, dim1=3, dim2=4).copy_(
        lse.view(b, n, r, h // r, m).permute(0, 1, 4, 3, 2))
    return (dense.view(b, n * g, h, d)[:, :length],
            dense_lse.view(b, n * g, h)[:, :length])


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      segment_lengths: Sequence[int] = SEGMENT_LENGTHS,
                      dilated_ratios: Sequence[int] = DILATED_RATIOS, *,
                      impl: str = "auto") -> torch.Tensor:
    """LongNet dilated attention on (B, L, H, D) q/k/v -> (B, L, H, D), as torchscale does it.

    Each branch attends within segments over every r-th position and yields (out, lse); the
    branches are merged with softmax weights over their lse, accumulated online so only one
    branch's dense output exists at a time.
    """
    b, length, h, d = q.shape
    impl = _pick_impl(impl, q)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = d ** -0.5
    acc = acc_max = acc_sum = None
    for sl, r in zip(segment_lengths, dilated_ratios, strict=True):
        if h % r:
            raise ValueError(f"{h} heads are not divisible by dilation ratio {r}")
        s, n, g = _branch_geometry(length, sl, r)
        qs, ks, vs = (_to_sparse(t, s, n, g, r).contiguous() for t in (q, k, v))
        out, lse = _attend(qs, ks, vs, scale, impl)
        del qs, ks, vs
        # Reference quirk (see module docstring): an lse of exactly 0 counts as absent.
        lse = lse.to(acc_dtype).masked_fill(lse == 0, ABSENT_LSE)
        out, lse = _to_dense(out, lse, b, n, g, r, length)
        if acc is None:
            acc, acc_max, acc_sum = out.to(acc_dtype), lse, torch.ones_like(lse)
            continue
        new_max = torch.maximum(acc_max, lse)
        old_w = torch.exp(acc_max - new_max)
        new_w = torch.exp(lse - new_max)
        acc = acc.mul_(old_w.unsqueeze(-1)).add_(out.to(acc_dtype) * new_w.unsqueeze(-1))
        acc_sum = acc_sum * old_w + new_w
        acc_max = new_max
        del out, lse
    assert acc is not None and acc_sum is not None
    return acc.div_(acc_sum.unsqueeze(-1)).to(q.dtype)


# --- modules (names match slide_encoder.pth) ----------------------------------------------------


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_chans, embed_dim)


class _DilatedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, segment_lengths: Sequence[int],
                 dilated_ratios: Sequence[int], attn_impl: str) -> None:
        super().__init__()
        self.heads = heads
        self.segment_lengths = tuple(segment_lengths)
        self.dilated_ratios = tuple(dilated_ratios)
        self.attn_impl = attn_impl
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = (p(x).view(b, length, self.heads, dim // self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = dilated_attention(q, k, v, self.segment_lengths, self.dilated_ratios,
                                 impl=self.attn_impl)
        del q, k, v
        return self.out_proj(self.inner_attn_ln(attn.reshape(b, length, dim)))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc1(x).float()).type_as(x)  # exact (erf) GELU in fp32, as torchscale
        return self.fc2(self.ffn_layernorm(y))


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, segment_lengths: Sequence[int],
                 dilated_ratios: Sequence[int], attn_impl: str) -> None:
        super().__init__()
        self.self_attn = _DilatedSelfAttention(dim, heads, segment_lengths, dilated_ratios,
                                               attn_impl)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = _FeedForward(dim, ffn_dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        # Position-wise, so chunking over tokens is exact and bounds the 4x-wide intermediate.
        out = torch.empty_like(x)
        for t0 in range(0, x.shape[1], FFN_CHUNK):
            xs = x[:, t0:t0 + FFN_CHUNK]
            out[:, t0:t0 + FFN_CHUNK] = xs + self.ffn(self.final_layer_norm(xs))
        return out


class _LongNetEncoder(nn.Module):
    def __init__(self, depth: int, **layer_kw: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(**layer_kw) for _ in range(depth))
        self.layer_norm = nn.LayerNorm(layer_kw["dim"], eps=1e-5)


class GigaPathSlideEncoder(nn.Module):
    """Prov-GigaPath ``gigapath_slide_enc12l768d``: tile embeddings + coords -> slide embedding.

    ``depth``, ``segment_lengths`` and ``dilated_ratios`` exist for tests and benchmarks
    (fewer layers, small segments); the defaults are the released model's.
    ``attn_impl``: "auto" (flash-attn on CUDA half precision when installed, the CPU flash
    kernel on CPU, else "math"), or one of "math", "sdpa_cpu", "flash_attn".
    """

    def __init__(self, depth: int = DEPTH, *, in_chans: int = IN_CHANS,
                 embed_dim: int = EMBED_DIM, num_heads: int = NUM_HEADS, ffn_dim: int = FFN_DIM,
                 segment_lengths: Sequence[int] = SEGMENT_LENGTHS,
                 dilated_ratios: Sequence[int] = DILATED_RATIOS,
                 attn_impl: str = "auto") -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.embed_dim = embed_dim
        self.patch_embed = _PatchEmbed(in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder = _LongNetEncoder(depth, dim=embed_dim, heads=num_heads, ffn_dim=ffn_dim,
                                       segment_lengths=segment_lengths,
                                       dilated_ratios=dilated_ratios, attn_impl=attn_impl)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def embed_tokens(self, tile_embeddings: torch.Tensor, coords: torch.Tensor,
                     tile_size_l0: float) -> torch.Tensor:
        """Encoder input (B, 1+N, D): [CLS, proj(tiles) + pos]; the CLS slot's position is 0."""
        # The residual stream stays fp32 under autocast, as the authors' fp32 position table
        # and CLS token keep it: only the projections and attention run in half precision.
        x = self.patch_embed.proj(tile_embeddings).float()
        pos = coords_to_pos(coords, tile_size_l0).to(x.device)
        x = x + sincos_pos_embed(pos, self.embed_dim).float()
        cls = self.cls_token.float().expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _pool(self, h: torch.Tensor, global_pool: bool) -> torch.Tensor:
        return self.norm(h[:, 1:].mean(dim=1) if global_pool else h[:, 0])

    def forward(self, tile_embeddings: torch.Tensor, coords: torch.Tensor,
                tile_size_l0: float, *, all_layers: bool = False,
                global_pool: bool = True) -> torch.Tensor | dict[str, torch.Tensor]:
        """Slide embedding(s).

        tile_embeddings: (N, 1536) or (B, N, 1536), in the tiling order (row-major as
        produced by tiling: the dilation pattern depends on token order). coords: (N, 2) or
        (B, N, 2) level-0 px (x, y) of each tile's top-left corner; tile_size_l0: tile side in
        the same px.

        Returns, with a leading batch dim only if the input had one:
        * ``all_layers=False``: tensor (B, 768): final hidden states -> ``encoder.layer_norm``
          -> ``norm`` of the mean of the tile tokens (``global_pool=True``, what the authors
          recommend: CLS was not trained) or of the CLS token (``global_pool=False``, the
          reference default).
        * ``all_layers=True``: dict ``layer_{i}_embed`` for i = 0..depth (0 = encoder input,
          i = output of layer i, all taken *before* ``encoder.layer_norm``, pooled, then
          ``norm``) plus ``last_layer_embed`` = ``layer_{depth}_embed``, the keys of the
          authors' ``run_inference_with_slide_encoder``.
        """
        batched = tile_embeddings.dim() == 3
        x = tile_embeddings if batched else tile_embeddings.unsqueeze(0)
        c = coords if coords.dim() == 3 else coords.unsqueeze(0).expand(x.shape[0], -1, -1)
        if x.shape[-1] != self.patch_embed.proj.in_features or c.shape[:2] != x.shape[:2]:
            raise ValueError(f"expected tile_embeddings (B, N, "
                             f"{self.patch_embed.proj.in_features}) and coords (B, N, 2), got "
                             f"{tuple(tile_embeddings.shape)} and {tuple(coords.shape)}")
        h = self.embed_tokens(x, c, tile_size_l0)
        pooled: list[torch.Tensor] = [self._pool(h, global_pool)] if all_layers else []
        for layer in self.encoder.layers:
            h = layer(h)
            if all_layers:
                pooled.append(self._pool(h, global_pool))
        if not all_layers:
            out = self._pool(self.encoder.layer_norm(h), global_pool)
            return out if batched else out[0]
        result = {f"layer_{i}_embed": (p if batched else p[0]) for i, p in enumerate(pooled)}
        result["last_layer_embed"] = result[f"layer_{len(pooled) - 1}_embed"]
        return result


# --- loading -----------------------------------------------------------------------------------


def count_params(depth: int = DEPTH) -> int:
    """Parameter count, built on the meta device (no memory): 86,330,880 for the release."""
    with torch.device("meta"):
        model = GigaPathSlideEncoder(depth)
    return sum(p.numel() for p in model.parameters())


def load_gigapath_slide_encoder(path_or_state: str | os.PathLike[str] | Mapping[str, Any],
                                device: str | torch.device = "cpu",
                                **model_kw: Any) -> GigaPathSlideEncoder:
    """Build the encoder and load ``slide_encoder.pth`` strictly, in eval mode on ``device``.

    Accepts a path (the file holds ``{"model": state_dict}``, read with weights_only=True), the
    loaded dict, or a bare state dict. The reference loads with strict=False and only prints
    what is missing; here any missing/unexpected key or shape mismatch is a WeightsError.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        path = Path(path_or_state)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsError(f"slide encoder weights not found: {path}") from None
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            raise WeightsError(f"cannot read slide encoder weights {path}: "
                               f"{type(err).__name__}: {err}") from err
        where = str(path)
    else:
        obj, where = path_or_state, "given state dict"
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{where}: expected {{'model': state_dict}} (slide_encoder.pth)")
    with torch.device("meta"):
        model = GigaPathSlideEncoder(**model_kw)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8})" if len(items) > 8 else "")
        parts = [f"{len(missing)} missing: {head(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {head(unexpected)}" if unexpected else "",
                 f"{len(shapes)} shape mismatches: {head(shapes)}" if shapes else ""]
        raise WeightsError(f"{where} is not a Prov-GigaPath slide encoder checkpoint "
                           f"(gigapath_slide_enc12l768d): " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
