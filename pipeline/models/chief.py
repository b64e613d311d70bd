"""CHIEF slide encoder (hms-dbmi/CHIEF ``models/CHIEF.py``): gated attention-MIL over tiles.

The authors build ``CHIEF(size_arg="small", dropout=True, n_classes=2)`` and read
``result['WSI_feature']`` = softmax over tiles of the gated attention score, times the *input*
CTransPath features (768-d): ``attention_net`` (Linear 768 -> 512, ReLU, Dropout, gated
attention 512 -> 256 -> 1) only scores the tiles. The anatomical-site text embedding is added
to the 512-d pooled feature for the classifier, not to ``WSI_feature`` (TRIDENT passes site 0).

Module names are the checkpoint's (``CHIEF_pretraining.pth``, a bare state dict): the
classifier heads, ``att_head``, ``text_to_vision`` and the ``organ_embedding`` buffer are
built and loaded strictly as the authors do, and unused. Scores are computed in chunks of
tiles, so memory is the input plus one float per tile.
"""

from __future__ import annotations

import torch
from torch import nn

IN_DIM, HIDDEN, ATTN = 768, 512, 256  # size_dict["small"]
N_CLASSES = 2
ORGANS = 19  # rows of the organ_embedding buffer (Text_emdding.pth)
CHUNK = 16384  # tiles scored at once


class GatedAttention(nn.Module):
    """Gated attention score of each tile (CLAM's Attn_Net_Gated with one class; Madeleine's
    BatchedABMIL is the same network under the same key names): (N, dim) -> (N, 1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(0.25))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(),
                                         nn.Dropout(0.25))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class _AttHead(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)


class CHIEFSlideEncoder(nn.Module):
    """Tile features (N, 768) -> the slide's WSI_feature (768,)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Dropout(0.25),
                                           GatedAttention(HIDDEN, ATTN))
        self.classifiers = nn.Linear(HIDDEN, N_CLASSES)
        self.instance_classifiers = nn.ModuleList(nn.Linear(HIDDEN, 2) for _ in range(N_CLASSES))
        self.att_head = _AttHead(HIDDEN, ATTN)
        self.text_to_vision = nn.Sequential(nn.Linear(768, HIDDEN), nn.ReLU(), nn.Dropout(0.25))
        self.register_buffer("organ_embedding", torch.zeros(ORGANS, 768))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Raw attention score per tile (N,), in chunks (the 512-wide hidden is per tile)."""
        return torch.cat([self.attention_net(x[i:i + CHUNK]).squeeze(-1)
                          for i in range(0, len(x), CHUNK)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != IN_DIM:
            raise ValueError(f"CHIEF reads (N, {IN_DIM}) tile features, got {tuple(x.shape)}")
        weights = torch.softmax(self.scores(x).float(), dim=0)
        return weights.to(x.dtype) @ x
