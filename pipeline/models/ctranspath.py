"""CTransPath (Xiyue-Wang/TransPath): Swin-T/4 window 7 with a convolutional patch stem.

The authors build ``swin_tiny_patch4_window7_224`` of a patched timm 0.5.4 with their
``ConvStem`` as the patch embedding and replace the head with ``Identity``; the embedding is
the model's output, the average over the final-norm 7 x 7 tokens (768). The stem, from their
``ctran.py``: two [3x3 conv stride 2 (no bias), BatchNorm, ReLU] stages widening
3 -> D/8 -> D/4, then a 1x1 conv (with bias) to D, then the Swin patch-norm LayerNorm.

Here the same network is the current timm Swin with a stem written to its patch-embedding
interface (NHWC output); parameter names match the authors' (``patch_embed.proj.{0,1,3,4,6}``,
``patch_embed.norm``). Their checkpoints (``ctranspath.pth``, CHIEF's ``CHIEF_CTransPath.pth``,
both ``{"model": state}``) use timm 0.5.4's layout: a stage's ``downsample`` stored at the end of
stage i is the start of stage i + 1 in current timm, and ``relative_position_index`` /
``attn_mask`` buffers are stored (current timm recomputes them; they are not parameters).
"""

from __future__ import annotations

import re

import torch
from torch import nn


class ConvStem(nn.Module):
    """The authors' stem, with the keyword interface timm's Swin passes to its embed layer."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 strict_img_size=True, output_fmt="NHWC", device=None, dtype=None,
                 **_: object) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        kw = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _stage in range(2):
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False, **kw),
                       nn.BatchNorm2d(width, **kw), nn.ReLU(inplace=True)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1, **kw))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **kw) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} does not match {self.img_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # NHWC, as timm's Swin expects


def build(timm_name: str, timm_kwargs: dict) -> nn.Module:
    import timm

    return timm.create_model(timm_name, pretrained=False, embed_layer=ConvStem,
                             **dict(timm_kwargs))


_OLD_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BUFFERS = ("relative_position_index", "attn_mask")


def adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm 0.5.4 Swin layout (the authors') -> current timm; current-layout keys pass."""
    old = "layers.0.downsample.reduction.weight" in state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _BUFFERS:
            continue  # recomputed buffers, not parameters
        if old:
            key = _OLD_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[key] = value
    return out
