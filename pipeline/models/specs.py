"""The facts of each model, as plain data: importing this module imports neither torch nor timm.

Each entry in ``MODELS`` records what the authors published (architecture kwargs, parameter
count, preprocessing, embedding recipe, weights location, licence); ``SLIDE_MODELS`` does the
same for slide encoders. Config validation, planning, ``models`` and the README tables read
only these facts, so they stay fast (torch and timm take seconds to import). Layers in the
architecture kwargs are named, not imported (``Layer``): ``registry`` (the code that builds,
adapts and runs the networks) resolves them when it builds a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Interpolation = Literal["bilinear", "bicubic"]
Precision = Literal["fp16", "bf16", "fp32"]
PreprocessOn = Literal["device", "model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
GENBIO_MEAN = (0.697, 0.575, 0.728)
GENBIO_STD = (0.188, 0.240, 0.187)


@dataclass(frozen=True)
class Layer:
    """A layer class by import path (``"torch.nn.SiLU"``), with keyword arguments fixed on it
    (``functools.partial``) when ``kwargs`` is not empty. The builders resolve it
    (``registry.arch_kwargs``); the facts stay importable without torch."""

    path: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TileModelSpec:
    """Everything needed to reproduce one published tile encoder, as plain data."""

    id: str
    family: str  # selects the builder in registry.BUILDERS (and the adapter in ADAPTERS)
    timm_name: str  # the timm architecture (for CONCH: of the trunk)
    timm_kwargs: Mapping[str, Any]  # plain data; layer classes as Layer (registry resolves)
    dim: int  # embedding width
    params: int  # published parameter count; the built architecture must match it exactly
    input_size: int  # edge of the square the network sees
    resize_size: int  # shorter side after resize, before the optional centre crop
    interpolation: Interpolation
    crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: str  # selects the recipe in registry.RECIPES
    precision: Precision  # autocast dtype on GPU (CPU always runs fp32)
    native_tile_px: int  # tile edge the model was trained on ...
    native_mpp: float  # ... at this resolution (um/px; 20x is taken as ~0.5)
    hub_repo: str | None
    hub_filename: str | None
    licence: str  # shown to the user; uncertain facts are marked "(verify)"
    gated: bool = False
    native_magnification: str | None = None  # as published, when given as a magnification
    # "device": models/preprocess.py on the model's device (PIL's bytes exactly, see there);
    # "model": the module takes the uint8 (N, H, W, 3) tiles itself (bench-null).
    preprocess_on: PreprocessOn = "device"
    notes: str = ""
    # A benchmark/test stand-in, not a pathology model: listed by `models`, not in the README.
    benchmark: bool = False


def _timm_vit_spec(**kw: Any) -> TileModelSpec:
    return TileModelSpec(family="timm", **kw)


def _swiglu_kwargs() -> dict[str, Any]:
    # Virchow / UNI2-h / their kin: packed SwiGLU MLP with SiLU, as in the authors' timm calls.
    return {"mlp_layer": Layer("timm.layers.SwiGLUPacked"), "act_layer": Layer("torch.nn.SiLU")}


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
                         "norm_layer": Layer("torch.nn.LayerNorm", {"eps": 1e-12})},
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
        *_second_wave(swiglu, hoptimus_kwargs),
        *(_bench_null(px) for px in (224, 256, 512)),
    )


def _second_wave(swiglu: dict[str, Any], hoptimus_kwargs: dict[str, Any]
                 ) -> tuple[TileModelSpec, ...]:
    """Issue 18: Hibou-B/L, Lunit ViT-S/8, H0-mini, Midnight-12k, OpenMidnight, GPFM, mSTAR,
    KEEP, GenBio-PathFM, MUSK, CTransPath. Sources of each fact are in the comments/notes."""
    # Meta's SwiGLUFFNFused and transformers' Dinov2SwiGLUFFN: hidden (int(4 D * 2/3) + 7)
    # // 8 * 8, packed two halves in one linear = timm SwiGLUPacked with hidden 2x that.
    def swiglu_ratio(dim: int) -> float:
        packed = 2 * ((int(4 * dim * 2 / 3) + 7) // 8 * 8)
        return (packed + 0.5) / dim  # timm takes int(dim * ratio): half a unit of headroom

    dinov2_224 = {"img_size": 224, "num_classes": 0}
    return (
        TileModelSpec(
            id="hibou-b",
            family="dinov2",
            timm_name="vit_base_patch14_reg4_dinov2",
            # HistAI/hibou build_model: vit_base, patch 14, img 224, layerscale 1e-5,
            # swiglufused, 4 registers; histai/hibou-b config.json: the same (use_swiglu_ffn,
            # num_register_tokens 4, image_size 224, layer_norm_eps 1e-6).
            timm_kwargs={**dinov2_224, "mlp_ratio": swiglu_ratio(768), **swiglu},
            dim=768,
            # Computed (a snapshot): timm layout; the transformers/Meta modules add mask_token
            # and the class-token position slot (2 x 768): 85,741,056, LazySlide "85.7M".
            params=85_739_520,
            input_size=224, resize_size=224, interpolation="bicubic", crop=False,
            mean=HIBOU_MEAN, std=HIBOU_STD,
            embedding="cls",  # pooler_output = CLS of the final-norm hidden state
            precision="fp32",  # as TRIDENT runs Hibou; no published recommendation (verify)
            native_tile_px=224, native_mpp=0.5,  # config image_size 224; mpp (verify)
            hub_repo="histai/hibou-b",
            hub_filename="model.safetensors",
            licence="Apache-2.0 (model card); not gated (verify)",
            notes="hub checkpoint: transformers names from HistAI's Dinov2ModelWithRegisters "
            "(registers as embeddings.register_tokens, inserted after the position embedding "
            "as in Meta's code, verify); the Google-Drive checkpoint of the GitHub README: Meta "
            "dinov2 names. Both load (dinov2_ckpt). Preprocessing: Resize((224, 224)) bicubic "
            "(example.ipynb)",
        ),
        TileModelSpec(
            id="hibou-l",
            family="dinov2",
            timm_name="vit_large_patch14_reg4_dinov2",
            timm_kwargs={**dinov2_224, "mlp_ratio": swiglu_ratio(1024), **swiglu},
            dim=1024,
            # Computed (a snapshot): with mask_token and the class-token position slot the
            # authors' module has 303,659,264 = LazySlide "303.7M", HF page "304M".
            params=303_657_216,
            input_size=224, resize_size=224, interpolation="bicubic", crop=False,
            mean=HIBOU_MEAN, std=HIBOU_STD,
            embedding="cls",
            precision="fp32",  # as TRIDENT runs Hibou-L (verify)
            native_tile_px=224, native_mpp=0.5,  # (verify)
            hub_repo="histai/hibou-L",
            hub_filename="model.safetensors",
            licence="Apache-2.0 (HistAI README); gated: agree to share contact details on the "
            "model page, then set HF_TOKEN",
            gated=True,
            notes="ViT-L/14, 4 registers, SwiGLU (the 303.7M count rules out a plain MLP: "
            "303.2M); config.json not seen, the Hibou-B one and the count pin it (verify)",
        ),
        TileModelSpec(
            id="lunit-vits8",
            family="timm",
            # lunit-io/benchmark-ssl-pathology README: timm VisionTransformer(img_size=224,
            # patch_size=8, embed_dim=384, num_heads=6, num_classes=0) = vit_small_patch8_224.
            timm_name="vit_small_patch8_224",
            timm_kwargs={"num_classes": 0},
            dim=384,
            params=21_670_272,  # computed (a snapshot); LazySlide "21.7M"
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            # Lunit's ViT-S training statistics, as kaiko-ai/eva documents them (eva loads the
            # release file into timm vit_small_patch8_224); resize/crop as eva's ResizeAndCrop.
            mean=LUNIT_MEAN, std=LUNIT_STD,
            embedding="cls",  # model(x) with num_classes=0: final-norm CLS
            precision="fp32",  # as TRIDENT runs it (verify)
            native_tile_px=224, native_mpp=0.5,  # 224 px crops at 20x and 40x (verify)
            hub_repo="1aurent/vit_small_patch8_224.lunit_dino",  # timm names
            hub_filename="model.safetensors",
            licence="Lunit non-commercial licence, research use only; not gated. Weights "
            "from the 1aurent/ mirror of the GitHub release dino_vit_small_patch8_ep200.torch "
            "(same timm names, verify)",
        ),
        TileModelSpec(
            id="h0-mini",
            family="timm",
            # TRIDENT / slide2vec / LazySlide: timm hf-hub:bioptimus/H0-mini with
            # mlp_layer=SwiGLUPacked, act_layer=SiLU, img 224: vit_base_patch14_reg4_dinov2
            # with the H-optimus MLP width (4096 packed; the 85.7M count pins it).
            timm_name="vit_base_patch14_reg4_dinov2",
            timm_kwargs={**dinov2_224, "mlp_ratio": 2.66667 * 2, **swiglu,
                         "dynamic_img_size": False},
            dim=1536,
            params=85_739_520,  # computed (a snapshot); LazySlide "85.7M"
            input_size=224, resize_size=224, interpolation="bicubic", crop=True,
            mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
            embedding="cls_patch_mean",  # CLS + mean of patch tokens 5: (registers excluded)
            precision="fp16",  # H-optimus cards recommend fp16 autocast; TRIDENT fp16
            native_tile_px=224, native_mpp=0.5,
            hub_repo="bioptimus/H0-mini",
            hub_filename="model.safetensors",
            licence="CC-BY-NC-ND-4.0, non-commercial (verify); gated: accept the terms on the "
            "model page, then set HF_TOKEN",
            gated=True,
            notes="distilled from H-optimus-0; 1536 = CLS and patch-token mean (LazySlide, "
            "slide2vec default; TRIDENT offers it as cls+mean, verify on the model card)",
        ),
        TileModelSpec(
            id="midnight-12k",
            family="midnight",
            # kaiko-ai/midnight: transformers Dinov2Model ViT-g/14 (DINOv2 giant: 40 x 1536,
            # 24 heads, SwiGLU, LayerScale), no registers (slide2vec asserts none).
            timm_name="vit_giant_patch14_dinov2",
            timm_kwargs=dinov2_224,
            dim=3072,
            # Computed (a snapshot); transformers adds mask_token and the class-token
            # position slot; LazySlide "1.14B".
            params=1_134_769_664,
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=HALF, std=HALF,
            embedding="cls_patch_mean",  # kaiko: cat(last_hidden_state[:, 0], [:, 1:].mean)
            precision="fp16",  # as TRIDENT and slide2vec run it (verify)
            native_tile_px=224, native_mpp=0.5,  # trained on 0.25-2 mpp (verify)
            hub_repo="kaiko-ai/midnight",
            hub_filename="model.safetensors",
            licence="MIT (kaiko-ai/Midnight README); gated per LazySlide (verify): request "
            "access on the model page, then set HF_TOKEN",
            gated=True,
            notes="a stored position grid other than 16x16 (config image_size 518?, verify) "
            "is resampled at load exactly as current transformers does at a 224 input "
            "(bicubic by size, no antialias, fp32)",
        ),
        TileModelSpec(
            id="openmidnight",
            family="dinov2",
            # TRIDENT / LazySlide: torch.hub dinov2_vitg14_reg (pretrained=False), pos_embed
            # replaced by the checkpoint's (224: 16x16 + CLS slot), strict load.
            timm_name="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=hoptimus_kwargs,
            dim=1536,
            params=1_134_774_272,  # = H-optimus-0 (same timm module); computed snapshot
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,  # the authors' eva configs: ResizeAndCrop
            embedding="cls",  # dinov2 forward: head(x_norm_clstoken), head = Identity
            precision="fp16",  # as TRIDENT runs it (verify)
            native_tile_px=224, native_mpp=0.5,  # TCGA-12k, Midnight recipe (verify)
            hub_repo="SophontAI/OpenMidnight",
            hub_filename="teacher_checkpoint_load.pt",
            licence="Apache-2.0 (MedARC-AI/OpenMidnight repository; weights per LazySlide, "
            "verify); gated (verify): request access on the model page, then set HF_TOKEN",
            gated=True,
            notes="checkpoint: Meta dinov2 names (w12/w3 SwiGLU, register_tokens, mask_token)",
        ),
        TileModelSpec(
            id="gpfm",
            family="dinov2",
            # TRIDENT / slide2vec / LazySlide: timm vit_large_patch14_dinov2, img 224,
            # init_values 1e-5, strict load of GPFM.pth (timm names). The authors' own code:
            # Meta vit_large, patch 14, mlp FFN, block_chunks 4 (also accepted).
            timm_name="vit_large_patch14_dinov2",
            timm_kwargs={**dinov2_224, "init_values": 1e-5},
            dim=1024,
            params=303_227_904,  # computed (a snapshot); LazySlide "303M"
            input_size=224, resize_size=224, interpolation="bicubic", crop=False,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,  # models/dinov2 build_transform
            embedding="cls",
            precision="fp16",  # as TRIDENT runs it (verify)
            native_tile_px=512, native_mpp=0.25, native_magnification="40x",  # README
            hub_repo="majiabo/GPFM",
            hub_filename="GPFM.pth",
            licence="CC-BY-NC-ND-4.0, non-commercial, per the GitHub repository (the HF "
            "page is reported as MIT, verify); not gated",
        ),
        TileModelSpec(
            id="mstar",
            family="timm",
            # Innse/mSTAR README: timm vit_large_patch16_224, img 224, patch 16,
            # init_values 1e-5, num_classes 0, dynamic_img_size, strict load of mSTAR.pth.
            timm_name="vit_large_patch16_224",
            timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                         "num_classes": 0, "dynamic_img_size": True},
            dim=1024,
            params=303_350_784,  # = UNI (same module); MODELS.md's reproduced UNI count
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,  # README: Resize(224), ImageNet
            embedding="cls",
            precision="fp32",  # the authors' extraction runs fp32 (verify)
            native_tile_px=256, native_mpp=0.5, native_magnification="20x",  # (verify)
            hub_repo="Wangyh/mSTAR",
            hub_filename="mSTAR.pth",  # name used by the README (verify on the hub)
            licence="CC-BY-NC-ND-4.0, non-commercial academic research only; gated: request "
            "access on the model page, then set HF_TOKEN",
            gated=True,
        ),
        TileModelSpec(
            id="keep",
            family="keep",
            timm_name="vit_large_patch16_224",  # KEEPModel.visual
            timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                         "num_classes": 0, "dynamic_img_size": True},
            dim=768,  # projection_dim
            # Computed: ViT-L/16 303,350,784 + visual_head 1,377,792 (the text tower is not
            # built). A snapshot; no published image-tower count.
            params=304_728_576,
            input_size=224, resize_size=224, interpolation="bicubic", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,  # the authors' quick start
            embedding="pooled",  # encode_image: L2-normalised visual_head(CLS)
            precision="fp16",  # as TRIDENT runs it (verify)
            native_tile_px=224, native_mpp=0.5,  # (verify) trained on image-text pairs
            hub_repo="Astaxanthin/KEEP",
            hub_filename="model.safetensors",  # (verify) the quick start reads .bin
            licence="MIT (MAGIC-AI4Med/KEEP repository; weights, verify); not gated (verify)",
            notes="a vision-language model: the embedding is the normalised projection "
            "encode_image returns; checkpoint text tower and logit_scale are dropped",
        ),
        TileModelSpec(
            id="genbio-pathfm",
            family="genbio-pathfm",
            timm_name="none",  # own module (models/genbio_pathfm.py), authors' names
            # genbio-ai/genbio-pathfm model.py GenBio_PathFM_Inference: img 224, patch 16,
            # embed 1536, depth 40, heads 24, ffn_ratio 4 (swiglu64), 1 input channel,
            # 4 storage tokens, LayerScale 1e-5, qkv without bias, RoPE base 100 (bf16).
            timm_kwargs={"embed_dim": 1536, "depth": 40, "num_heads": 24, "patch_size": 16,
                         "storage_tokens": 4, "ffn_ratio": 4.0, "init_values": 1e-5},
            dim=4608,  # 3 x 1536: one CLS per colour channel
            params=1_133_686_784,  # computed (a snapshot); README "1.1B-parameter"
            input_size=224, resize_size=224, interpolation="bilinear", crop=False,
            mean=GENBIO_MEAN, std=GENBIO_STD,  # README: Resize((224, 224)), these stats
            embedding="pooled",
            precision="bf16",  # as TRIDENT runs it; RoPE is bf16 by construction (verify)
            native_tile_px=224, native_mpp=0.5,  # (verify) the card states no resolution
            hub_repo="genbio-ai/genbio-pathfm",
            hub_filename="model.pth",
            licence="GenBio AI Community License (not OSI; read it for commercial use, "
            "verify); not gated",
            notes="each RGB channel is encoded as its own grey image; the three final-norm "
            "CLS tokens are concatenated (R, G, B)",
        ),
        TileModelSpec(
            id="musk",
            family="musk",
            timm_name="none",  # own module (models/musk.py): BEiT-3 image path, authors' names
            # musk_large_patch16_384: img 384, patch 16, 1024 x 24 layers, 16 heads, FFN 4096,
            # sub-LN, multiway (vision branch A); ms_aug scales (1, 2).
            timm_kwargs={"img_size": 384, "patch_size": 16, "embed_dim": 1024, "depth": 24,
                         "num_heads": 16, "ffn_dim": 4096, "eps": 1e-5, "scales": (1, 2)},
            dim=2048,  # ms_aug: CLS at 384 + mean CLS of the 2x2 crops of the 768 upsample
            # Computed (a snapshot): the image path's A branch; no published image-only count.
            params=303_938_560,
            input_size=384, resize_size=384, interpolation="bicubic", crop=True,
            mean=HALF, std=HALF,  # README: Resize(384, bicubic), CenterCrop, IMAGENET_INCEPTION
            embedding="pooled",
            precision="fp16",  # README: model.to(torch.float16)
            native_tile_px=384, native_mpp=0.5,  # trained on mixed magnifications (verify)
            hub_repo="xiangjx/musk",
            hub_filename="model.safetensors",
            licence="CC-BY-NC-ND-4.0, non-commercial academic research only; gated: accept the "
            "terms on the model page, then set HF_TOKEN",
            gated=True,
            notes="ms_aug=True, with_head=False, out_norm=False: the README's read-out for "
            "linear probes and MIL (TRIDENT stores the 1024-d CLS without ms_aug); the text "
            "tower, heads and multiway B branch are not loaded",
        ),
        TileModelSpec(
            id="ctranspath",
            family="ctranspath",
            timm_name="swin_tiny_patch4_window7_224",  # with the authors' ConvStem
            timm_kwargs={"num_classes": 0},
            dim=768,
            params=27_520_038,  # computed (a snapshot); LazySlide "27.5M"
            input_size=224, resize_size=224, interpolation="bilinear", crop=True,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,  # get_features_CTransPath.py
            embedding="pooled",  # head = Identity: average of the final-norm 7x7 tokens
            precision="fp32",  # as TRIDENT runs it
            # README: "first try to extract features at 1.0mpp"
            native_tile_px=224, native_mpp=1.0, native_magnification="10x",
            hub_repo="1aurent/swin_tiny_patch4_window7_224.CTransPath",
            hub_filename="model.safetensors",
            licence="GPL-3.0 (verify); not gated. The authors publish ctranspath.pth on Google "
            "Drive and CHIEF's copy sits in the MahmoodLab/hest-bench dataset: stage either "
            "and set weights: /path (the hub entry is a community mirror, verify its layout)",
            notes="timm 0.5.4 checkpoints (the authors') and current-timm ones both load",
        ),
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


def tiling_spec(spec: TileModelSpec) -> tuple[int, float]:
    """(tile px, um/px) the model was trained on: models sharing it can share one tiling."""
    return spec.native_tile_px, spec.native_mpp


def tile_text(spec: TileModelSpec) -> str:
    """The tile spec as the README tables write it: "256 px @ 0.5 mpp (20x) -> 224 px"."""
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
                 tile_text(spec), repo, spec.licence.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



def choosing_table(reference: str = "kaiko-vits16") -> str:
    """The README's "Choosing a model" table: what decides between models, side by side.

    FLOPs are counted on a built (meta) network: this imports torch and timm when called."""
    from pipeline.models.registry import flops_per_tile

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
        cells = [f"`{spec.id}`", str(spec.dim), tile_text(spec), f"{flops / 1e9:.1f}",
                 f"{flops / ref:.1f}x", "yes" if spec.gated else "no", commercial]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- slide encoders ----------------------------------------------------------------------

# How a slide encoder turns level-0 tile coordinates into grid positions.
# "level0/256": floor(px / 256), Prov-GigaPath's coords_to_pos whatever the tile size or scan
#   (on a 40x scan, 256-px-at-20x tiles are 512 level-0 px: neighbours 2 positions apart).
# "level0/tile": px / the tile's level-0 size (neighbours 1 apart): TITAN's patch_size_lv0,
#   and TRIDENT's / slide2vec's way of feeding Prov-GigaPath.
PositionRule = Literal["level0/256", "level0/tile"]
POSITION_RULES: tuple[str, ...] = ("level0/256", "level0/tile")


@dataclass(frozen=True)
class SlideModelSpec:
    """A published slide encoder, as plain data; ``family`` selects its network, checkpoint
    adapter and read-out in ``registry.SLIDE_FAMILIES``."""

    id: str
    family: str
    input_model: str  # the tile encoder whose embeddings it reads
    input_dim: int  # width of the input model's embeddings (checked on every slide)
    dim: int
    params: int  # counted on meta from the authors' construction (tests hold it)
    # The tile spec the authors extracted its input features at: config validation refuses a
    # job that tiles input_model otherwise (other tiles are another input distribution).
    tile_px: int
    mpp: float
    hub_repo: str  # "" where the authors publish the weights elsewhere (CHIEF: Google Drive)
    hub_filename: str
    licence: str
    depth: int  # the layer its slide rows record (its last layer)
    readout: str  # what its embedding is, for the rows' aggregation label
    per_layer: bool = False  # outputs any layer's pooled state (``layers`` in the config)
    positions: PositionRule | None = None  # default rule; None: positions are not used
    other_positions: tuple[str, ...] = ()  # rules the config may choose instead
    precision: Precision = "fp16"  # autocast dtype on GPU (CPU runs fp32)
    magnification: str | None = None
    source: str = ""  # where the architecture was read (repository, file, commit)
    notes: str = ""


SLIDE_MODELS: dict[str, SlideModelSpec] = {s.id: s for s in (
    SlideModelSpec(
        id="gigapath-slide", family="gigapath", input_model="gigapath", input_dim=1536,
        dim=768, params=86_330_880, tile_px=256, mpp=0.5,
        hub_repo="prov-gigapath/prov-gigapath", hub_filename="slide_encoder.pth",
        licence="Apache-2.0 code; weights gated on the hub: accept the terms, set HF_TOKEN "
                "(verify)",
        depth=12, readout="", per_layer=True,  # readout: global-pool or cls (config)
        positions="level0/256", other_positions=("level0/tile",), precision="fp16",
        source="prov-gigapath/prov-gigapath gigapath/slide_encoder.py + torchscale",
    ),
    SlideModelSpec(
        id="titan", family="titan", input_model="conch-v1.5", input_dim=768, dim=768,
        # Computed from the released vision_config (6 x 768, 12 heads, MLP 3072, attention
        # poolers of 128 and 1 queries, proj 768 x 768): a snapshot, no published count.
        params=48_539_904, tile_px=512, mpp=0.5, magnification="20x",
        hub_repo="MahmoodLab/TITAN", hub_filename="model.safetensors",
        licence="CC-BY-NC-ND-4.0, non-commercial academic research only (mahmoodlab/TITAN "
                "README); gated: request access on the model page, then set HF_TOKEN",
        depth=6, readout="attn-pool", positions="level0/tile", precision="fp16",
        source="MahmoodLab/TITAN hub code (vision_transformer.py, config.json), read from "
               "the verbatim copy in DIAGNijmegen/unicorn_baseline "
               "src/unicorn_baseline/vision/pathology/titan/ (commit dec3809); the authors' "
               "GitHub repository holds evaluation scripts only",
        notes="2-D ALiBi over the tile grid (patch_size_lv0 = the tile's level-0 size); the "
              "embedding is encode_slide_from_patch_features: the contrastive attention "
              "pool, without proj; the text tower is not loaded",
    ),
    SlideModelSpec(
        id="prism", family="prism", input_model="virchow", input_dim=2560, dim=1280,
        # Computed: Perceiver (513 latents, 2 cross-attention + 1 shared 6-block
        # transformer) + cls/img norms; a snapshot, no published count.
        params=99_037_440, tile_px=224, mpp=0.5, magnification="20x",
        hub_repo="paige-ai/Prism", hub_filename="model.safetensors",
        licence="CC-BY-NC-ND-4.0, non-commercial academic research only (verify); gated: "
                "accept the terms on the model page, then set HF_TOKEN",
        depth=8, readout="perceiver-cls", precision="fp16",
        source="paige-ai/Prism hub code (perceiver.py, modeling_prism.py, config.json), read "
               "from the verbatim copy in DIAGNijmegen/unicorn_baseline "
               "src/unicorn_baseline/vision_language/prism/ (commit dec3809)",
        notes="slide_representations()['image_embedding']: the CLS latent, cls_norm'ed; "
              "BioGPT decoder and contrastive heads are not loaded",
    ),
    SlideModelSpec(
        id="chief", family="chief", input_model="ctranspath", input_dim=768, dim=768,
        # Computed: CHIEF(size_arg="small", n_classes=2) as the authors build it, every
        # module (classifier heads included, they are in the checkpoint); a snapshot.
        params=1_185_032, tile_px=256, mpp=1.0, magnification="10x",
        hub_repo="", hub_filename="CHIEF_pretraining.pth",
        licence="AGPL-3.0 code (hms-dbmi/CHIEF LICENSE); weights on the authors' Google "
                "Drive on request (terms: verify): stage CHIEF_pretraining.pth and set "
                "weights: /path",
        depth=1, readout="attention-mil", precision="fp32",
        source="hms-dbmi/CHIEF models/CHIEF.py (commit 1abed33)",
        notes="WSI_feature: softmax(gated attention) x the input tile features, without the "
              "anatomical-site text embedding; trained on CHIEF's own CTransPath weights "
              "(CHIEF_CTransPath.pth): set the ctranspath model's weights to that file",
    ),
    SlideModelSpec(
        id="madeleine", family="madeleine", input_model="conch", input_dim=512, dim=512,
        # Computed: MADELEINE (abmil, 4 heads, 512 wide, no stain encoding) as the authors'
        # training script builds it; a snapshot.
        params=4_996_740, tile_px=256, mpp=1.0, magnification="10x",
        hub_repo="MahmoodLab/madeleine", hub_filename="model.pt",
        licence="CC-BY-NC-ND-4.0, non-commercial academic research only (mahmoodlab/"
                "MADELEINE LICENSE.md); gated (verify): request access on the model page, "
                "then set HF_TOKEN",
        depth=1, readout="4-head-attention-mil", precision="bf16",
        source="mahmoodlab/MADELEINE madeleine/models/Model.py + abmil.py (commit 419287d); "
               "n_heads 4, hidden 512, softmax: scripts/launch_pretrain_*.sh (the released "
               "model_config.json was not readable here, verify)",
        notes="encode_he: pre-attention MLP -> 4 gated-attention heads over interleaved "
              "channels -> projector; bf16 autocast as the authors' training config "
              "(precision from model_config.json, verify)",
    ),
)}


def get_slide_model(model_id: str) -> SlideModelSpec:
    """Look up a slide encoder; the error lists the known ids."""
    try:
        return SLIDE_MODELS[model_id]
    except KeyError:
        raise KeyError(f"unknown slide encoder {model_id!r}; known: "
                       f"{', '.join(sorted(SLIDE_MODELS))}") from None
