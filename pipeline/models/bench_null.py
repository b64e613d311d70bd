"""``bench-null``: benchmark/test model: no network, embeddings meaningless.

A tile encoder that costs next to nothing, so that the pipeline's own ceiling (tiling,
transport, sink) can be measured without a GPU, through the same encoder stage as the real
models. Per tile: the mean RGB of a 4x4 grid of cells (48 values, in 0..1), times a fixed
projection to 1024 values (UNI-sized). The projection is drawn once from
``numpy.random.default_rng(0)``, so every process and every build gives the same numbers; it
is a buffer, not a parameter: there is nothing to learn or download (``weights: random``).

The module takes the uint8 tiles (N, H, W, 3) as the encoder stage hands them (the registry
entry says ``preprocess_on="model"``: the generic float conversion and normalisation would
cost ~20x the pooling). It also accepts the generic preprocessing's output (N, 3, H, W), which
for this entry (mean 0, std 1) is pixels / 255; both give the same embedding up to rounding.

``WSI_BENCH_DEVICE_MS_PER_TILE`` (benchmarks and tests, never a job's config) makes each forward
also wait that long per tile without using a CPU: a stand-in for a GPU's time, so that a
benchmark on a machine without GPUs can show whether several encoder pools really work at the
same time, and a test can hold a job mid-run (killed, or a node lost) without computing.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

GRID = 4  # cells per side
CHANNELS = 3
FEATURES = GRID * GRID * CHANNELS  # 48, ordered (cell row, cell column, channel)
SEED = 0
CHUNK_TILES = 4  # CPU pooling works on this many tiles at a time: the int16 buffer stays in cache
_INT16_MAX_ROWS = 32767 // 255  # rows of a cell that an int16 column sum holds without overflow


def projection(dim: int = 1024) -> np.ndarray:
    """The fixed (48, dim) float32 projection: standard normal from default_rng(0), / sqrt(48)."""
    rng = np.random.default_rng(SEED)
    return (rng.standard_normal((FEATURES, dim), dtype=np.float32)
            / np.float32(np.sqrt(FEATURES))).astype(np.float32)


def _cell_sums_cpu(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3), H and W multiples of 4 -> int32 (N, 4, 4, 3) sums of each cell.

    Column sums of each cell's rows first (the bulk of the work, 56x fewer values out), in
    int16 over a few tiles at a time; converting the whole batch to float costs more than this.
    """
    n, h, w, c = tiles.shape
    rows = h // GRID
    acc = torch.int16 if rows <= _INT16_MAX_ROWS else torch.int32
    bands = tiles.reshape(n * GRID, rows, w * c)  # a band: one cell row of one tile
    cols = torch.empty((n * GRID, w * c), dtype=acc)
    step = CHUNK_TILES * GRID
    buf = torch.empty((min(step, n * GRID), rows, w * c), dtype=acc)
    for start in range(0, n * GRID, step):
        part = bands[start:start + step]
        wide = buf[:len(part)]
        wide.copy_(part)
        torch.sum(wide, dim=1, dtype=acc, out=cols[start:start + len(part)])
    return cols.view(n, GRID, GRID, w // GRID, c).sum(dim=3, dtype=torch.int32)


def _cell_sums_direct(tiles: torch.Tensor) -> torch.Tensor:
    """As ``_cell_sums_cpu`` in one reduction: cheapest on a GPU (and shapes on meta)."""
    n, h, w, c = tiles.shape
    return tiles.reshape(n, GRID, h // GRID, GRID, w // GRID, c).sum(dim=(2, 4), dtype=torch.int32)


def pooled_features(x: torch.Tensor) -> torch.Tensor:
    """Tiles -> float32 (N, 48): mean of each channel over each cell of a 4x4 grid, in 0..1.

    ``x``: uint8 (N, H, W, 3) tiles, or float (N, 3, H, W) pixels in 0..1. Cells are split as
    ``adaptive_avg_pool2d`` splits them (equal cells when H and W are multiples of 4).
    """
    if x.ndim == 4 and x.dtype == torch.uint8 and x.shape[-1] == CHANNELS:
        n, h, w, _ = x.shape
        if n and h % GRID == 0 and w % GRID == 0 and x.device.type == "cpu":
            sums = _cell_sums_cpu(x.contiguous())
        elif h % GRID == 0 and w % GRID == 0:
            sums = _cell_sums_direct(x)
        else:
            cells = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).float(), GRID) / 255.0
            return cells.permute(0, 2, 3, 1).reshape(n, FEATURES)
        scale = 1.0 / (255.0 * (h // GRID) * (w // GRID))
        return sums.reshape(n, FEATURES).float() * scale
    if x.ndim == 4 and x.is_floating_point() and x.shape[1] == CHANNELS:
        cells = F.adaptive_avg_pool2d(x.float(), GRID)  # (N, 3, 4, 4)
        return cells.permute(0, 2, 3, 1).reshape(len(x), FEATURES)
    raise ValueError(f"bench-null takes uint8 tiles (N, H, W, 3) or float pixels (N, 3, H, W), "
                     f"got {x.dtype} {tuple(x.shape)}")


class BenchNull(torch.nn.Module):
    """Grid-mean RGB times a fixed random projection: no learnable parameters."""

    def __init__(self, dim: int = 1024) -> None:
        super().__init__()
        self.num_features = dim
        # torch.tensor honours the build device (meta included), like the other builders.
        self.register_buffer("projection", torch.tensor(projection(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) float32 embeddings of uint8 (N, H, W, 3) tiles or (N, 3, H, W) pixels."""
        device_ms = float(os.environ.get("WSI_BENCH_DEVICE_MS_PER_TILE", "0") or 0)
        if device_ms > 0 and x.device.type != "meta":
            time.sleep(len(x) * device_ms / 1000.0)
        return pooled_features(x) @ self.projection


def build(dim: int) -> BenchNull:
    return BenchNull(dim)
