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

from pipeline.config import ModelConfig, StorageConfig
from pipeline.handoff import (  # noqa: F401 - re-exported for the stage's users
    EMB_PREFIX,
    MODELS_COLUMN,
    TILE_COLUMN,
    embedding_column,
    node_column,
)
from pipeline.models import registry
from pipeline.models.precision import precision_label, run_precision
from pipeline.models.preprocess import preprocess
from pipeline.models.registry import TileModelSpec
from pipeline.models.weights import WeightsRef, load_model
from pipeline.placement import ray_node_id

log = logging.getLogger(__name__)

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


_MATMUL_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def cast_matmul_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Linear/conv weights (and biases) to ``dtype`` once, at load; returns how many tensors.

    Autocast casts an fp32 weight to half precision at every use, and inside
    ``torch.inference_mode`` its weight-cast cache is off: every forward re-cast every weight
    (GBs per micro-batch for ViT-g). Weights already in ``dtype`` are used as they are, so the
    results are the same bits. Norms, position embeddings, CLS tokens and layer scales stay
    fp32, so the residual stream stays fp32 as under plain autocast."""
    n = 0
    for module in model.modules():
        if isinstance(module, _MATMUL_MODULES):
            for name in ("weight", "bias"):
                p = getattr(module, name, None)
                if p is not None and p.dtype == torch.float32:
                    p.data = p.data.to(dtype)
                    n += 1
    return n


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
    return run_precision(spec.precision, device.type == "cuda")


def cpu_threads(given: int | None = None) -> int:
    """Threads for CPU encoding: ``given`` (the job's encoder CPUs), else the CPUs Ray gave
    us (OMP_NUM_THREADS), else all."""
    configured = given or os.environ.get("OMP_NUM_THREADS")
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


MIN_MICRO_BATCH = 32  # tiles; smaller forwards leave a large GPU underused
MICRO_BATCH_SPLITS = 4  # default micro-batches per batch: the first copy is the only one exposed


def default_micro_batch(n: int) -> int:
    """CUDA default: ~4 micro-batches of >= 32 tiles, so copies hide behind compute."""
    return max(MIN_MICRO_BATCH, -(-n // MICRO_BATCH_SPLITS))


def micro_batch_slices(n: int, micro_batch: int | None = None) -> list[slice]:
    """Contiguous near-equal slices of at most ``micro_batch`` rows (None: one slice).

    Near-equal rather than full-then-remainder: a runt last micro-batch would run the GPU
    at a fraction of its width for the same fixed launch cost.
    """
    if n <= 0:
        return []
    size = n if micro_batch is None else int(micro_batch)
    if size < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    parts = -(-n // size)
    base, extra = divmod(n, parts)
    slices, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


class PinnedStaging:
    """Reusable host ring of uint8 micro-batch slots (pinned for CUDA), one per actor.

    ``Tensor.pin_memory()`` per batch is an extra synchronous copy of the whole batch plus an
    allocation; here each micro-batch is copied once into a slot that outlives the batch and
    grows only when a larger micro-batch arrives. A slot is rewritten only after the event
    of its previous host-to-device copy has completed (``in_flight``), so with two slots the
    host fills one while the GPU reads the other.
    """

    def __init__(self, slots: int = 2, pin: bool = True) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.pin = pin
        self.buffer: torch.Tensor | None = None  # (slots, capacity) uint8
        self._pending: list[Any] = [None] * slots  # events guarding each slot's last copy
        self._stream: Any = None  # CUDA side stream for copies + preprocessing, made lazily
        self._stream_device: torch.device | None = None

    @property
    def capacity(self) -> int:
        """Bytes per slot currently allocated."""
        return 0 if self.buffer is None else int(self.buffer.shape[1])

    def _wait(self, k: int) -> None:
        event, self._pending[k] = self._pending[k], None
        if event is not None:
            event.synchronize()

    def _grow(self, nbytes: int) -> None:
        for k in range(self.slots):  # nothing may still be reading the old buffer
            self._wait(k)
        nbytes = -(-nbytes // 2**20) * 2**20  # whole MiB: batches that vary a little fit
        self.buffer = torch.empty((self.slots, nbytes), dtype=torch.uint8, pin_memory=self.pin)

    def stage(self, i: int, tiles: np.ndarray) -> torch.Tensor:
        """Copy ``tiles`` into slot ``i % slots`` and return that slot viewed as their shape."""
        if tiles.dtype != np.uint8:
            raise ValueError(f"staging holds uint8 tiles, got {tiles.dtype}")
        if tiles.nbytes > self.capacity:
            self._grow(tiles.nbytes)
        assert self.buffer is not None
        k = i % self.slots
        self._wait(k)
        view = self.buffer[k, :tiles.nbytes].view(tiles.shape)
        np.copyto(view.numpy(), tiles)  # numpy: no warning for Ray's read-only arrays
        return view

    def in_flight(self, i: int, event: Any) -> None:
        """Slot ``i % slots`` is being read until ``event`` completes."""
        self._pending[i % self.slots] = event

    def side_stream(self, device: torch.device) -> Any:
        """The CUDA stream copies and preprocessing run on (one per actor, made on first use)."""
        if self._stream is None or self._stream_device != device:
            self._stream = torch.cuda.Stream(device=device)
            self._stream_device = device
        return self._stream


def _prepare(x: torch.Tensor, spec: TileModelSpec) -> torch.Tensor:
    """The generic preprocessing, unless the model takes the uint8 tiles itself (bench-null)."""
    return x if spec.preprocess_on == "model" else preprocess(x, spec)


def encode_tiles(spec: TileModelSpec, model: torch.nn.Module, tiles: np.ndarray,
                 device: torch.device, precision: str, micro_batch: int | None = None,
                 staging: PinnedStaging | None = None) -> np.ndarray:
    """uint8 (N, T, T, 3) -> float16 (N, dim): transfer, preprocess on device, embed.

    On CUDA the batch runs as micro-batches (``micro_batch``, default ``default_micro_batch``)
    whose copy and preprocessing overlap the previous one's forward; pass the actor's
    ``staging`` to reuse its pinned buffer. Elsewhere: one plain forward per micro-batch
    (default: the whole batch), no streams and no extra copy.
    """
    n = len(tiles)
    if n == 0:
        return np.zeros((0, spec.dim), dtype=np.float16)
    if device.type == "cuda":
        slices = micro_batch_slices(n, micro_batch or default_micro_batch(n))
        return _encode_cuda(spec, model, tiles, device, precision, slices,
                            staging if staging is not None else PinnedStaging())
    # A read-only array (Ray's zero-copy batches) would make torch warn on every batch.
    x = torch.from_numpy(tiles if tiles.flags.writeable else tiles.copy()).to(device)
    with torch.inference_mode():
        parts = [registry.embed(spec, model, _prepare(x[s], spec)).to(torch.float16)
                 for s in micro_batch_slices(n, micro_batch)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu().numpy()


def _encode_cuda(spec: TileModelSpec, model: torch.nn.Module, tiles: np.ndarray,
                 device: torch.device, precision: str, slices: list[slice],
                 staging: PinnedStaging) -> np.ndarray:
    """Micro-batch i+1's copy and preprocessing run on a side stream during i's forward.

    Preprocessing goes on the side stream too: it builds its mean/std with a blocking
    host-to-device copy, i.e. a sync of the current stream, which on the compute stream would
    drain the GPU's queue before every micro-batch. Tensors made on the side stream and used
    on the compute stream are ``record_stream``-ed so the allocator cannot recycle them early.
    """
    side = staging.side_stream(device)
    compute = torch.cuda.current_stream(device)
    dtype = _AUTOCAST.get(precision)
    out = torch.empty((len(tiles), spec.dim), dtype=torch.float16, device=device)

    def prepare(i: int) -> tuple[torch.Tensor, Any]:
        host = staging.stage(i, tiles[slices[i]])
        with torch.cuda.stream(side):
            x = torch.empty(tuple(host.shape), dtype=torch.uint8, device=device)
            x.copy_(host, non_blocking=True)
            staging.in_flight(i, side.record_event())  # the slot is free once this is done
            pixels = _prepare(x, spec)
            return pixels, side.record_event()

    with torch.inference_mode():
        pending = prepare(0)
        for i, rows in enumerate(slices):
            pixels, ready = pending
            compute.wait_event(ready)
            pixels.record_stream(compute)
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                out[rows] = registry.embed(spec, model, pixels)
            if i + 1 < len(slices):
                pending = prepare(i + 1)  # host and copy engine work while the forward runs
        return out.cpu().numpy()  # the one device-to-host copy; waits for the last forward


def encode_batch(batch: Mapping[str, Any], spec: TileModelSpec, model: torch.nn.Module,
                 device: torch.device, precision: str, micro_batch: int | None = None,
                 staging: PinnedStaging | None = None) -> dict[str, Any]:
    """Add ``embedding_column(spec.id)``; rows not asking for this model get zeros."""
    out = dict(batch)  # every other column passes through untouched
    n = len(batch[TILE_COLUMN])
    if MODELS_COLUMN in batch:
        mask = rows_for_model(np.asarray(batch[MODELS_COLUMN], dtype=object), spec.id)
    else:
        mask = np.ones(n, dtype=bool)
    if mask.all() and n:
        # The common case: no boolean-index copy of the whole batch.
        emb = encode_tiles(spec, model, _as_tiles(batch[TILE_COLUMN]), device, precision,
                           micro_batch, staging)
    else:
        emb = np.zeros((n, spec.dim), dtype=np.float16)
        if mask.any():
            tiles = _as_tiles(batch[TILE_COLUMN])
            emb[mask] = encode_tiles(spec, model, tiles[mask], device, precision, micro_batch,
                                     staging)
    out[embedding_column(spec.id)] = emb
    return out


class TileEncoder:
    """Actor-pool callable: loads one model once, then embeds batches of tiles."""

    def __init__(self, model: ModelConfig, weights: WeightsRef,
                 storage: StorageConfig | None = None, drop_tiles: bool = False,
                 threads: int | None = None) -> None:
        # The last encoder drops the pixels itself: a separate drop stage would be a task
        # that waits for a free CPU behind the tiling tasks, stalling commits.
        self.drop_tiles = drop_tiles
        self.spec = registry.get(model.id)
        self.device = select_device(model.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(threads))
        self.weights = weights
        self.model = load_model(self.spec, weights, storage or StorageConfig(), self.device)
        self.precision = precision_for(self.spec, self.device)
        if self.device.type == "cuda" and self.precision in _AUTOCAST:
            cast_matmul_weights(self.model, _AUTOCAST[self.precision])
        self.tf32 = model.tf32 and self.device.type == "cuda" and self.precision == "fp32"
        if self.tf32:  # this actor's process runs this one model: a process-wide switch
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # Optional: None lets encode_tiles pick (whole batch on CPU, ~4 micro-batches on CUDA).
        self.micro_batch = model.micro_batch
        self.staging = PinnedStaging() if self.device.type == "cuda" else None
        self.column = embedding_column(self.spec.id)
        self.node_id = ray_node_id()
        self.info: dict[str, Any] = {
            "model": self.spec.id,
            "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device)
                            if self.device.type == "cuda" else "cpu"),
            "precision": precision_label(self.spec.precision, self.device.type == "cuda",
                                         model.tf32),
            "weights_identity": self.weights.identity,
            "weights_random": self.weights.random,
            "torch": torch.__version__,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = encode_batch(batch, self.spec, self.model, self.device, self.precision,
                           self.micro_batch, self.staging)
        out[node_column(self.spec.id)] = np.full(len(out[self.column]), self.node_id, object)
        if self.drop_tiles:
            del out[TILE_COLUMN]
        return out
