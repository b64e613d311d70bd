"""Slide encoders: one slide's tile embeddings (tiling order) + coordinates -> slide embeddings.

The committer hands each slide to a slide-encoder actor as soon as all of the slide's tiles
are embedded, and commits the slide when the result comes back, so slide embeddings stream
like everything else. Like ``encode.py``, the stage is a plain class that Ray wraps; the
encoder it holds is chosen by the spec's family (``registry.SLIDE_FAMILIES``).

This module imports no torch at import time: the coordinator reads ``aggregation_label`` and
``position_rule`` from it (what every slide row records), only the actor builds networks.
"""

from __future__ import annotations

import logging
import warnings
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


def position_rule(cfg: SlideEncoderConfig) -> str | None:
    """The rule that turns this encoder's level-0 coordinates into grid positions: the
    config's choice, else the authors' (``specs.POSITION_RULES``); None where unused."""
    spec = get_slide_model(cfg.id)
    return cfg.positions or spec.positions


def aggregation_label(cfg: SlideEncoderConfig) -> str:
    """What the slides rows' ``aggregation`` records: encoder, read-out, position rule.

    e.g. ``gigapath-slide (global-pool, positions level0/256)``, ``titan (attn-pool,
    positions level0/tile)``, ``chief (attention-mil)``."""
    spec = get_slide_model(cfg.id)
    readout = spec.readout or ("global-pool" if cfg.global_pool else "cls")
    rule = position_rule(cfg)
    return f"{spec.id} ({readout}" + (f", positions {rule})" if rule else ")")


def work_key_settings(cfg: SlideEncoderConfig) -> list[str]:
    """Settings beyond id, weights, layers and global_pool that change a slide row: only
    those that differ from the authors' defaults, so existing lakes keep their work keys."""
    spec = get_slide_model(cfg.id)
    rule = position_rule(cfg)
    return [f"positions={rule}"] if rule != spec.positions else []


def tile_positions(coords: np.ndarray, rule: str | None, tile_l0: float | None
                   ) -> np.ndarray | None:
    """(N, 2) level-0 px -> (N, 2) integer grid positions (float64) under ``rule``.

    "level0/256" is Prov-GigaPath's ``floor(px / 256)``. "level0/tile" divides by the tile's
    level-0 size and rounds to nearest: tiling places tile (col, row) at round(col *
    tile_l0), with a fractional tile_l0 on most scanners, where floor could land a cell short
    (on the authors' integer grids floor and nearest agree)."""
    if rule is None:
        return None
    c = np.asarray(coords, np.float64)
    if rule == "level0/256":
        return np.floor(c / 256.0)
    if rule == "level0/tile":
        if tile_l0 is None or not tile_l0 > 0:
            raise ValueError("positions level0/tile need the tiles' level-0 size: the writer "
                             "must pass tile_l0 (see SlideEncoderStage.__call__)")
        return np.rint(c / float(tile_l0))
    raise ValueError(f"unknown position rule {rule!r}")


class SlideEncoderStage:
    """Holds one slide encoder on one device; called once per slide."""

    def __init__(self, cfg: SlideEncoderConfig, weights: WeightsRef,
                 storage: StorageConfig | None = None) -> None:
        import torch

        from pipeline.encode import cast_matmul_weights, select_device
        from pipeline.models.weights import load_slide_model

        self.torch = torch
        self.cfg = cfg
        self.spec = get_slide_model(cfg.id)
        self.rule = position_rule(cfg)
        self.device = select_device(cfg.device)
        # Random weights: every parameter at its init (LayerNorms, CLS, latents as the
        # authors initialise them): meaningless embeddings that still exercise every path.
        self.model = load_slide_model(self.spec, weights, storage or StorageConfig(),
                                      self.device)
        self.autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.spec.precision)
        if self.device.type == "cuda" and self.autocast is not None:
            cast_matmul_weights(self.model, self.autocast)  # once, not per forward
        self.depth = self.spec.depth
        self.layers = slide_layers(self.depth, list(cfg.layers))
        bad = [layer for layer in self.layers if not 0 <= layer <= self.depth]
        if bad:
            raise ValueError(f"{self.spec.id}: layers {bad} out of range 0..{self.depth}")
        self.precision = run_precision(self.spec.precision, self.device.type == "cuda")

    def __call__(self, embeddings: np.ndarray, coords: np.ndarray,
                 tile_l0: float | None = None) -> dict[int, np.ndarray]:
        """(N, input_dim) tile embeddings in tiling order + (N, 2) level-0 coords (+ the
        tiles' level-0 edge, which TITAN and ``positions: level0/tile`` need)
        -> {layer: (dim,) float16}."""
        from pipeline.models import registry

        if embeddings.ndim != 2 or embeddings.shape[1] != self.spec.input_dim:
            raise ValueError(f"{self.spec.id} reads {self.spec.input_model} embeddings of width "
                             f"{self.spec.input_dim}, got shape {embeddings.shape}")
        torch = self.torch
        positions = tile_positions(coords, self.rule, tile_l0)
        with warnings.catch_warnings():  # Ray hands read-only arrays; they are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            emb = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))
        inputs = registry.SlideInputs(
            embeddings=emb.to(self.device),
            coords=torch.from_numpy(np.asarray(coords, np.float64)).to(self.device),
            positions=None if positions is None else torch.from_numpy(positions).to(
                self.device),
            tile_l0=None if tile_l0 is None else float(tile_l0),
            global_pool=self.cfg.global_pool)
        with torch.inference_mode():
            if self.device.type == "cuda" and self.autocast is not None:
                with torch.autocast("cuda", dtype=self.autocast):
                    out = registry.run_slide(self.spec, self.model, inputs)
            else:
                out = registry.run_slide(self.spec, self.model, inputs)
        return {layer: out[layer].float().cpu().numpy().astype(np.float16)
                for layer in self.layers}
