"""PRISM slide encoder (Paige): the Perceiver resampler over Virchow tile embeddings.

The architecture lives only in the model's hub code (``paige-ai/Prism``: ``perceiver.py``,
``modeling_prism.py``, ``config.json``); it was read from the verbatim copy of that code in
DIAGNijmegen/unicorn_baseline (``src/unicorn_baseline/vision_language/prism/``, commit
dec3809), the only readable source. ``slide_representations(tiles)['image_embedding']``:

* 513 learned latents (1 for the slide embedding + 512 image latents) x 1280;
* 8 Perceiver layers, each a cross-attention block (latents attend to the tiles) followed by
  a 6-block latent transformer. Cross-attention: LayerNorm on the latents only (the context
  is not normed), 1 head of 1280, bias-free ``to_q`` (1280), ``to_kv`` (2560 -> 2 x 1280,
  K first) and ``to_out``, scale 1280**-0.5; then a GEGLU feed-forward (LayerNorm, Linear
  1280 -> 2560, ``x * gelu(gate)`` with x the first half, Linear 1280 -> 1280). Transformer
  block: LayerNorm + bias-free ``nn.MultiheadAttention(1280, 8 heads)``, then the same
  feed-forward. All residual; LayerNorms eps 1e-5; GELU exact.
* Sharing (``share_xattn_start_layer`` 1, ``share_tf_start_layer`` 0): layers 0 and 1 have
  their own cross-attention, layers 2-7 reuse layer 1's module *and its keys and values*
  (computed once from the tiles, a KV cache); every layer reuses layer 0's transformer.
* ``cls_norm`` on latent 0 is the embedding (1280-d); ``img_norm`` on the rest: the latents
  the BioGPT decoder reads (not computed here).

The reference's default tile mask is a float tensor of ones, which SDPA *adds* to the logits:
a constant shift, no effect on the softmax (it is left out). Only the unique modules exist
here, under their first names (``perceiver.layers.0.xattn``, ``.1.xattn``, ``.0.tf``);
``adapt`` folds the checkpoint's aliases of shared modules onto them, checking they agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.weights import WeightsError

LATENTS = 512  # image latents; one more latent makes the slide embedding
LATENT_DIM = 1280
CONTEXT_DIM = 2560  # Virchow: CLS + mean patch token
MHSA_HEADS = 8
PERCEIVER_DEPTH = 8
TRANSFORMER_DEPTH = 6
OWN_XATTN = 2  # layers 0..share_xattn_start_layer have their own cross-attention
CHUNK = 16384  # tiles projected to keys/values at once


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.x_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, context) tiles -> keys and values (N, dim) each, written a chunk of tiles at a
        time into one buffer (no list of chunks and concatenated copy: 2x the cache)."""
        kv = None
        for i in range(0, len(context), CHUNK):
            part = self.to_kv(context[i:i + CHUNK])
            if kv is None:
                kv = part.new_empty(len(context), part.shape[1])
            kv[i:i + CHUNK] = part
        assert kv is not None
        return kv.chunk(2, dim=-1)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.to_q(self.x_norm(x))
        k, v = kv  # one head as wide as the latents: scale dim ** -0.5
        a = F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None])
        return self.to_out(a[0, 0])


class _FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.Identity(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.net[0](self.norm(x)).chunk(2, dim=-1)  # GEGLU: x * gelu(gate)
        return self.net[2](h * F.gelu(gate))


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.mha(h, h, h, need_weights=False)[0]


class _Perceiver(nn.Module):
    def __init__(self, dim: int, context_dim: int, latents: int, heads: int,
                 transformer_depth: int) -> None:
        super().__init__()

        def xattn() -> nn.ModuleDict:
            return nn.ModuleDict({"xattn": _CrossAttention(dim, context_dim),
                                  "ff": _FeedForward(dim)})

        tf = nn.ModuleList(nn.ModuleDict({"mhsa": _SelfAttention(dim, heads),
                                          "ff": _FeedForward(dim)})
                           for _ in range(transformer_depth))
        self.latents = nn.Parameter(torch.zeros(1 + latents, dim))
        self.layers = nn.ModuleList([nn.ModuleDict({"xattn": xattn(), "tf": tf}),
                                     nn.ModuleDict({"xattn": xattn()})])


class PrismSlideEncoder(nn.Module):
    """Virchow tile embeddings (N, 2560) -> PRISM slide embedding (1280,).

    The sizes exist for tests and benchmarks; the defaults are the released model's."""

    def __init__(self, *, dim: int = LATENT_DIM, context_dim: int = CONTEXT_DIM,
                 latents: int = LATENTS, heads: int = MHSA_HEADS,
                 depth: int = PERCEIVER_DEPTH, transformer_depth: int = TRANSFORMER_DEPTH
                 ) -> None:
        super().__init__()
        self.depth = depth
        self.perceiver = _Perceiver(dim, context_dim, latents, heads, transformer_depth)
        self.cls_norm = nn.LayerNorm(dim)
        self.img_norm = nn.LayerNorm(dim)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        width = self.perceiver.layers[0]["xattn"]["xattn"].to_kv.in_features
        if tiles.ndim != 2 or tiles.shape[1] != width:
            raise ValueError(f"PRISM reads (N, {width}) Virchow embeddings, "
                             f"got {tuple(tiles.shape)}")
        x = self.perceiver.latents.float()
        layers = self.perceiver.layers
        kv = None
        for i in range(self.depth):
            xattn = layers[min(i, OWN_XATTN - 1)]["xattn"]
            if i < OWN_XATTN:  # its own keys/values; the layers after reuse the last ones
                kv = None  # the previous layer's cache goes before this one is made
                kv = xattn["xattn"].keys_values(tiles)
            assert kv is not None
            x = x + xattn["xattn"](x, kv)
            x = x + xattn["ff"](x)
            for block in layers[0]["tf"]:
                x = x + block["mhsa"](x[None])[0]
                x = x + block["ff"](x)
        return self.cls_norm(x[0])


_XATTN_ALIAS = re.compile(r"^perceiver\.layers\.(\d+)\.xattn\.(.+)$")
_TF_ALIAS = re.compile(r"^perceiver\.layers\.(\d+)\.tf\.(.+)$")
_DROPPED = ("text_decoder.", "text_to_latents.", "img_to_latents.")


def _canonical(key: str) -> str:
    """A shared module's parameter under any layer's name -> its name here."""
    m = _XATTN_ALIAS.match(key)
    if m and int(m.group(1)) >= OWN_XATTN:
        return f"perceiver.layers.{OWN_XATTN - 1}.xattn.{m.group(2)}"
    m = _TF_ALIAS.match(key)
    if m and int(m.group(1)) >= 1:
        return f"perceiver.layers.0.tf.{m.group(2)}"
    return key


def adapt(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub checkpoint -> this module's names.

    ``image_resampler.`` is stripped; the text decoder, contrastive heads and temperature
    are dropped. A shared module's parameters may be saved under every layer that uses it
    (``torch.save`` of a state dict) or once (safetensors refuses shared tensors): both load,
    and copies under several names must agree. Unknown keys pass through to the strict load.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_DROPPED) or key == "temperature":
            continue
        name = _canonical(key.removeprefix("image_resampler."))
        if name in out:
            same = out[name].shape == value.shape and (
                value.is_meta or out[name].is_meta or torch.equal(out[name], value))
            if not same:
                raise WeightsError(f"PRISM checkpoint: {key} differs from the module it shares "
                                   f"({name}): not the released architecture")
            continue
        out[name] = value
    return out
