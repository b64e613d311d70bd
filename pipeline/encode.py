"""Encoder stage: one tile model per actor, applied to batches of uint8 tiles.

``TileEncoder`` is the callable class an actor pool runs (``map_batches``); it only holds state.
The logic lives in plain functions so it is testable without Ray, and this module does not
import Ray. Rows carry a ``models`` column naming the models that still owe an embedding, so
one stream of tiles can feed several actor pools and each skips rows already done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.config import StorageConfig
from pipeline.models import registry
from pipeline.models.preprocess import preprocess
from pipeline.models.registry import TileModelSpec
from pipeline.models.weights import WeightsRef, load_model

log = logging.getLogger(__name__)

EMB_PREFIX = "emb__"
TILE_COLUMN = "tile"
MODELS_COLUMN = "models"
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def embedding_column(model_id: str) -> str:
    """Output column holding ``model_id``'s embeddings."""
    return EMB_PREFIX + model_id


def node_column(model_id: str) -> str:
    """Output column naming the Ray node that encoded each row (placement is auditable)."""
    return "node__" + model_id


def _ray_node_id() -> str:
    try:
        import ray

        # Outside a Ray worker, asking for the runtime context would start a local Ray.
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside Ray
        return ""


def select_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda when visible, else CPU with a warning; 'cuda' without a GPU is an error."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if requested not in {"auto", "cuda"}:
            raise ValueError(f"unknown device {requested!r}: use auto, cuda or cpu")
        return torch.device("cuda")
    if requested == "cuda":
        raise RuntimeError("device: cuda requested but no GPU is visible to this actor "
                           "(check the actor's num_gpus and CUDA_VISIBLE_DEVICES), or use "
                           "device: auto / cpu")
    if requested != "auto":
        raise ValueError(f"unknown device {requested!r}: use auto, cuda or cpu")
    log.warning("no GPU visible to this actor; encoding on CPU")
    return torch.device("cpu")


def precision_for(spec: TileModelSpec, device: torch.device) -> str:
    """Autocast only on CUDA (CPU fp16 matmuls are slow and not what the authors ran)."""
    return spec.precision if device.type == "cuda" else "fp32"


def cpu_threads(model_cfg: Mapping[str, Any]) -> int:
    """Threads for CPU encoding: config, else the CPUs Ray gave us (OMP_NUM_THREADS), else all."""
    configured = model_cfg.get("cpu_threads") or os.environ.get("OMP_NUM_THREADS")
    if configured:
        return max(1, int(configured))
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, available)


def _wants(value: Any, model_id: str) -> bool:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return model_id in {part.strip() for part in value.split(",")}
    if value is None:
        return False
    return model_id in {str(v).strip() for v in value}


def rows_for_model(models: np.ndarray, model_id: str) -> np.ndarray:
    """Boolean mask of rows whose ``models`` list contains ``model_id``."""
    cache: dict[Any, bool] = {}
    mask = np.zeros(len(models), dtype=bool)
    for i, value in enumerate(models):
        key = value if isinstance(value, (str, bytes)) else None
        if key is None:
            mask[i] = _wants(value, model_id)
        else:
            if key not in cache:
                cache[key] = _wants(key, model_id)
            mask[i] = cache[key]
    return mask


def _as_tiles(column: Any) -> np.ndarray:
    tiles = column
    if isinstance(tiles, np.ndarray) and tiles.dtype == object:
        tiles = np.stack(list(tiles))  # ragged-tensor column of equal-shaped tiles
    tiles = np.ascontiguousarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"'{TILE_COLUMN}' must be uint8 (N, T, T, 3), "
                         f"got {tiles.dtype} {tiles.shape}")
    return tiles


def encode_tiles(spec: TileModelSpec, model: torch.nn.Module, tiles: np.ndarray,
                 device: torch.device, precision: str) -> np.ndarray:
    """uint8 (N, T, T, 3) -> float16 (N, dim): transfer, preprocess on device, embed."""
    x = torch.from_numpy(tiles)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    with torch.inference_mode():
        pixels = preprocess(x, spec)
        if device.type == "cuda" and precision in _AUTOCAST:
            with torch.autocast("cuda", dtype=_AUTOCAST[precision]):
                out = registry.embed(spec, model, pixels)
        else:
            out = registry.embed(spec, model, pixels)
        return out.to(torch.float16).cpu().numpy()


def encode_batch(batch: Mapping[str, Any], spec: TileModelSpec, model: torch.nn.Module,
                 device: torch.device, precision: str) -> dict[str, Any]:
    """Add ``embedding_column(spec.id)``; rows not asking for this model get zeros."""
    out = dict(batch)  # every other column passes through untouched
    n = len(batch[TILE_COLUMN])
    emb = np.zeros((n, spec.dim), dtype=np.float16)
    if MODELS_COLUMN in batch:
        mask = rows_for_model(np.asarray(batch[MODELS_COLUMN], dtype=object), spec.id)
    else:
        mask = np.ones(n, dtype=bool)
    if mask.any():
        tiles = _as_tiles(batch[TILE_COLUMN])
        emb[mask] = encode_tiles(spec, model, tiles[mask], device, precision)
    out[embedding_column(spec.id)] = emb
    return out


class TileEncoder:
    """Actor-pool callable: loads one model once, then embeds batches of tiles."""

    def __init__(self, model_cfg: dict[str, Any], weights: dict[str, Any],
                 storage_cfg: dict[str, Any], drop_tiles: bool = False) -> None:
        # The last encoder drops the pixels itself: a separate drop stage would be a task
        # that waits for a free CPU behind the tiling tasks, stalling commits.
        self.drop_tiles = drop_tiles
        self.spec = registry.get(model_cfg["id"])
        self.device = select_device(model_cfg.get("device") or "auto")
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(model_cfg))
        self.weights = WeightsRef(**weights)
        storage = StorageConfig(**(storage_cfg or {}))
        self.model = load_model(self.spec, self.weights, storage, self.device)
        self.precision = precision_for(self.spec, self.device)
        self.column = embedding_column(self.spec.id)
        self.node_id = _ray_node_id()
        self.info: dict[str, Any] = {
            "model": self.spec.id,
            "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device)
                            if self.device.type == "cuda" else "cpu"),
            "precision": self.precision,
            "weights_identity": self.weights.identity,
            "weights_random": self.weights.random,
            "torch": torch.__version__,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = encode_batch(batch, self.spec, self.model, self.device, self.precision)
        out[node_column(self.spec.id)] = np.full(len(out[self.column]), self.node_id, object)
        if self.drop_tiles:
            del out[TILE_COLUMN]
        return out
