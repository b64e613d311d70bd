"""Prov-GigaPath slide encoder: layout, strict loading, and maths against a naive reference.

The naive implementation below is written independently of pipeline.models.gigapath_slide:
dense attention over the whole padded sequence with explicit boolean masks, explicit softmax
and log-sum-exp merge, float64 throughout, and the position table built the reference's way
(numpy meshgrid) for the rows in use. It follows torchscale's DilatedAttention semantics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.models import gigapath_slide as gs
from pipeline.models.gigapath_slide import (
    GigaPathSlideEncoder,
    coords_to_pos,
    count_params,
    dilated_attention,
    load_gigapath_slide_encoder,
    sincos_pos_embed,
)
from pipeline.models.weights import WeightsError

SEGS = (1024, 5792, 32768, 185363, 1048576)
RATIOS = (1, 2, 4, 8, 16)


def expected_keys(depth: int = 12) -> list[str]:
    keys = ["cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                  "self_attn.inner_attn_ln", "self_attn_layer_norm", "ffn.fc1", "ffn.fc2",
                  "ffn.ffn_layernorm", "final_layer_norm"):
            keys += [p + m + ".weight", p + m + ".bias"]
    keys += ["encoder.layer_norm.weight", "encoder.layer_norm.bias", "norm.weight", "norm.bias"]
    return keys


def random_state(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights with non-trivial LayerNorms and CLS, so every parameter matters."""
    torch.manual_seed(seed)
    model = GigaPathSlideEncoder(depth)
    state = model.state_dict()
    for k, v in state.items():
        if k.endswith("norm.weight") or "_ln.weight" in k or "layernorm.weight" in k:
            v.copy_(1 + 0.1 * torch.randn_like(v))
        elif k.endswith(".bias") or k == "cls_token":
            v.copy_(0.1 * torch.randn_like(v))
    return state


# --- naive reference ---------------------------------------------------------------------------


def naive_pos_embed(pos: np.ndarray, dim: int = 768) -> np.ndarray:
    grid = np.stack(np.meshgrid(np.arange(1000.0), np.arange(1000.0)), 0).reshape(2, -1)
    cells = grid[:, pos - 1]  # rows of the reference's 1,000,000-row table, row 0 = CLS

    def one_d(d: int, t: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", t, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, cells[0]), one_d(dim // 2, cells[1])], axis=1)
    emb[pos == 0] = 0
    return emb


def naive_dilated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segs=SEGS,
                  ratios=RATIOS) -> torch.Tensor:
    """(L, H, D) -> (L, H, D); float64; dense logits + boolean masks per branch and head."""
    q, k, v = q.double(), k.double(), v.double()
    length, heads, d = q.shape
    outs, lses = [], []
    for sl, r in zip(segs, ratios, strict=True):
        s = min(sl, length)
        n = math.ceil(length / s)
        g = math.ceil(s / r) * r
        total = n * g
        # Padded layout: token t at (t // s) * g + t % s, zeros elsewhere (never masked).
        slot = torch.tensor([(t // s) * g + t % s for t in range(length)])
        qp, kp, vp = (torch.zeros(total, heads, d, dtype=torch.float64) for _ in range(3))
        qp[slot], kp[slot], vp[slot] = q, k, v
        seg = torch.arange(total) // g
        local = torch.arange(total) % g
        out_b = torch.zeros(total, heads, d, dtype=torch.float64)
        lse_b = torch.full((total, heads), -1e8, dtype=torch.float64)
        for h in range(heads):
            sel = local % r == h // (heads // r)
            mask = (seg[sel][:, None] == seg[None, :]) & sel[None, :]
            logits = (qp[sel, h] @ kp[:, h].T) / math.sqrt(d)
            logits = logits.masked_fill(~mask, float("-inf"))
            lse = torch.logsumexp(logits, dim=-1)
            out_b[sel, h] = torch.exp(logits - lse[:, None]) @ vp[:, h]
            lse_b[sel, h] = torch.where(lse == 0, torch.full_like(lse, -1e8), lse)
        # torchscale reads outputs back at flat index t of the padded layout (not at slot[t]).
        outs.append(out_b[:length])
        lses.append(lse_b[:length])
    weights = torch.softmax(torch.stack(lses), dim=0)
    return (weights.unsqueeze(-1) * torch.stack(outs)).sum(0)


def naive_model(state: dict[str, torch.Tensor], depth: int, x: torch.Tensor, coords: np.ndarray,
                tile: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(mean-pooled output, mean-pooled per-layer outputs, CLS output)."""
    sd = {k: v.double() for k, v in state.items()}

    def lin(t, name):
        return t @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(t, name, eps=1e-5):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    pos = (np.floor(coords[:, 0] / tile) * 1000 + np.floor(coords[:, 1] / tile)).astype(int) + 1
    h = lin(x.double(), "patch_embed.proj") + torch.from_numpy(naive_pos_embed(pos)).float()
    h = torch.cat([sd["cls_token"][0], h], 0)
    states = [h]
    for i in range(depth):
        p = f"encoder.layers.{i}."
        a = ln(h, p + "self_attn_layer_norm")
        q, k, v = (lin(a, p + f"self_attn.{n}_proj").view(len(h), 16, 48) for n in "qkv")
        att = naive_dilated(q, k, v).reshape(len(h), 768)
        h = h + lin(ln(att, p + "self_attn.inner_attn_ln"), p + "self_attn.out_proj")
        f = F.gelu(lin(ln(h, p + "final_layer_norm"), p + "ffn.fc1"))
        h = h + lin(ln(f, p + "ffn.ffn_layernorm"), p + "ffn.fc2")
        states.append(h)

    def pool(t):
        return ln(t[1:].mean(0), "norm", eps=1e-6)

    final = ln(h, "encoder.layer_norm")
    return pool(final), [pool(t) for t in states], ln(final[0], "norm", eps=1e-6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def row_major_coords(n: int, cols: int, tile: float, seed: int = 0) -> np.ndarray:
    """Tiles of a row-major scan with some holes, level-0 px, as tiling would produce them."""
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(cols * (n // cols + 20), n, replace=False))
    ys, xs = np.divmod(cells, cols)
    return np.stack([xs * tile + rng.uniform(0, tile - 1, n), ys * tile], 1)


# --- (a) layout --------------------------------------------------------------------------------


def test_param_count_and_key_names_match_official_checkpoint() -> None:
    assert count_params() == 86_330_880
    with torch.device("meta"):
        model = GigaPathSlideEncoder()
    assert sorted(model.state_dict()) == sorted(expected_keys())
    assert len(model.state_dict()) == len(expected_keys())  # no buffers (pos table) either


# --- (b) strict loading ------------------------------------------------------------------------


def test_strict_load_roundtrip_and_clear_errors(tmp_path) -> None:
    state = random_state(depth=12, seed=1)
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": state}, path)
    model = load_gigapath_slide_encoder(path, "cpu")
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    partial = {k: v for k, v in state.items() if not k.startswith("encoder.layers.11.")}
    partial["head.weight"] = torch.zeros(2, 768)
    bad = tmp_path / "partial.pth"
    torch.save({"model": partial}, bad)
    with pytest.raises(WeightsError) as info:
        load_gigapath_slide_encoder(bad)
    msg = str(info.value)
    assert "20 missing" in msg and "encoder.layers.11.ffn.fc1.weight" in msg
    assert "1 unexpected: head.weight" in msg and "partial.pth" in msg

    shaped = dict(state, **{"norm.weight": torch.ones(1024)})
    with pytest.raises(WeightsError, match=r"shape mismatches: norm.weight"):
        load_gigapath_slide_encoder({"model": shaped})
    with pytest.raises(WeightsError, match="not found"):
        load_gigapath_slide_encoder(tmp_path / "absent.pth")


# --- (c) maths against the naive reference -----------------------------------------------------


def test_dilated_attention_matches_naive_one_layer() -> None:
    # L = 3000: branch 1 has 3 segments of 1024 (the last one padded); the others attend over
    # one segment of 3000, padded where 3000 is not a multiple of the ratio (16).
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 3000, 16, 48) * 2 for _ in range(3))
    ref = naive_dilated(q[0], k[0], v[0])
    for impl in ("math", "sdpa_cpu"):
        err = rel_err(dilated_attention(q, k, v, impl=impl)[0], ref)
        print(f"dilated attention {impl} vs naive fp64, L=3000: rel err {err:.2e}")
        assert err <= 1e-5


def test_dilated_attention_matches_naive_reference_quirks() -> None:
    # Small segments reproduce what only > 185,362 tiles trigger in the released config: a
    # segment length not divisible by its ratio across several segments (13/2, 42/4).
    torch.manual_seed(3)
    segs, ratios = (7, 13, 42), (1, 2, 4)
    q, k, v = (torch.randn(2, 100, 4, 8, dtype=torch.float64) for _ in range(3))
    ours = dilated_attention(q, k, v, segs, ratios, impl="math")
    for b in range(2):
        assert rel_err(ours[b], naive_dilated(q[b], k[b], v[b], segs, ratios)) <= 1e-12


def test_full_model_matches_naive() -> None:
    # 2 of the 12 layers (the naive reference costs ~5 GFLOP fp64 per layer at this size;
    # layers are identical in structure); 1100 tiles: branch 1 has two segments, the second
    # padded; every other branch pads its single segment to its ratio.
    depth = 2
    state = random_state(depth, seed=4)
    model = GigaPathSlideEncoder(depth).eval()
    model.load_state_dict(state)
    n, tile = 1100, 224.0
    coords = row_major_coords(n, cols=70, tile=tile)
    torch.manual_seed(5)
    x = torch.randn(n, 1536)
    with torch.inference_mode():
        ours = model(x, torch.from_numpy(coords), tile)
        ours_layers = model(x, torch.from_numpy(coords), tile, all_layers=True)
        ours_cls = model(x.unsqueeze(0), torch.from_numpy(coords).unsqueeze(0), tile,
                         global_pool=False)
    ref, ref_layers, ref_cls = naive_model(state, depth, x, coords, tile)
    err = rel_err(ours, ref)
    layer_errs = [rel_err(ours_layers[f"layer_{i}_embed"], r) for i, r in enumerate(ref_layers)]
    cls_err = rel_err(ours_cls[0], ref_cls)
    print(f"full model {depth} layers, {n} tiles vs naive fp64: rel err {err:.2e}, "
          f"per layer max {max(layer_errs):.2e}, CLS {cls_err:.2e}")
    assert err <= 1e-5 and max(layer_errs) <= 1e-5 and cls_err <= 1e-5
    assert set(ours_layers) == {f"layer_{i}_embed" for i in range(depth + 1)} | {
        "last_layer_embed"}
    assert torch.equal(ours_layers["last_layer_embed"], ours_layers[f"layer_{depth}_embed"])
    assert ours.shape == (768,) and ours_cls.shape == (1, 768)


# --- (d) position embedding --------------------------------------------------------------------


def test_position_embedding_rows_match_formula() -> None:
    tile = 256.0
    coords = torch.tensor([[0.0, 0.0], [3 * 256 + 10, 5 * 256 + 255], [999 * 256, 7 * 256],
                           [12 * 256, 999 * 256 + 1]])
    pos = coords_to_pos(coords, tile)
    assert pos.tolist() == [1, 3006, 999008, 13000]
    ours = sincos_pos_embed(torch.cat([torch.tensor([0]), pos]))
    ref = naive_pos_embed(np.concatenate([[0], pos.numpy()]))
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref.astype(np.float32), rtol=0, atol=1e-6)
    # By hand: first 384 dims encode the y index (5), the last 384 the x index (3).
    row = ours[2].double()
    for dim, want in [(0, math.sin(5)), (192, math.cos(5)), (384, math.sin(3)),
                      (576, math.cos(3)), (1, math.sin(5 * 10000 ** (-1 / 192)))]:
        assert abs(row[dim].item() - want) < 1e-6
    assert not ours[0].any()
    with pytest.raises(ValueError, match="out of"):
        coords_to_pos(torch.tensor([[1000 * 256.0, 0.0]]), tile)


# --- (e) memory is linear in the number of tiles -----------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op makes while it is on (also used by test_slide_encoders)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(("impl", "n"), [("sdpa_cpu", 20_000), ("math", 8_000)])
def test_no_quadratic_tensor(impl: str, n: int, monkeypatch) -> None:
    length = n + 1
    monkeypatch.setattr(gs, "MAX_LOGITS", 1 << 22)
    monkeypatch.setattr(gs, "FFN_CHUNK", 4096)
    model = GigaPathSlideEncoder(1, attn_impl=impl).eval()
    coords = torch.from_numpy(row_major_coords(n, cols=150, tile=256.0))
    x = torch.randn(n, 1536)
    with torch.inference_mode(), LargestTensor() as seen:
        out = model(x, coords, 256.0)
    assert torch.isfinite(out).all()
    # Branches 4/5 attend over the whole sequence (one segment of L tokens, L/8 and L/16 of
    # them per head): their attention matrices alone would hold 16 * (L/8)**2 = L**2 / 4
    # elements. Everything we allocate is O(L * width) or a bounded chunk.
    bound = max(length * 768 * 2, gs.FFN_CHUNK * 3072, gs.MAX_LOGITS)
    print(f"{impl}: largest tensor {seen.largest:,} elements (L^2 / 4 = {length**2 // 4:,})")
    assert seen.largest <= bound < length * length // 4


def test_driver_checks_the_slide_checkpoint_without_loading_it(tmp_path) -> None:
    from pipeline.config import SlideEncoderConfig, StorageConfig
    from pipeline.models.weights import check_slide_checkpoint as by_spec
    from pipeline.models.weights import resolve_weights
    from pipeline.slide_encode import get_slide_model

    def check_slide_checkpoint(ref, storage):  # every family's check, by its spec
        return by_spec(spec, ref, storage)

    state = random_state(depth=12, seed=1)
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": state}, path)
    spec = get_slide_model("gigapath-slide")

    def ref(p):
        return resolve_weights(SlideEncoderConfig(id="gigapath-slide", weights=str(p)),
                               StorageConfig(), spec=spec)

    assert check_slide_checkpoint(ref(path), StorageConfig()) is True
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        check_slide_checkpoint(ref(cut), StorageConfig())
    partial = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in state.items() if k != "norm.weight"}}, partial)
    with pytest.raises(WeightsError, match="1 missing keys: norm.weight"):
        check_slide_checkpoint(ref(partial), StorageConfig())


# --- (d) precision and kernels -----------------------------------------------------------------


def test_residual_stream_stays_fp32_under_autocast() -> None:
    """bf16 autocast on CPU runs the casts CUDA's fp16 autocast does: the layers' inputs (the
    residual stream) are fp32, as the authors' fp32 position table and CLS keep them."""
    torch.manual_seed(0)
    model = GigaPathSlideEncoder(2, segment_lengths=(64, 128), dilated_ratios=(1, 2)).eval()
    seen: list[torch.dtype] = []
    for layer in model.encoder.layers:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    x, c = torch.randn(150, 1536), torch.randint(0, 40, (150, 2)).float() * 256
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.embed_tokens(x.unsqueeze(0), c.unsqueeze(0), 256.0)
        out = model(x, c, 256.0)
    assert h.dtype == torch.float32 and seen == [torch.float32] * 2
    with torch.inference_mode():
        ref = model(x, c, 256.0)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize(("args", "impl"), [
    (("cuda", torch.float16, (9, 0), True, False), "flash_attn"),
    (("cuda", torch.float16, (9, 0), False, False), "sdpa_cuda"),   # H100/H200, no flash-attn
    (("cuda", torch.bfloat16, (8, 0), False, False), "sdpa_cuda"),  # A100
    (("cuda", torch.float16, (7, 5), False, False), "math"),        # T4: no flash kernel
    (("cuda", torch.float32, (9, 0), True, False), "math"),         # fp32: no half kernel
    (("cpu", torch.float32, None, False, True), "sdpa_cpu"),
])
def test_auto_kernel_choice(args: tuple, impl: str) -> None:
    assert gs.choose_impl(*args) == impl


def test_math_kernel_keeps_logits_in_fp32_for_half_inputs() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 48).mul(4).bfloat16() for _ in range(3))
    _, lse32 = gs._attend_math(q.float(), k.float(), v.float(), 48 ** -0.5)
    _, lse16 = gs._attend_math(q, k, v, 48 ** -0.5)
    assert lse16.dtype == torch.float32
    # the same (bf16-exact) inputs: logits rounded to bf16 would be off by ~0.05-0.1 here
    torch.testing.assert_close(lse16, lse32, atol=1e-4, rtol=0)
