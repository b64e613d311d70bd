"""Tile-encoder registry: the facts of each model are data, the code is shared per family.

Each entry in ``MODELS`` records what the authors published (architecture kwargs, parameter
count, preprocessing, embedding recipe, weights location, licence). The code that builds a
network (``BUILDERS``, keyed by ``family``) and turns its output into one vector per tile
(``RECIPES``, keyed by ``embedding``) is shared, so adding a model is adding an entry, plus a
builder or recipe only when its construction or read-out differs from the existing ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

Interpolation = Literal["bilinear", "bicubic"]
Precision = Literal["fp16", "bf16", "fp32"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TileModelSpec:
    """Everything needed to reproduce one published tile encoder, as plain data."""

    id: str
    family: str  # selects the builder in BUILDERS
    timm_name: str
    timm_kwargs: Mapping[str, Any]
    dim: int  # embedding width
    params: int  # published parameter count; the built architecture must match it exactly
    input_size: int  # edge of the square the network sees
    resize_size: int  # shorter side after resize, before the optional centre crop
    interpolation: Interpolation
    crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: str  # selects the recipe in RECIPES
    precision: Precision  # autocast dtype on GPU (CPU always runs fp32)
    native_tile_px: int  # tile edge the model was trained on ...
    native_mpp: float | None  # ... at this resolution (None: only a magnification is published)
    hub_repo: str | None
    hub_filename: str | None
    licence: str  # shown to the user; uncertain facts are marked "(verify)"
    gated: bool = False
    notes: str = ""


MODELS: dict[str, TileModelSpec] = {
    spec.id: spec
    for spec in (
        TileModelSpec(
            id="kaiko-vits16",
            family="timm",
            timm_name="vit_small_patch16_224",
            timm_kwargs={"dynamic_img_size": True, "num_classes": 0},
            dim=384,
            params=21_665_664,
            input_size=224,
            resize_size=224,
            interpolation="bilinear",  # torchvision Resize default in kaiko's example (verify)
            crop=True,
            mean=HALF,
            std=HALF,
            embedding="cls",
            precision="fp16",  # no published recommendation (verify); fp16 is safe for ViT-S
            native_tile_px=224,
            native_mpp=0.5,  # (verify) trained on mixed magnifications
            # Authors ship via torch hub (github kaiko-ai/towards_large_pathology_fms).
            hub_repo="1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms",
            hub_filename="model.safetensors",
            licence="kaiko non-commercial licence per the HF mirror's tag; the authors' GitHub "
            "repo may differ, Apache-2.0? (verify). Weights from 1aurent/"
            "vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms (community mirror, "
            "verify)",
        ),
        TileModelSpec(
            id="uni",
            family="timm",
            timm_name="vit_large_patch16_224",
            timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
            dim=1024,
            params=303_350_784,
            input_size=224,
            resize_size=224,
            interpolation="bilinear",
            crop=True,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            embedding="cls",
            precision="fp16",
            native_tile_px=256,  # 256 px at 20x, resized to 224
            native_mpp=None,  # published as 20x (~0.5 mpp)
            hub_repo="MahmoodLab/UNI",
            hub_filename="pytorch_model.bin",
            licence="CC-BY-NC-ND-4.0, non-commercial academic research only (verify); gated: "
            "request access on the model page, then set HF_TOKEN",
            gated=True,
        ),
    )
}


def get(model_id: str) -> TileModelSpec:
    """Look up a spec; the error lists the known ids so a typo is easy to fix."""
    try:
        return MODELS[model_id]
    except KeyError:
        raise KeyError(
            f"unknown model {model_id!r}; known: {', '.join(sorted(MODELS))}"
        ) from None


# --- builders: one per family -------------------------------------------------------------


def _build_timm(spec: TileModelSpec) -> torch.nn.Module:
    import timm

    return timm.create_model(spec.timm_name, pretrained=False, **dict(spec.timm_kwargs))


BUILDERS: dict[str, Callable[[TileModelSpec], torch.nn.Module]] = {"timm": _build_timm}


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


RECIPES: dict[str, Callable[[TileModelSpec, torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "cls": _cls,
    "cls_patch_mean": _cls_patch_mean,
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
