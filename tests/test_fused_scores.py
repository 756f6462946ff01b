"""The fused Triton scoring kernel (fitprune.kernels.fused_scores) against the torch path of fitprune.scoring.

On the CPU the kernels run in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
Triton is first imported — torch imports it at startup — so the ``test_interpreted_*`` cases run in one
pytest subprocess started by :func:`test_kernels_under_triton_interpreter` (small shapes, 16-wide tiles so
several row and column blocks, causal tile skipping and split partials are all exercised). With a CUDA
device the same checks run compiled (``-m gpu``). Without Triton these tests skip; the pruner then never
takes the fused path (``supported`` is False), which the rest of the suite covers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from triton_interpreter import HAS_TRITON, IN_INTERPRETER, interpreted, needs_triton, run_interpreted
from tiny_models import FACTORIES, IMAGES, tiny_llava

import fitprune
from fitprune import Recipe, lse_attention, scoring
from fitprune.device_constants import DeviceConstants
from fitprune.kernels import fused_scores

MASKS = ("none", "pad2d", "bool4d", "float4d")
LSE_RECIPE = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family="llava")


@pytest.mark.slow
@needs_triton
def test_kernels_under_triton_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already inside the interpreter subprocess")
    run_interpreted(__file__)


def _mask(kind: str, pad: list[int], q_len: int, kv_len: int, dtype: torch.dtype, device):
    """The mask a model passes its attention: left padding ``pad[b]``; bool4d also lets rows and keys
    [10, 30) see each other both ways (an image attended bidirectionally, as Gemma 3 does)."""
    real = torch.arange(kv_len, device=device)[None, :] >= torch.tensor(pad, device=device)[:, None]  # (B, Lkv)
    if kind == "none":
        assert not any(pad)
        return None
    if kind == "pad2d":
        return real.long()
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device)[None, :]
    allowed = (cols <= rows)[None] & real[:, None, :]  # (B, Lq, Lkv)
    if kind == "bool4d":
        image = (rows >= 10) & (rows < 30) & (cols >= 10) & (cols < 30)
        return (allowed | (image[None] & real[:, None, :]))[:, None]
    assert kind == "float4d"  # HF eager style: the model dtype's min where masked
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def _case(kind, dtype, heads, bsz=3, q_len=50, kv_len=50, row_start=5, hd=16, device="cpu", seed=0):
    """Random query/key/mask and per-sample text/visual rows; sample 1 has no text rows, and padded
    (fully masked) rows are counted as text rows of sample 2, to check the torch path's uniform rows."""
    gen = torch.Generator().manual_seed(seed)
    n_heads, n_kv = heads
    pad = [0] * bsz if kind == "none" else [0, 3, 9][:bsz]
    query = (torch.randn(bsz, n_heads, q_len, hd, generator=gen) * 1.5).to(dtype).to(device)
    key = (torch.randn(bsz, n_kv, kv_len, hd, generator=gen) * 1.5).to(dtype).to(device)
    mask = _mask(kind, pad, q_len, kv_len, dtype, device)
    n_rows = q_len - row_start
    text = torch.zeros(bsz, n_rows, dtype=torch.bool)
    visual = torch.zeros(bsz, n_rows, dtype=torch.bool)
    for b in range(bsz):  # a different layout per sample
        first, end = 2 + 2 * b, 2 + 2 * b + n_rows // 2 + 2 * b
        visual[b, first:end] = True
        text[b, end + 3 + b :] = b != 1  # sample 1: no text rows, c must stay 0
    if kind != "none" and bsz > 2:
        text[2, : pad[2] - row_start] = True  # padded rows (no allowed key) counted as text
    return query, key, mask, row_start, text.to(device), visual.to(device)


def _reference(query, key, mask, scaling, row_start, text, visual):
    probs = scoring.head_max_probs(query, key, mask, scaling, row_start=row_start)
    return scoring.cross_self(probs, text, visual)


def _assert_close(got, want, dtype):
    # CPU interpreter: same float32 products, one rounding to bf16 as torch: tight. CUDA bf16: cuBLAS and
    # Triton sum in different orders, so a few logits round to the neighbouring bf16 value.
    on_gpu = got.is_cuda
    rtol, atol = (1e-4, 1e-7) if dtype == torch.float32 or not on_gpu else (2e-2, 1e-5)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _check(case, dtype, **kw):
    scaling = case[0].shape[-1] ** -0.5
    c, s = fused_scores.fused_cross_self(*case[:2], case[2], scaling, *case[3:], **kw)
    c_ref, s_ref = _reference(*case[:2], case[2], scaling, *case[3:])
    assert c.shape == s.shape == c_ref.shape and c.dtype == torch.float32
    assert c_ref.abs().max() > 0 and s_ref.abs().max() > 0  # the case scores something
    _assert_close(c, c_ref, dtype)
    _assert_close(s, s_ref, dtype)
    assert torch.equal(c[1], torch.zeros_like(c[1]))  # no text rows
    return c, s


# ------------------------------------------------------------------ CPU, in the interpreter subprocess


@interpreted
@pytest.mark.parametrize(
    "kind, dtype",
    [(kind, torch.float32) for kind in MASKS] + [("pad2d", torch.bfloat16), ("float4d", torch.bfloat16)],
    ids=[f"{kind}-fp32" for kind in MASKS] + ["pad2d-bf16", "float4d-bf16"],
)
def test_interpreted_matches_torch_path(interpreter, kind, dtype):
    # GQA; 16-wide tiles: 4 row and column blocks; row_start 1 puts a row block's last causal key
    # first in a new column block (the edge of causal tile skipping)
    case = _case(kind, dtype, heads=(4, 2), row_start=1)
    _check(case, dtype, block_m=16, block_n=16, splits=2)


@interpreted
@pytest.mark.parametrize("kind", ["none", "float4d"])
def test_interpreted_mha_default_tiles_and_longer_keys(interpreter, kind):
    # MHA, 64-wide tiles (as on the GPU), keys beyond the query rows (a cached prefix), one split
    case = _case(kind, torch.float32, heads=(4, 4), bsz=2, q_len=40, kv_len=77, row_start=0)
    _check(case, torch.float32, splits=1)


@interpreted
def test_interpreted_passes_with_their_own_row_tiles(interpreter):
    # pass 1 and pass 2 tile the rows differently (from LONG_ROWS rows on, 64 and 128); the last row
    # block of each is partial, and pass 2's row blocks straddle pass 1's
    case = _case("none", torch.float32, heads=(4, 2), bsz=2, q_len=150, kv_len=150, row_start=3)
    _check(case, torch.float32, block_m=128)
    _check(case, torch.float32, block_m=32, stats_block_m=16, block_n=16, splits=2)


@interpreted
def test_interpreted_dead_rows_follow_torch_softmax(interpreter):
    # a row with no allowed key has a uniform softmax in the torch path; here they are all the text rows
    query, key, mask, row_start, text, visual = _case("pad2d", torch.float32, heads=(2, 1), q_len=40, kv_len=40)
    text = torch.zeros_like(text)
    text[2, :4] = True  # sample 2 is padded by 9: its rows 5..8 see no key
    c, _ = _check((query, key, mask, row_start, text, visual), torch.float32, block_m=16, block_n=16)
    torch.testing.assert_close(c[2], torch.full_like(c[2], 1 / 40))


def _flags_case(dtype, device, heads=(4, 2), q_len=50, row_start=5):
    """A causal case as (B, Lq) slot flags: text with some invalid text slots (the kernel must AND
    them with valid), visual, and the row counts' reciprocals as the pruner's constants make them."""
    query, key, _, row_start, text, visual = _case("none", dtype, heads, q_len=q_len, kv_len=q_len,
                                                   row_start=row_start, device=device)
    bsz = query.shape[0]
    lead = torch.zeros(bsz, row_start, dtype=torch.bool, device=device)
    text, visual = torch.cat([lead, text], 1), torch.cat([lead, visual], 1)
    valid = torch.ones_like(text)
    valid[0, -3:] = False  # three of sample 0's text slots are padding slots
    rows = (text & valid)[:, row_start:], visual[:, row_start:]
    counts = [[int(r.sum()) for r in rows[0]], [int(r.sum()) for r in rows[1]]]
    inverse = DeviceConstants(0).inverse_counts(*counts, device)
    return query, key, row_start, text, valid, visual, inverse, rows


def _check_flags(dtype, device, **kw):
    query, key, row_start, text, valid, visual, inverse, rows = _flags_case(dtype, device)
    scaling = query.shape[-1] ** -0.5
    got = fused_scores.fused_cross_self_flags(query, key, None, scaling, row_start, text, valid, visual, inverse, **kw)
    want = fused_scores.fused_cross_self(query, key, None, scaling, row_start, *rows, **kw)
    assert want[0].abs().max() > 0 and want[1].abs().max() > 0
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # the same weights, bit for bit


@interpreted
def test_interpreted_flags_entry_equals_explicit_weights(interpreter):
    _check_flags(torch.float32, "cpu", block_m=16, block_n=16, splits=2)
    _check_flags(torch.bfloat16, "cpu")


def _check_lse(dtype, device, q_len=50, **kw):
    """Pass 2 on the attention's own log-sum-exp equals both passes on float32 logits (the LSE mode does
    not round q·kᵀ to the model dtype, as flash attention does not)."""
    query, key, row_start, text, valid, visual, inverse, rows = _flags_case(dtype, device, heads=(4, 4), q_len=q_len)
    scaling = query.shape[-1] ** -0.5
    _, lse = lse_attention.attend(query, key, key, scaling)
    got = fused_scores.fused_cross_self_flags(query, key, None, scaling, row_start, text, valid, visual, inverse,
                                              lse=lse, **kw)
    want = _reference(query.float(), key.float(), None, scaling, row_start, *rows)
    assert want[0].abs().max() > 0 and want[1].abs().max() > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_pass2_tiles_take_the_lse_tiles_where_there_are_enough_of_them():
    lse = (fused_scores.LSE_BLOCK_M, fused_scores.LSE_BLOCK_N, fused_scores.LSE_WARPS)
    n, warps = fused_scores.BLOCK_N, fused_scores.CROSS_SELF_WARPS
    programs = 4 * 132  # an H100's or H200's multiprocessors
    # first pruning layers of the 7B geometries (batch, scored rows, keys): batch 8 everywhere, NeXT at batch 1
    for bsz, rows, keys in ((8, 2968, 3003), (8, 616, 651), (8, 1009, 1045), (1, 2968, 3003)):
        assert fused_scores.pass2_tiles(bsz, rows, keys, True, programs) == lse
    # LLaVA-1.5 and Qwen2-VL at batch 1: 30 and 72 LSE tiles for 132 multiprocessors
    assert fused_scores.pass2_tiles(1, 616, 651, True, programs) == (64, n, warps)
    assert fused_scores.pass2_tiles(1, 1009, 1045, True, programs) == (64, n, warps)
    # two passes keep their tiles at any size; given tiles are kept, with the mode's warps
    assert fused_scores.pass2_tiles(8, 2968, 3003, False, programs) == (128, n, warps)
    assert fused_scores.pass2_tiles(1, 616, 651, True, programs, 128, 128) == lse
    assert fused_scores.pass2_tiles(8, 2968, 3003, True, programs, 64, 64) == (64, 64, fused_scores.LSE_WARPS)
    assert fused_scores.pass2_tiles(8, 616, 651, False, programs, block_m=32) == (32, n, warps)


@interpreted
def test_interpreted_lse_entry_matches_float32_reference(interpreter):
    _check_lse(torch.float32, "cpu", block_m=16, block_n=16, splits=2)
    _check_lse(torch.float32, "cpu", q_len=150)  # default LSE tiles: 128 × 128, partial last row and key blocks


# tiny models with 4 query heads: LLaVA with 4 or 2 key/value heads, Qwen2-VL (GQA, M-RoPE) with 2
LSE_MODELS = {"llava-mha": (lambda: tiny_llava(num_kv_heads=4), "llava"), "llava-gqa": (tiny_llava, "llava"),
              "qwen2_vl-gqa": (FACTORIES["qwen2_vl"], "qwen2_vl")}


@interpreted
@pytest.mark.parametrize("name", list(LSE_MODELS))
def test_interpreted_pruner_takes_the_attention_lse(interpreter, monkeypatch, name):
    """An MHA or GQA model, one sample (plain causal): both pruning layers get the LSE from their
    attention; the output is the stock attention's, so the logits are bit for bit those with the LSE
    turned off."""
    factory, family = LSE_MODELS[name]
    model, make_inputs = factory()
    monkeypatch.setattr(fused_scores, "supported", lambda where: True)
    with_lse, without = _with_and_without_lse(model, make_inputs([(5, IMAGES[family][0], 7)]), monkeypatch,
                                              _lse_recipe(family))
    assert any(any(layer) for sample in with_lse for layer in sample)


def _lse_recipe(family: str) -> Recipe:
    return dataclasses.replace(LSE_RECIPE, family=family)


def _with_and_without_lse(model, batch, monkeypatch, recipe=LSE_RECIPE):
    """The drops with the attention's LSE (both pruning layers must take it) and with it turned off;
    the logits must be bit for bit the same (the pruning layers' outputs are stock SDPA's)."""
    calls, original = [], lse_attention.attend
    monkeypatch.setattr(lse_attention, "attend", lambda *a: calls.append(1) or original(*a))
    with_lse, with_lse_logits = _dropped(model, batch, recipe)
    assert len(calls) == 2
    monkeypatch.setattr(lse_attention, "applies", lambda *a, **k: False)
    without, without_logits = _dropped(model, batch, recipe)
    assert len(calls) == 2 and with_lse == without
    assert torch.equal(with_lse_logits, without_logits)
    return with_lse, without


@needs_triton
def test_flags_entry_checks_its_counts():
    q = torch.zeros(1, 2, 8, 16)
    flags = torch.zeros(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"inverse_counts must be \(B, 2\)"):
        fused_scores.fused_cross_self_flags(q, q, None, 0.25, 0, flags, flags, flags, torch.ones(2))
    with pytest.raises(ValueError, match="valid must have the shape of text"):
        fused_scores.fused_cross_self_flags(q, q, None, 0.25, 0, flags, flags[:, :4], flags, torch.ones(1, 2))


def test_available_needs_cuda_and_respects_env(monkeypatch):
    assert not fused_scores.available(torch.zeros(1))
    if torch.cuda.is_available() and HAS_TRITON:
        x = torch.zeros(1, device="cuda")
        assert fused_scores.available(x)
        monkeypatch.setenv(fused_scores.ENV_VAR, "0")
        assert not fused_scores.available(x)


@needs_triton
def test_bad_shapes_say_what_to_do():
    q = torch.zeros(1, 3, 8, 16)
    k = torch.zeros(1, 2, 8, 16)  # 3 heads over 2 kv heads
    rows = torch.zeros(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        fused_scores.fused_cross_self(q, k, None, 0.25, 0, rows, rows)
    with pytest.raises(ValueError, match=fused_scores.ENV_VAR):
        fused_scores.fused_cross_self(q, q, torch.zeros(1, 1, 8, 5), 0.25, 0, rows, rows)


def _dropped(model, batch, recipe):
    with fitprune.apply(model, recipe) as m, torch.no_grad():
        logits = m(**batch).logits
        return fitprune.last_report(m).dropped, logits


@interpreted
@pytest.mark.parametrize("padded", [True, False], ids=["padded-4d-mask", "no-mask"])
def test_interpreted_pruner_fused_path_drops_the_same_tokens(interpreter, monkeypatch, padded):
    model, make_inputs = FACTORIES["llava"]()
    a, b = IMAGES["llava"]
    specs = [(5, a, 7), (3, b, 4), (4, None, 6)] if padded else [(5, a, 7)]
    batch = make_inputs(specs)
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family="llava")
    want, want_logits = _dropped(model, batch, recipe)

    calls = []  # (entry point, mask) of each call
    originals = {name: getattr(fused_scores, name) for name in ("fused_cross_self", "fused_cross_self_flags")}

    def spy(name):
        def call(query, key, mask, *args, **kwargs):
            calls.append((name, mask))
            return originals[name](query, key, mask, *args, **kwargs)
        return call

    monkeypatch.setattr(fused_scores, "supported", lambda where: True)  # the kernel runs on the CPU here
    for name in originals:
        monkeypatch.setattr(fused_scores, name, spy(name))
    got, got_logits = _dropped(model, batch, recipe)
    if padded:  # a sample without an image: its rows are counted on the device (fused_cross_self only)
        assert [(n, m is None) for n, m in calls] == [("fused_cross_self", False)] * 2  # a 4D mask
    else:  # plain causal (SDPA's is_causal): the flags and host counts go to the kernel as they are
        assert [(n, m is None) for n, m in calls] == [("fused_cross_self_flags", True)] * 2
    assert got == want and any(any(layer) for sample in got for layer in sample)
    torch.testing.assert_close(got_logits, want_logits)


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(8, 2), (8, 8)], ids=["gqa", "mha"])
def test_cuda_matches_torch_path(monkeypatch, kind, dtype, heads):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = _case(kind, dtype, heads, q_len=333, kv_len=333, row_start=37, hd=128, device="cuda")
    _check(case, dtype)
    _check(case, dtype, block_m=16, block_n=32, splits=5)
    _check(case, dtype, block_m=128, stats_block_m=64)  # LONG_ROWS' pass-2 tiles
    _check(case, dtype, block_m=64, stats_block_m=128)


@pytest.mark.gpu
@needs_triton
def test_cuda_flags_entry_equals_explicit_weights(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check_flags(torch.bfloat16, "cuda")
    _check_flags(torch.float32, "cuda", block_m=16, block_n=32, splits=5)


@pytest.mark.gpu
@needs_triton
def test_cuda_lse_entry_matches_float32_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check_lse(torch.bfloat16, "cuda")
    _check_lse(torch.bfloat16, "cuda", q_len=333)  # too few LSE tiles for the GPU: the two-pass ones (pass2_tiles)
    _check_lse(torch.bfloat16, "cuda", q_len=333, block_m=128, block_n=128)  # LSE tiles, 16 warps, partial
    _check_lse(torch.bfloat16, "cuda", q_len=333, block_m=64, block_n=64)  # two-pass tiles under 16 warps
    assert fused_scores.pass2_rows(2100 - 5) == 128  # from LONG_ROWS on, two passes take 128-row tiles
    _check_lse(torch.bfloat16, "cuda", q_len=2100)  # 3 × 17 × 17 LSE tiles: the default takes them


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("name", list(LSE_MODELS))
def test_cuda_pruner_with_attention_lse_keeps_stock_outputs(monkeypatch, name):
    """bf16 on the GPU (SDPA's own backend: cuDNN for MHA on the H200, flash for grouped keys): the
    pruning layers' outputs are stock SDPA's, so with the same drops the logits are bit for bit those
    without the LSE; the drops agree with the torch path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    factory, family = LSE_MODELS[name]
    model, make_inputs = factory()
    model = model.to("cuda", torch.bfloat16)
    batch = {k: v.cuda() for k, v in make_inputs([(5, IMAGES[family][0], 7)] * 3).items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with_lse, _ = _with_and_without_lse(model, batch, monkeypatch, _lse_recipe(family))
    monkeypatch.setenv(fused_scores.ENV_VAR, "0")
    torch_path, _ = _dropped(model, batch, _lse_recipe(family))
    assert torch_path == with_lse


@pytest.mark.gpu
@needs_triton
def test_cuda_pruner_fused_and_torch_paths_agree(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, make_inputs = FACTORIES["llava"]()
    model = model.cuda()
    a, b = IMAGES["llava"]
    batch = {k: v.cuda() for k, v in make_inputs([(5, a, 7), (3, b, 4), (4, None, 6)]).items()}
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family="llava")
    fused, fused_logits = _dropped(model, batch, recipe)
    monkeypatch.setenv(fused_scores.ENV_VAR, "0")
    torch_path, torch_logits = _dropped(model, batch, recipe)
    assert fused == torch_path
    torch.testing.assert_close(fused_logits, torch_logits)
