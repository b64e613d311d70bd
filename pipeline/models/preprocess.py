"""Model input preprocessing on the device the model runs on.

Tiles travel as uint8 (4x smaller than float) and are converted on the GPU, where resize and
normalisation cost nothing next to the forward pass. ``reference_preprocess_pil`` is the
model-card recipe (PIL + torchvision transforms); tests hold the device path against it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.models.specs import TileModelSpec


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision Resize(int): shorter side -> size, longer side truncated, aspect kept.
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def preprocess(tiles_uint8: torch.Tensor, spec: TileModelSpec) -> torch.Tensor:
    """(N, H, W, 3) uint8 on any device -> normalised float32 (N, 3, S, S) on that device."""
    if tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3:
        raise ValueError(f"expected tiles of shape (N, H, W, 3), got {tuple(tiles_uint8.shape)}")
    x = tiles_uint8.permute(0, 3, 1, 2).float()  # 0..255
    h, w = x.shape[-2:]
    size = spec.input_size
    if spec.crop:
        target = _resized_hw(h, w, spec.resize_size)
    else:
        target = (size, size)
    if (h, w) != target:
        down = target[0] < h or target[1] < w
        # PIL's bicubic kernel is a=-0.5 in both directions; torch's antialiased bicubic uses
        # the same kernel, plain bicubic uses a=-0.75 (up to 13/255 off when upsampling).
        # Bilinear upsampling is the same with or without antialias.
        x = F.interpolate(x, size=target, mode=spec.interpolation, align_corners=False,
                          antialias=down or spec.interpolation == "bicubic")
        if spec.interpolation == "bicubic":
            x = x.clamp_(0.0, 255.0)  # bicubic overshoots; PIL clamps to the uint8 range
    if spec.crop:
        h, w = x.shape[-2:]
        if h < size or w < size:
            raise ValueError(f"{spec.id}: resize {spec.resize_size} smaller than crop {size}")
        top = int(round((h - size) / 2.0))  # same rounding as torchvision CenterCrop
        left = int(round((w - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    mean, std = _norm(spec, x.dtype, x.device)
    return (x / 255.0 - mean) / std


_NORMS: dict[tuple[tuple[float, ...], tuple[float, ...], torch.dtype, torch.device],
             tuple[torch.Tensor, torch.Tensor]] = {}


def _norm(spec: TileModelSpec, dtype: torch.dtype,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std as (1, 3, 1, 1) tensors, made once per device: building them per batch is a
    blocking host-to-device copy, a stall of the GPU's queue before every forward."""
    key = (tuple(spec.mean), tuple(spec.std), dtype, device)
    if key not in _NORMS:
        _NORMS[key] = (torch.tensor(spec.mean, dtype=dtype, device=device).view(1, 3, 1, 1),
                       torch.tensor(spec.std, dtype=dtype, device=device).view(1, 3, 1, 1))
    return _NORMS[key]


def reference_preprocess_pil(img: Image.Image, spec: TileModelSpec) -> torch.Tensor:
    """The model card's transform (PIL resize, centre crop, ToTensor, Normalize) -> (3, S, S)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
    interp = mode[spec.interpolation]
    steps: list = []
    if spec.crop:
        steps += [transforms.Resize(spec.resize_size, interpolation=interp),
                  transforms.CenterCrop(spec.input_size)]
    else:
        steps.append(transforms.Resize((spec.input_size, spec.input_size), interpolation=interp))
    steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    return transforms.Compose(steps)(img.convert("RGB"))


def preprocess_cpu(tiles_uint8: np.ndarray, spec: TileModelSpec) -> torch.Tensor:
    """Exact model-card preprocessing (PIL) of (N, H, W, 3) uint8 tiles -> (N, 3, S, S) float32.

    For specs with ``preprocess_on == "cpu"``: bit-for-bit the authors' transform, at the cost
    of CPU time per tile in the encoder actor. Move the result to the model's device.
    """
    if tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3 or tiles_uint8.dtype != np.uint8:
        raise ValueError(f"expected uint8 tiles (N, H, W, 3), got {tiles_uint8.dtype} "
                         f"{tuple(tiles_uint8.shape)}")
    size = spec.input_size
    if len(tiles_uint8) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.stack([reference_preprocess_pil(Image.fromarray(t), spec) for t in tiles_uint8])


def denormalise(x: torch.Tensor, spec: TileModelSpec) -> torch.Tensor:
    """Back to 0-1 pixel units, to compare preprocessings in units people understand."""
    shape = (1,) * (x.ndim - 3) + (3, 1, 1)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(shape)
    return x * std + mean
