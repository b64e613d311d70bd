"""Model registry: the code that builds, adapts and runs each model family (torch).

The facts of each model are data in ``specs`` (``MODELS``, torch-free, re-exported here). The
code that builds a network (``BUILDERS``, keyed by ``family``) and turns its output into one
vector per tile (``RECIPES``, keyed by ``embedding``) is shared, so adding a model is adding an
entry, plus a builder or recipe only when its construction or read-out differs from the
existing ones. ``ADAPTERS`` (by family) turn an authors' checkpoint layout into the built
module's names (CONCH's whole-CoCa checkpoint, transformers Dinov2 names) before the strict
load. Builders pass ``arch_kwargs(spec)``: the spec's kwargs with its ``Layer`` names resolved.
Slide encoders (``SLIDE_MODELS``) work the same way: ``SLIDE_FAMILIES`` (by family) builds
each network, adapts its authors' checkpoint and reads one slide out.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.models.specs import (  # noqa: F401 - the facts, re-exported for the registry's users
    MODELS,
    SLIDE_MODELS,
    Layer,
    SlideModelSpec,
    TileModelSpec,
    choosing_table,
    get,
    markdown_table,
    tile_text,
    tiling_spec,
)


def resolve_layer(ref: Layer) -> Any:
    """The class a ``Layer`` names (a ``functools.partial`` of it when it fixes kwargs)."""
    module, _, name = ref.path.rpartition(".")
    if not module:
        raise ValueError(f"layer {ref.path!r}: expected a dotted import path")
    obj = getattr(importlib.import_module(module), name)
    return functools.partial(obj, **ref.kwargs) if ref.kwargs else obj


def arch_kwargs(spec: TileModelSpec) -> dict[str, Any]:
    """The spec's architecture kwargs as the constructor takes them: ``Layer`` -> class."""
    return {k: resolve_layer(v) if isinstance(v, Layer) else v
            for k, v in spec.timm_kwargs.items()}


# --- builders: one per family -------------------------------------------------------------


def _build_timm(spec: TileModelSpec) -> torch.nn.Module:
    import timm

    return timm.create_model(spec.timm_name, pretrained=False, **arch_kwargs(spec))


def _build_conch(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import conch

    return conch.build_v1(spec.timm_name, arch_kwargs(spec), spec.dim)


def _build_conch15(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import conch

    return conch.build_v15(spec.timm_name, arch_kwargs(spec), spec.dim)


def _build_keep(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import keep

    return keep.KeepImageEncoder(spec.timm_name, arch_kwargs(spec), spec.dim)


def _build_genbio(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import genbio_pathfm

    return genbio_pathfm.build(arch_kwargs(spec))


def _build_musk(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import musk

    return musk.build(arch_kwargs(spec))


def _build_ctranspath(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import ctranspath

    return ctranspath.build(spec.timm_name, arch_kwargs(spec))


def _build_bench_null(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import bench_null

    return bench_null.build(spec.dim)


BUILDERS: dict[str, Callable[[TileModelSpec], torch.nn.Module]] = {
    "timm": _build_timm,
    "hf-dinov2": _build_timm,  # same network; only the checkpoint names differ (ADAPTERS)
    "hf-vit": _build_timm,  # likewise
    "timm-features": _build_timm,  # a timm CNN truncated by features_only/out_indices
    "dinov2": _build_timm,  # timm DINOv2 ViTs; Meta or transformers names (ADAPTERS)
    "midnight": _build_timm,  # likewise, plus a load-time position-grid resample
    "keep": _build_keep,
    "genbio-pathfm": _build_genbio,
    "ctranspath": _build_ctranspath,
    "musk": _build_musk,
    "conch": _build_conch,
    "conch-v1.5": _build_conch15,
    "bench-null": _build_bench_null,
}


# --- checkpoint adapters: authors' key layout -> the built module's names -----------------

StateDict = dict[str, torch.Tensor]


def _adapt_conch(state: StateDict) -> StateDict:
    from pipeline.models import conch

    return conch.adapt_v1(state)


def _adapt_conch15(state: StateDict) -> StateDict:
    from pipeline.models import conch

    return conch.adapt_v15(state)


def _adapt_hf_dinov2(state: StateDict) -> StateDict:
    from pipeline.models import hf_dinov2

    return hf_dinov2.to_timm(state)


def _adapt_hf_vit(state: StateDict) -> StateDict:
    from pipeline.models import hf_dinov2

    return hf_dinov2.vit_to_timm(state)


def _adapt_truncated_cnn(state: StateDict) -> StateDict:
    # A whole ImageNet checkpoint: the stages after the cut and the classifier are not used.
    return {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}


def _adapt_dinov2(state: StateDict) -> StateDict:
    from pipeline.models import dinov2_ckpt

    return dinov2_ckpt.to_timm(state)


MIDNIGHT_GRID = 224 // 14  # the grid of the 224 input the recipe feeds


def _adapt_midnight(state: StateDict) -> StateDict:
    from pipeline.models import dinov2_ckpt

    out = dinov2_ckpt.to_timm(state)
    if "pos_embed" in out and out["pos_embed"].ndim == 3:  # on meta: the shape alone
        out["pos_embed"] = dinov2_ckpt.resample_like_transformers(out["pos_embed"],
                                                                  MIDNIGHT_GRID)
    return out


def _adapt_keep(state: StateDict) -> StateDict:
    from pipeline.models import keep

    return keep.adapt(state)


def _adapt_musk(state: StateDict) -> StateDict:
    from pipeline.models import musk

    return musk.adapt(state)


def _adapt_ctranspath(state: StateDict) -> StateDict:
    from pipeline.models import ctranspath

    return ctranspath.adapt(state)


ADAPTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "conch": _adapt_conch,
    "conch-v1.5": _adapt_conch15,
    "hf-dinov2": _adapt_hf_dinov2,
    "hf-vit": _adapt_hf_vit,
    "timm-features": _adapt_truncated_cnn,
    "dinov2": _adapt_dinov2,
    "midnight": _adapt_midnight,
    "keep": _adapt_keep,
    "ctranspath": _adapt_ctranspath,
    "musk": _adapt_musk,
}


def adapt_checkpoint(spec: TileModelSpec, state: StateDict) -> StateDict:
    """Authors' checkpoint -> names/shapes of ``build(spec)``; load strictly afterwards.

    Identity for timm-native checkpoints. Keys an adapter does not know pass through, so the
    strict load still lists them as unexpected.
    """
    adapter = ADAPTERS.get(spec.family)
    return adapter(state) if adapter else state


def build(spec: TileModelSpec, device: str | torch.device = "meta") -> torch.nn.Module:
    """Construct the architecture with random init (no download) directly on ``device``.

    ``meta`` allocates nothing, which makes parameter-count checks free even for 1B models.
    """
    try:
        builder = BUILDERS[spec.family]
    except KeyError:
        raise KeyError(f"{spec.id}: no builder for family {spec.family!r}") from None
    with torch.device(device):
        model = builder(spec)
    return model


# --- embedding recipes: one per read-out ---------------------------------------------------


def _tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # timm ViTs return all tokens after the final norm: (N, prefix + patches, D).
    return model.forward_features(x)  # type: ignore[operator]


def _cls(spec: TileModelSpec, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _tokens(model, x)[:, 0]


def _cls_patch_mean(spec: TileModelSpec, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Virchow-style: CLS concatenated with the mean of patch tokens (registers excluded).
    tokens = _tokens(model, x)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)


def _pooled(spec: TileModelSpec, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The module's own forward is the embedding: CONCH (attentional pool + ln_contrast), KEEP
    # (normalised projection), GenBio-PathFM (per-channel CLS), MUSK (multi-scale CLS),
    # CTransPath (token average); bench-null: grid mean x fixed projection.
    return model(x)


def _feature_mean(spec: TileModelSpec, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Truncated CNN: the last feature map kept, averaged over space (AdaptiveAvgPool2d(1)).
    return model(x)[-1].mean(dim=(2, 3))


RECIPES: dict[str, Callable[[TileModelSpec, torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "cls": _cls,
    "feature_mean": _feature_mean,
    "cls_patch_mean": _cls_patch_mean,
    "pooled": _pooled,
}


def embed(spec: TileModelSpec, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Preprocessed batch (N, 3, S, S) -> embeddings (N, spec.dim) using the model's recipe."""
    try:
        recipe = RECIPES[spec.embedding]
    except KeyError:
        raise KeyError(f"{spec.id}: no embedding recipe {spec.embedding!r}") from None
    out = recipe(spec, model, x)
    if out.shape[-1] != spec.dim:
        raise RuntimeError(f"{spec.id}: recipe gave width {out.shape[-1]}, expected {spec.dim}")
    return out


# --- documentation: FLOPs need the built network ---------------------------------------


@functools.cache
def flops_per_tile(model_id: str) -> float:
    """Forward FLOPs for one tile at the model's input size, counted on the meta device (no
    memory, no weights): the compute cost that sets GPU-hours for a cohort."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = get(model_id)
    model = build(spec, device="meta").eval()
    x = torch.empty(1, 3, spec.input_size, spec.input_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        embed(spec, model, x)
    return float(counter.get_total_flops())


# --- slide encoders: one family per architecture ----------------------------------------


@dataclass(frozen=True)
class SlideInputs:
    """What a slide encoder may read of one slide, in tiling order."""

    embeddings: torch.Tensor  # (N, input_dim)
    coords: torch.Tensor  # (N, 2) level-0 px (x, y) of the tiles' top-left corners, float64
    positions: torch.Tensor | None  # (N, 2) grid positions under the job's rule, or None
    tile_l0: float | None  # tile edge in level-0 px, where the encoder needs it
    global_pool: bool = True  # Prov-GigaPath's read-out (mean of tile tokens, or its CLS)


@dataclass(frozen=True)
class SlideFamily:
    """How to build one architecture, adapt its authors' checkpoint, and read it out."""

    build: Callable[[SlideModelSpec], torch.nn.Module]
    adapt: Callable[[StateDict], StateDict]
    # -> {layer: (dim,)}: every layer for per-layer encoders, else {spec.depth: embedding}
    run: Callable[[SlideModelSpec, torch.nn.Module, SlideInputs], dict[int, torch.Tensor]]


def _build_gigapath(spec: SlideModelSpec) -> torch.nn.Module:
    from pipeline.models.gigapath_slide import GigaPathSlideEncoder

    return GigaPathSlideEncoder()


def _run_gigapath(spec: SlideModelSpec, model: torch.nn.Module, s: SlideInputs
                  ) -> dict[int, torch.Tensor]:
    from pipeline.models.gigapath_slide import SLIDE_NGRIDS

    assert s.positions is not None
    p = s.positions
    if p.numel() and (p.min() < 0 or p.max() >= SLIDE_NGRIDS):
        raise ValueError(f"{spec.id}: grid positions {int(p.min())}..{int(p.max())} outside "
                         f"its {SLIDE_NGRIDS} x {SLIDE_NGRIDS} grid: coords must be level-0 px "
                         f">= 0 (with positions level0/256 the grid covers 256,000 level-0 px)")
    # Positions are whole grid cells already (slide_encode.tile_positions): a unit of 1.
    out = model(s.embeddings, p, 1.0, all_layers=True, global_pool=s.global_pool)
    return {i: out[f"layer_{i}_embed"] for i in range(len(model.encoder.layers) + 1)}


def _build_titan(spec: SlideModelSpec) -> torch.nn.Module:
    from pipeline.models.titan import TitanSlideEncoder

    return TitanSlideEncoder()


def _adapt_titan(state: StateDict) -> StateDict:
    from pipeline.models import titan

    return titan.adapt(state)


def _run_titan(spec: SlideModelSpec, model: torch.nn.Module, s: SlideInputs
               ) -> dict[int, torch.Tensor]:
    if s.tile_l0 is None:
        raise ValueError(f"{spec.id} needs the tiles' level-0 size (tile_l0)")
    return {spec.depth: model(s.embeddings, s.coords, s.tile_l0)}


def _build_prism(spec: SlideModelSpec) -> torch.nn.Module:
    from pipeline.models.prism import PrismSlideEncoder

    return PrismSlideEncoder()


def _adapt_prism(state: StateDict) -> StateDict:
    from pipeline.models import prism

    return prism.adapt(state)


def _build_chief(spec: SlideModelSpec) -> torch.nn.Module:
    from pipeline.models.chief import CHIEFSlideEncoder

    return CHIEFSlideEncoder()


def _build_madeleine(spec: SlideModelSpec) -> torch.nn.Module:
    from pipeline.models.madeleine import MadeleineSlideEncoder

    return MadeleineSlideEncoder()


def _run_mil(spec: SlideModelSpec, model: torch.nn.Module, s: SlideInputs
             ) -> dict[int, torch.Tensor]:
    # Order- and position-free: attention pooling (CHIEF, MADELEINE), a Perceiver (PRISM).
    return {spec.depth: model(s.embeddings)}


def _same(state: StateDict) -> StateDict:
    return state


SLIDE_FAMILIES: dict[str, SlideFamily] = {
    "gigapath": SlideFamily(_build_gigapath, _same, _run_gigapath),
    "titan": SlideFamily(_build_titan, _adapt_titan, _run_titan),
    "prism": SlideFamily(_build_prism, _adapt_prism, _run_mil),
    "chief": SlideFamily(_build_chief, _same, _run_mil),
    "madeleine": SlideFamily(_build_madeleine, _same, _run_mil),
}


def slide_family(spec: SlideModelSpec) -> SlideFamily:
    try:
        return SLIDE_FAMILIES[spec.family]
    except KeyError:
        raise KeyError(f"{spec.id}: no slide-encoder family {spec.family!r}") from None


def build_slide(spec: SlideModelSpec, device: str | torch.device = "meta") -> torch.nn.Module:
    """The slide encoder's architecture with random init, directly on ``device``."""
    with torch.device(device):
        return slide_family(spec).build(spec)


def adapt_slide_checkpoint(spec: SlideModelSpec, state: StateDict) -> StateDict:
    """The authors' checkpoint layout -> ``build_slide(spec)``'s names (load strictly after)."""
    return slide_family(spec).adapt(state)


def run_slide(spec: SlideModelSpec, model: torch.nn.Module, inputs: SlideInputs
              ) -> dict[int, torch.Tensor]:
    """One slide through the encoder: {layer: embedding (dim,)}."""
    out = slide_family(spec).run(spec, model, inputs)
    bad = {i: tuple(v.shape) for i, v in out.items() if tuple(v.shape) != (spec.dim,)}
    if bad:
        raise RuntimeError(f"{spec.id}: read-out gave shapes {bad}, expected ({spec.dim},)")
    return out
