"""KEEP (MAGIC-AI4Med/KEEP, Astaxanthin/KEEP): the image tower of a CLIP-style model.

From the authors' ``KEEPModel`` (``quick_start/keep_inference.py``, the HF remote code):
``visual`` is timm ``vit_large_patch16_224`` (img 224, LayerScale 1e-5, ``num_classes=0``, so
its forward is the final-norm CLS), ``visual_head`` is Linear(1024 -> P), GELU, Linear(P -> P)
with P = ``projection_dim`` (768), and ``encode_image`` L2-normalises the head's output. That
normalised projection is the embedding (what ``encode_image`` returns and TRIDENT stores).
The checkpoint also holds the text tower (``text.*``, a BERT) and ``logit_scale``: unused here
and dropped by ``adapt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_TEXT_SIDE = ("text.", "logit_scale")


class KeepImageEncoder(nn.Module):
    def __init__(self, timm_name: str, timm_kwargs: dict, projection_dim: int) -> None:
        super().__init__()
        import timm

        self.visual = timm.create_model(timm_name, pretrained=False, **dict(timm_kwargs))
        width = self.visual.num_features
        self.visual_head = nn.Sequential(nn.Linear(width, projection_dim), nn.GELU(),
                                         nn.Linear(projection_dim, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_head(self.visual(x)), dim=-1)


def adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole KEEP checkpoint -> the image tower's tensors (other unknown keys pass through)."""
    return {k: v for k, v in state.items() if not k.startswith(_TEXT_SIDE)}
