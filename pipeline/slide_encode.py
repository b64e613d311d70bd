"""Slide encoders: one slide's tile embeddings (tiling order) + coordinates -> slide embeddings.

The committer hands each slide to a slide-encoder actor as soon as all of the slide's tiles
are embedded, and commits the slide when the result comes back, so slide embeddings stream
like everything else. Like ``encode.py``, the stage is a plain class that Ray wraps.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import SlideEncoderConfig, StorageConfig
from pipeline.models.precision import run_precision
from pipeline.models.specs import (  # noqa: F401 - the facts live in specs (torch-free)
    SLIDE_MODELS,
    SlideModelSpec,
    get_slide_model,
)

if TYPE_CHECKING:  # torch: only the stage's actor pays for it
    from pipeline.models.weights import WeightsRef

log = logging.getLogger(__name__)


def slide_layers(depth: int, extra: list[int]) -> list[int]:
    """Layers to output: the last one first, then the extra ones the config asks for."""
    return [depth, *[layer for layer in extra if layer != depth]]


class SlideEncoderStage:
    """Holds one slide encoder on one device; called once per slide."""

    def __init__(self, cfg: SlideEncoderConfig, weights: WeightsRef,
                 storage: StorageConfig | None = None) -> None:
        import torch

        from pipeline.encode import cast_matmul_weights, select_device
        from pipeline.models.gigapath_slide import (
            GigaPathSlideEncoder,
            load_gigapath_slide_encoder,
        )
        from pipeline.models.weights import local_weights_file, random_seed

        self.torch = torch
        self.cfg = cfg
        self.spec = get_slide_model(cfg.id)
        self.device = select_device(cfg.device)
        ref = weights
        if ref.random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random_seed(self.spec.id))
                self.model = GigaPathSlideEncoder()
                # The released encoder's LayerNorms and CLS are not at their init values;
                # random weights still exercise every path.
        else:
            path = local_weights_file(self.spec.id, ref, storage or StorageConfig())
            self.model = load_gigapath_slide_encoder(path, "cpu")
        self.model = self.model.eval().to(self.device)
        if self.device.type == "cuda":  # runs under fp16 autocast: cast its weights once
            cast_matmul_weights(self.model, torch.float16)
        self.depth = len(self.model.encoder.layers)
        self.layers = slide_layers(self.depth, list(cfg.layers))
        bad = [layer for layer in self.layers if not 0 <= layer <= self.depth]
        if bad:
            raise ValueError(f"{self.spec.id}: layers {bad} out of range 0..{self.depth}")
        self.precision = run_precision(self.spec.precision, self.device.type == "cuda")

    def __call__(self, embeddings: np.ndarray, coords: np.ndarray) -> dict[int, np.ndarray]:
        """(N, 1536) tile embeddings in tiling order + (N, 2) level-0 coords -> {layer: (768,)}."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.spec.input_dim:
            raise ValueError(f"{self.spec.id} reads {self.spec.input_model} embeddings of width "
                             f"{self.spec.input_dim}, got shape {embeddings.shape}")
        unit = self.spec.position_unit_px
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32)).to(self.device)
        c = torch.from_numpy(np.ascontiguousarray(coords, np.float32)).to(self.device)
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = self.model(x, c, unit, all_layers=True,
                                     global_pool=self.cfg.global_pool)
            else:
                out = self.model(x, c, unit, all_layers=True,
                                 global_pool=self.cfg.global_pool)
        return {layer: out[f"layer_{layer}_embed"].float().cpu().numpy().astype(np.float16)
                for layer in self.layers}
