"""Tile-encoder registry: the facts of each model are data, the code is shared per family.

Each entry in ``MODELS`` records what the authors published (architecture kwargs, parameter
count, preprocessing, embedding recipe, weights location, licence). The code that builds a
network (``BUILDERS``, keyed by ``family``) and turns its output into one vector per tile
(``RECIPES``, keyed by ``embedding``) is shared, so adding a model is adding an entry, plus a
builder or recipe only when its construction or read-out differs from the existing ones.
``ADAPTERS`` (by family) turn an authors' checkpoint layout into the built module's names
(CONCH's whole-CoCa checkpoint, transformers Dinov2 names) before the strict load.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

Interpolation = Literal["bilinear", "bicubic"]
Precision = Literal["fp16", "bf16", "fp32"]
PreprocessOn = Literal["device", "cpu", "model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class TileModelSpec:
    """Everything needed to reproduce one published tile encoder, as plain data."""

    id: str
    family: str  # selects the builder in BUILDERS (and the checkpoint adapter in ADAPTERS)
    timm_name: str  # the timm architecture (for CONCH: of the trunk)
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
    native_mpp: float  # ... at this resolution (um/px; 20x is taken as ~0.5)
    hub_repo: str | None
    hub_filename: str | None
    licence: str  # shown to the user; uncertain facts are marked "(verify)"
    gated: bool = False
    native_magnification: str | None = None  # as published, when given as a magnification
    # "cpu": the GPU resize cannot match the model card within tolerance; preprocess with PIL.
    # "model": the module takes the uint8 (N, H, W, 3) tiles itself (bench-null).
    preprocess_on: PreprocessOn = "device"
    notes: str = ""
    # A benchmark/test stand-in, not a pathology model: listed by `models`, not in the README.
    benchmark: bool = False


def _timm_vit_spec(**kw: Any) -> TileModelSpec:
    return TileModelSpec(family="timm", **kw)


def _swiglu_kwargs() -> dict[str, Any]:
    # Virchow / UNI2-h / their kin: packed SwiGLU MLP with SiLU, as in the authors' timm calls.
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _kaiko(name: str, timm_name: str, dim: int, params: int, img: int = 224) -> TileModelSpec:
    size_kw = {"img_size": img} if img != 224 else {}
    return _timm_vit_spec(
        id=f"kaiko-{name}",
        timm_name=timm_name,
        timm_kwargs={**size_kw, "dynamic_img_size": True, "num_classes": 0},
        dim=dim,
        params=params,
        input_size=224,
        resize_size=224,
        interpolation="bilinear",  # torchvision Resize default in kaiko's example (verify)
        crop=True,
        mean=HALF,
        std=HALF,
        embedding="cls",
        precision="fp16",  # no published recommendation (verify)
        native_tile_px=224,
        native_mpp=0.5,  # (verify) trained on mixed magnifications
        # Authors ship via torch hub (github kaiko-ai/towards_large_pathology_fms).
        hub_repo=f"1aurent/{timm_name}.kaiko_ai_towards_large_pathology_fms",
        hub_filename="model.safetensors",
        licence="kaiko non-commercial licence per the HF mirror's tag; the authors' GitHub "
        "repo may differ, Apache-2.0? (verify). Weights from the 1aurent/ community mirror of "
        "the torch-hub release (verify)",
    )


def _bench_null(tile_px: int) -> TileModelSpec:
    """Benchmark stand-ins at the fields of view of kaiko/Virchow (224), UNI (256) and CONCH
    (512): a job with all three has three tiling specs, as a real 3-model job would."""
    return TileModelSpec(
        id="bench-null" if tile_px == 224 else f"bench-null-{tile_px}",
        family="bench-null",
        timm_name="none",  # no network: grid-mean RGB x fixed projection (bench_null.py)
        timm_kwargs={},
        dim=1024,  # UNI-sized
        params=0,  # the projection is a buffer drawn from a fixed seed, not a parameter
        input_size=tile_px, resize_size=tile_px, interpolation="bilinear", crop=True,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),  # if preprocessed anyway: pixels / 255
        embedding="pooled",
        precision="fp32",  # nothing to gain from autocast
        native_tile_px=tile_px, native_mpp=0.5,
        hub_repo=None,
        hub_filename=None,
        licence="benchmark/test model: no network, embeddings meaningless; nothing to "
        "download: use weights: random",
        preprocess_on="model",  # the generic float conversion would cost ~20x the pooling
        notes="benchmark/test model: no network, embeddings meaningless. Mean RGB of a "
        "4x4 grid of the uint8 tile (48 values) times a fixed 48x1024 projection "
        "(numpy default_rng(0)): measures the pipeline's own ceiling without a GPU",
        benchmark=True,
    )


def _all_specs() -> tuple[TileModelSpec, ...]:
    swiglu = _swiglu_kwargs()
    virchow_kwargs = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **swiglu,
                      "global_pool": "", "dynamic_img_size": True, "num_classes": 0}
    hoptimus_kwargs = {"img_size": 224, "init_values": 1e-5, "global_pool": "token",
                       "dynamic_img_size": False, "num_classes": 0}
    return (
        _timm_vit_spec(
            id="virchow",
            timm_name="vit_huge_patch14_224",
            timm_kwargs=virchow_kwargs,
            dim=2560,
            params=631_229_184,
            input_size=224, resize_size=224, interpolation="bicubic", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="cls_patch_mean",
            precision="fp16",
            native_tile_px=224, native_mpp=0.5,
            hub_repo="paige-ai/Virchow",
            hub_filename="pytorch_model.bin",
            licence="Apache-2.0 with Paige's access conditions (verify); gated: accept the "
            "terms on the model page, then set HF_TOKEN",
            gated=True,
        ),
        _timm_vit_spec(
            id="virchow2",
            timm_name="vit_huge_patch14_224",
            timm_kwargs={**virchow_kwargs, "reg_tokens": 4},
            dim=2560,
            params=631_239_424,
            input_size=224, resize_size=224, interpolation="bicubic", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="cls_patch_mean",  # patch mean over tokens 5: (CLS + 4 registers)
            precision="fp16",
            native_tile_px=224, native_mpp=0.5,
            hub_repo="paige-ai/Virchow2",
            hub_filename="pytorch_model.bin",
            licence="CC-BY-NC-ND-4.0, non-commercial (verify); gated: accept the terms on the "
            "model page, then set HF_TOKEN",
            gated=True,
        ),
        _timm_vit_spec(
            id="uni",
            timm_name="vit_large_patch16_224",
            timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
            dim=1024,
            params=303_350_784,
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="cls",
            precision="fp16",
            native_tile_px=256,  # 256 px at 20x, resized to 224
            native_mpp=0.5, native_magnification="20x",
            hub_repo="MahmoodLab/UNI",
            hub_filename="pytorch_model.bin",
            licence="CC-BY-NC-ND-4.0, non-commercial academic research only (verify); gated: "
            "request access on the model page, then set HF_TOKEN",
            gated=True,
        ),
        _timm_vit_spec(
            id="uni2-h",
            timm_name="vit_giant_patch14_224",
            timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                         "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                         "num_classes": 0, "no_embed_class": True, **swiglu,
                         "reg_tokens": 8, "dynamic_img_size": True},
            dim=1536,
            params=681_394_176,
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="cls",
            precision="bf16",
            native_tile_px=256, native_mpp=0.5, native_magnification="20x",
            hub_repo="MahmoodLab/UNI2-h",
            hub_filename="pytorch_model.bin",
            licence="CC-BY-NC-ND-4.0, non-commercial academic research only (verify); gated: "
            "request access on the model page, then set HF_TOKEN",
            gated=True,
        ),
        TileModelSpec(
            id="conch",
            family="conch",
            timm_name="vit_base_patch16_224",  # trunk; pooler + ln_contrast in models/conch.py
            timm_kwargs={"img_size": 448, "num_classes": 0, "global_pool": ""},
            dim=512,
            # Trunk 86,250,240 + attn_pool_contrast 1,315,840 + ln_contrast 1,024: the part
            # that computes the embedding. MODELS.md: "~87.5M vision"; the whole visual
            # module (with proj_contrast and the caption pooler) is 90,392,832. Computed here.
            params=87_567_104,
            input_size=448, resize_size=448, interpolation="bicubic", crop=True,
            mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
            embedding="pooled",
            precision="fp32",  # evaluated in fp32 by the authors
            native_tile_px=512, native_mpp=0.5, native_magnification="20x",
            hub_repo="MahmoodLab/conch",
            hub_filename="pytorch_model.bin",
            licence="CC-BY-NC-ND-4.0, non-commercial academic research only (verify); gated: "
            "request access on the model page, then set HF_TOKEN",
            gated=True,
            notes="checkpoint holds the whole CoCa model: only visual.trunk, "
            "visual.attn_pool_contrast and visual.ln_contrast are loaded",
        ),
        TileModelSpec(
            id="conch-v1.5",
            family="conch-v1.5",
            timm_name="vit_large_patch16_224",  # trunk, subclassed for DINO pos interpolation
            timm_kwargs={"img_size": 224, "init_values": 1.0, "num_classes": 0,
                         "global_pool": ""},
            dim=768,
            # Trunk 303,350,784 + bias-free pooler 2,756,864 + ln_contrast 1,536. MODELS.md
            # says ~304M; this exact figure is computed from the authors' construction
            # (TRIDENT conchv1_5.py: vit_large init_values=1.0, AttentionalPooler(768, 1024,
            # 8 heads, 1 query), LayerNorm(768)).
            params=306_109_184,
            input_size=448, resize_size=448, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="pooled",
            precision="fp16",  # what mahmoodlab/TRIDENT uses (verify)
            native_tile_px=512, native_mpp=0.5, native_magnification="20x",
            hub_repo="MahmoodLab/conchv1_5",
            hub_filename="pytorch_model_vision.bin",
            licence="CC-BY-NC-ND-4.0, non-commercial academic research only (verify); gated: "
            "request access on the model page, then set HF_TOKEN",
            gated=True,
            notes="trunk built at 224; checkpoint pos_embed resized to 14x14 (bilinear) at "
            "load, interpolated bicubically with scale (grid + 0.1) / 14 at run time",
        ),
        _timm_vit_spec(
            id="gigapath",
            timm_name="vit_giant_patch14_dinov2",
            timm_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536,
                         "depth": 40, "num_heads": 24, "init_values": 1e-5,
                         "mlp_ratio": 5.33334, "num_classes": 0},
            dim=1536,
            params=1_134_953_984,
            input_size=224, resize_size=256, interpolation="bicubic", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="cls",
            precision="fp16",
            native_tile_px=256, native_mpp=0.5,
            hub_repo="prov-gigapath/prov-gigapath",
            hub_filename="pytorch_model.bin",
            licence="Apache-2.0 (verify); gated: accept the terms on the model page, then set "
            "HF_TOKEN",
            gated=True,
        ),
        _kaiko("vits16", "vit_small_patch16_224", 384, 21_665_664),
        _kaiko("vits8", "vit_small_patch8_224", 384, 21_670_272),  # computed: MODELS 21.67M
        _kaiko("vitb16", "vit_base_patch16_224", 768, 85_798_656),  # computed: MODELS 85.80M
        _kaiko("vitb8", "vit_base_patch8_224", 768, 85_807_872),  # computed: MODELS 85.81M
        # Built at 518 (37x37 pos_embed); timm's dynamic_img_size resamples it to the input
        # grid at every forward (bicubic, antialias).
        _kaiko("vitl14", "vit_large_patch14_reg4_dinov2", 1024, 304_370_688, img=518),
        _timm_vit_spec(
            id="h-optimus-0",
            timm_name="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=hoptimus_kwargs,
            dim=1536,
            params=1_134_774_272,
            input_size=224, resize_size=224, interpolation="bicubic", crop=False,
            mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
            embedding="cls",
            precision="fp16",
            native_tile_px=224, native_mpp=0.5,
            hub_repo="bioptimus/H-optimus-0",
            hub_filename="pytorch_model.bin",
            licence="Apache-2.0 (verify); gated: accept the terms on the model page, then set "
            "HF_TOKEN",
            gated=True,
            notes="model card feeds 224x224 tiles without resize; other sizes are resized "
            "(bicubic, verify)",
        ),
        _timm_vit_spec(
            id="h-optimus-1",
            timm_name="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=hoptimus_kwargs,
            dim=1536,
            params=1_134_774_272,
            input_size=224, resize_size=224, interpolation="bicubic", crop=False,
            mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
            embedding="cls",
            precision="fp16",
            native_tile_px=224, native_mpp=0.5,
            hub_repo="bioptimus/H-optimus-1",
            hub_filename="pytorch_model.bin",
            licence="Bioptimus non-commercial licence (verify); gated: accept the terms on the "
            "model page, then set HF_TOKEN",
            gated=True,
        ),
        TileModelSpec(
            id="phikon-v2",
            family="hf-dinov2",
            timm_name="vit_large_patch16_224",  # transformers Dinov2 ViT-L/16 in timm names
            timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0},
            dim=1024,
            # Computed: timm ViT-L/16 with LayerScale at 224. The transformers model has one
            # more parameter tensor, embeddings.mask_token (1,024), unused at inference:
            # 303,351,808 in all; MODELS.md "~303M". image_size 224 in its config (verify).
            params=303_350_784,
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="cls",  # last_hidden_state[:, 0] = CLS after the final layernorm
            precision="fp32",  # no published recommendation; transformers default (verify)
            native_tile_px=224, native_mpp=0.5, native_magnification="20x",
            hub_repo="owkin/phikon-v2",
            hub_filename="model.safetensors",
            licence="Owkin non-commercial licence (verify); not gated",
        ),
        TileModelSpec(
            id="phikon",
            family="hf-vit",
            timm_name="vit_base_patch16_224",  # transformers ViTModel ViT-B/16 in timm names
            # transformers' ViT LayerNorms use eps 1e-12 (ViTConfig default; verify the repo's
            # config.json); timm's default is 1e-6.
            timm_kwargs={"num_classes": 0,
                         "norm_layer": functools.partial(torch.nn.LayerNorm, eps=1e-12)},
            dim=768,
            # Computed: ViT-B/16 at 224 without the pooler (add_pooling_layer=False, as the
            # authors' and TRIDENT's loaders use it); "86M" as published (verify).
            params=85_798_656,
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="cls",  # last_hidden_state[:, 0]: CLS after the final layernorm
            precision="fp32",  # as TRIDENT runs it; no published recommendation (verify)
            native_tile_px=224, native_mpp=0.5, native_magnification="20x",
            hub_repo="owkin/phikon",
            hub_filename="pytorch_model.bin",
            licence="Owkin non-commercial licence (verify); not gated",
        ),
        TileModelSpec(
            id="resnet50-trunc",
            family="timm-features",
            timm_name="resnet50",
            # ImageNet ResNet-50 cut after layer3 (1,024 channels at stride 16), average-pooled:
            # the control CLAM introduced and benchmarks report (TRIDENT "resnet50").
            timm_kwargs={"features_only": True, "out_indices": (3,)},
            dim=1024,
            params=8_543_296,  # computed: conv1..layer3 of timm's resnet50 (a snapshot)
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            embedding="feature_mean",
            precision="fp32",
            native_tile_px=256, native_mpp=0.5, native_magnification="20x",  # CLAM's (verify)
            hub_repo="timm/resnet50.tv_in1k",  # torchvision's ImageNet-1k weights
            hub_filename="model.safetensors",
            licence="BSD-3-Clause (torchvision weights, verify); not gated; an ImageNet "
            "baseline, not a pathology model",
        ),
        *(_bench_null(px) for px in (224, 256, 512)),
    )


MODELS: dict[str, TileModelSpec] = {spec.id: spec for spec in _all_specs()}


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


def _build_conch(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import conch

    return conch.build_v1(spec.timm_name, spec.timm_kwargs, spec.dim)


def _build_conch15(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import conch

    return conch.build_v15(spec.timm_name, spec.timm_kwargs, spec.dim)


def _build_bench_null(spec: TileModelSpec) -> torch.nn.Module:
    from pipeline.models import bench_null

    return bench_null.build(spec.dim)


BUILDERS: dict[str, Callable[[TileModelSpec], torch.nn.Module]] = {
    "timm": _build_timm,
    "hf-dinov2": _build_timm,  # same network; only the checkpoint names differ (ADAPTERS)
    "hf-vit": _build_timm,  # likewise
    "timm-features": _build_timm,  # a timm CNN truncated by features_only/out_indices
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


ADAPTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "conch": _adapt_conch,
    "conch-v1.5": _adapt_conch15,
    "hf-dinov2": _adapt_hf_dinov2,
    "hf-vit": _adapt_hf_vit,
    "timm-features": _adapt_truncated_cnn,
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
    # CONCH: the tower's own forward is the embedding (attentional pool + ln_contrast);
    # bench-null: likewise (grid mean x fixed projection).
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


# --- tiling and documentation ----------------------------------------------------------------


def tiling_spec(spec: TileModelSpec) -> tuple[int, float]:
    """(tile px, um/px) the model was trained on: models sharing it can share one tiling."""
    return spec.native_tile_px, spec.native_mpp


def _tile_text(spec: TileModelSpec) -> str:
    mag = f" ({spec.native_magnification})" if spec.native_magnification else ""
    return f"{spec.native_tile_px} px @ {spec.native_mpp:g} mpp{mag} -> {spec.input_size} px"


def markdown_table() -> str:
    """The README's model table, generated so it cannot drift from the registry.

    Pathology models only: benchmark/test entries (bench-null) are listed by ``models``.
    """
    head = ["id", "dim", "params", "precision", "tile spec", "hub repo", "licence / gating"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in MODELS.values():
        if spec.benchmark:
            continue
        repo = f"`{spec.hub_repo}`" if spec.hub_repo else "-"
        cells = [f"`{spec.id}`", str(spec.dim), f"{spec.params:,}", spec.precision,
                 _tile_text(spec), repo, spec.licence.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def choosing_table(reference: str = "kaiko-vits16") -> str:
    """The README's "Choosing a model" table: what decides between models, side by side."""
    head = ["id", "dim", "tile spec", "GFLOP / tile", f"cost vs `{reference}`", "gated",
            "commercial use"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = flops_per_tile(reference)
    for spec in sorted((s for s in MODELS.values() if not s.benchmark),
                       key=lambda s: flops_per_tile(s.id)):
        flops = flops_per_tile(spec.id)
        licence = spec.licence.lower()
        commercial = ("no" if "non-commercial" in licence
                      else "check the terms" if "verify" in licence else "yes")
        cells = [f"`{spec.id}`", str(spec.dim), _tile_text(spec), f"{flops / 1e9:.1f}",
                 f"{flops / ref:.1f}x", "yes" if spec.gated else "no", commercial]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

