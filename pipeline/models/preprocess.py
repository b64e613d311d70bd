"""Model input preprocessing on the device the model runs on.

Tiles travel as uint8 (4x smaller than float) and are converted on the GPU, where resize and
normalisation cost nothing next to the forward pass. The resize reproduces PIL's integer
arithmetic, so the device path gives the model cards' pixels exactly (bench/preprocess.py:
every model, every test tile); ``reference_preprocess_pil`` is that recipe (PIL +
torchvision transforms), which tests hold the device path against.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from pipeline.models.specs import TileModelSpec


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision Resize(int): shorter side -> size, longer side truncated, aspect kept.
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


# Pillow's resampling of 8-bit images, as its Resample.c computes it: per output pixel, the
# filter's taps at (x - centre + 0.5) / filterscale, normalised to sum 1, quantised to 22-bit
# fixed point (32 - 8 - 2 bits), accumulated in integers from 2**21 (round half up), shifted
# back and clamped to 0..255, once per pass.
PIL_PRECISION_BITS = 22
_PIL_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _pil_filter(mode: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if mode == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # PIL's bicubic; torch's plain bicubic uses -0.75
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


@functools.lru_cache(maxsize=64)
def pil_taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """One PIL pass as taps: (n_out, K) input indices and (n_out, K) int weights x 2**22.

    Padding taps (rows with fewer than K) point at index 0 with weight 0."""
    if mode not in _PIL_SUPPORT:
        raise ValueError(f"no PIL filter {mode!r}; expected one of {sorted(_PIL_SUPPORT)}")
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = _PIL_SUPPORT[mode] * filterscale
    one = float(1 << PIL_PRECISION_BITS)
    rows = []
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)  # C casts truncate toward zero
        hi = min(int(centre + support + 0.5), n_in)
        xs = np.arange(lo, hi)
        k = _pil_filter(mode, (xs - centre + 0.5) / filterscale)
        if k.sum() != 0.0:
            k = k / k.sum()
        rows.append((xs, np.trunc(np.where(k < 0.0, k * one - 0.5, k * one + 0.5))))
    width = max(len(xs) for xs, _ in rows)
    idx = np.zeros((n_out, width), np.int64)
    weight = np.zeros((n_out, width), np.int64)
    for o, (xs, k) in enumerate(rows):
        idx[o, :len(xs)] = xs
        weight[o, :len(xs)] = k
    return idx, weight


_TAPS: dict[tuple[int, int, str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_DENSE: dict[tuple[int, int, str, torch.device], torch.Tensor] = {}
# GPUs with full-rate FP64 (A100, H100/H200, B200): a float64 matmul is the fastest exact pass.
FULL_FP64_CAPABILITIES = {(8, 0), (9, 0), (10, 0)}


def _taps(n_in: int, n_out: int, mode: str,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (n_in, n_out, mode, device)
    if key not in _TAPS:  # made once per device: a host-to-device copy per batch stalls
        idx, weight = pil_taps(n_in, n_out, mode)
        _TAPS[key] = (torch.from_numpy(idx).to(device),
                      torch.from_numpy(weight).to(device=device, dtype=torch.int32))
    return _TAPS[key]


def _dense(n_in: int, n_out: int, mode: str, device: torch.device) -> torch.Tensor:
    key = (n_in, n_out, mode, device)
    if key not in _DENSE:
        idx, weight = pil_taps(n_in, n_out, mode)
        m = np.zeros((n_out, n_in), np.float64)
        np.add.at(m, (np.repeat(np.arange(n_out), idx.shape[1]), idx.ravel()), weight.ravel())
        _DENSE[key] = torch.from_numpy(m).to(device)
    return _DENSE[key]


def _gemm_pass(x: torch.Tensor, n_out: int, mode: str, dim: int) -> torch.Tensor:
    """One pass as a float64 matmul: integers below 2**40, so exact (and never TF32)."""
    if dim == -1:
        s = x @ _dense(x.shape[-1], n_out, mode, x.device).T
    else:
        s = _dense(x.shape[-2], n_out, mode, x.device) @ x
    half, one = float(1 << (PIL_PRECISION_BITS - 1)), float(1 << PIL_PRECISION_BITS)
    return s.add_(half).div_(one).floor_().clamp_(0.0, 255.0)


def _taps_pass(x: torch.Tensor, n_out: int, mode: str, dim: int) -> torch.Tensor:
    """One pass as PIL's loop over taps, in int32: exact, bandwidth-bound, no float64."""
    idx, weight = _taps(x.shape[dim], n_out, mode, x.device)
    shape = (-1, 1) if dim == -2 else (-1,)
    # |sum| <= 255 * 2**22 * sum|w| (< 1.25 for bicubic): int32 holds it exactly.
    acc = torch.full((), 1 << (PIL_PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(idx.shape[1]):
        acc = acc + x.index_select(dim, idx[:, k]) * weight[:, k].view(shape)
    return (acc >> PIL_PRECISION_BITS).clamp_(0, 255)


def exact_kernel(device: torch.device) -> str:
    """"gemm" on CPUs and full-FP64 GPUs, "taps" on GPUs whose FP64 runs at 1/64 rate."""
    return "gemm" if device.type != "cuda" else _cuda_kernel(device.index)


@functools.cache
def _cuda_kernel(index: int | None) -> str:
    cap = torch.cuda.get_device_capability(index)
    return "gemm" if cap in FULL_FP64_CAPABILITIES else "taps"


def resize_like_pil(x: torch.Tensor, size: tuple[int, int], mode: str,
                    kernel: str = "auto") -> torch.Tensor:
    """(N, C, H, W) uint8 pixels -> float32 (N, C, *size): PIL's uint8 result, exactly.

    PIL (the model cards' transforms) resamples horizontally, stores uint8, then vertically
    and stores uint8 again, with 22-bit fixed-point weights. A float resize with one clamp at
    the end (torch's antialiased kernels are PIL's filters) is ~0.3/255 off on average, up to
    7/255 where bicubic overshoots; float passes rounded each time still miss PIL's ties
    (128 -> 224 weights like 9/14 put values on .5 exactly, and PIL's quantised weights
    decide which way they go). PIL's integer weights in exact arithmetic give its bytes
    (``kernel``: "gemm", "taps" or "auto" = ``exact_kernel``; both give the same bytes).
    Square tiles (all this pipeline delivers): for other aspect ratios Pillow 13 sometimes
    runs the vertical pass first."""
    kernel = exact_kernel(x.device) if kernel == "auto" else kernel
    if kernel not in ("gemm", "taps"):
        raise ValueError(f"kernel must be auto, gemm or taps, got {kernel!r}")
    one_pass = _gemm_pass if kernel == "gemm" else _taps_pass
    x = x.to(torch.float64 if kernel == "gemm" else torch.int32)
    h, w = x.shape[-2:]
    if w != size[1]:
        x = one_pass(x, size[1], mode, -1)
    if h != size[0]:
        x = one_pass(x, size[0], mode, -2)
    return x.float()


def preprocess(tiles_uint8: torch.Tensor, spec: TileModelSpec) -> torch.Tensor:
    """(N, H, W, 3) uint8 on any device -> normalised float32 (N, 3, S, S) on that device."""
    if tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3:
        raise ValueError(f"expected tiles of shape (N, H, W, 3), got {tuple(tiles_uint8.shape)}")
    x = tiles_uint8.permute(0, 3, 1, 2)  # uint8 0..255
    h, w = x.shape[-2:]
    size = spec.input_size
    if spec.crop:
        target = _resized_hw(h, w, spec.resize_size)
    else:
        target = (size, size)
    if (h, w) != target:
        x = resize_like_pil(x, target, spec.interpolation)  # PIL's bytes, as float32
    if spec.crop:
        h, w = x.shape[-2:]
        if h < size or w < size:
            raise ValueError(f"{spec.id}: resize {spec.resize_size} smaller than crop {size}")
        top = int(round((h - size) / 2.0))  # same rounding as torchvision CenterCrop
        left = int(round((w - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    x = x.float()
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


def denormalise(x: torch.Tensor, spec: TileModelSpec) -> torch.Tensor:
    """Back to 0-1 pixel units, to compare preprocessings in units people understand."""
    shape = (1,) * (x.ndim - 3) + (3, 1, 1)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(shape)
    return x * std + mean
