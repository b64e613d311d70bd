"""MADELEINE slide encoder (mahmoodlab/MADELEINE): multi-head gated attention-MIL on CONCH.

``encode_he`` of ``madeleine/models/Model.py`` with the released configuration (abmil, 4
heads, ``wsi_encoder_hidden_dim`` 512, softmax attention, no stain encoding: the training
script ``scripts/launch_pretrain_withoutStainEncodings.sh``):

1. ``wsi_embedders.pre_attn``: three (Linear, LayerNorm, GELU, Dropout) blocks,
   512 -> 512 -> 512 -> 512 x 4 (LayerNorm eps 1e-5, exact GELU);
2. the 2048 channels are split ``'b t (e c) -> b t e c'`` with c = 4 heads innermost: head c
   takes channels c, c+4, c+8, ... (interleaved, not contiguous slices);
3. per head a BatchedABMIL (gated attention 512 -> 512 -> 1), softmax over tiles, and the
   attention-weighted sum of that head's 512 channels;
4. the (512, 4) result flattened the same way (channel e * 4 + c) -> ``projector``
   Linear(2048, 512): the slide embedding.

``token_projector`` (the training objective's token head) is in the checkpoint and unused.
Names are the checkpoint's (``model.pt``, saved from DDP: ``module.`` is stripped on read).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.chief import GatedAttention

IN_DIM = 512  # CONCH v1 embeddings
HIDDEN = 512  # wsi_encoder_hidden_dim; also BatchedABMIL's hidden_dim
HEADS = 4
TOKEN_DIM = 128
CHUNK = 8192  # tiles through the pre-attention MLP at once


def _block(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.GELU(), nn.Dropout(0.1)]


class _ABMILEmbedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre_attn = nn.Sequential(*_block(IN_DIM, HIDDEN), *_block(HIDDEN, HIDDEN),
                                      *_block(HIDDEN, HIDDEN * HEADS))
        self.attn = nn.ModuleList(GatedAttention(HIDDEN, HIDDEN) for _ in range(HEADS))


class MadeleineSlideEncoder(nn.Module):
    """CONCH tile features (N, 512) -> the slide embedding (512,)."""

    def __init__(self) -> None:
        super().__init__()
        self.wsi_embedders = _ABMILEmbedder()
        self.projector = nn.Linear(HIDDEN * HEADS, HIDDEN)
        self.token_projector = nn.Linear(HIDDEN * HEADS, TOKEN_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != IN_DIM:
            raise ValueError(f"MADELEINE reads (N, {IN_DIM}) tile features, "
                             f"got {tuple(x.shape)}")
        # One pass over chunks of tiles with a running softmax per head (exact up to float
        # rounding): memory is one chunk's 2048-wide hidden state, whatever the tile count.
        top = torch.full((HEADS,), -torch.inf, device=x.device)
        total = torch.zeros(HEADS, device=x.device)
        acc = torch.zeros(HIDDEN, HEADS, device=x.device)
        for i in range(0, len(x), CHUNK):
            # (n, 512 * 4) -> (n, 512 e, 4 c): channel e * 4 + c, as einops '(e c)'.
            h = self.wsi_embedders.pre_attn(x[i:i + CHUNK]).view(-1, HIDDEN, HEADS)
            heads = self.wsi_embedders.attn
            s = torch.cat([net(h[:, :, c]) for c, net in enumerate(heads)],
                          dim=1).float()  # (n, heads)
            new_top = torch.maximum(top, s.max(dim=0).values)
            keep, p = torch.exp(top - new_top), torch.exp(s - new_top)
            total = total * keep + p.sum(dim=0)
            acc = acc * keep + torch.einsum("nec,nc->ec", h.float(), p)
            top = new_top
        pooled = (acc / total).to(self.projector.weight.dtype)  # (512, 4)
        return self.projector(pooled.reshape(HIDDEN * HEADS))
