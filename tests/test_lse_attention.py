"""fitprune.lse_attention: a pruning layer's causal attention with its log-sum-exp is stock SDPA's output,
bit for bit, and it declines every call where it could not promise that."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import IMAGES, tiny_llava

import fitprune
from fitprune import Recipe, lse_attention


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1


def _qkv(bsz=2, heads=4, length=12, hd=16, kv_heads=None, kv_len=None, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(bsz, heads, length, hd, generator=gen).to(device, dtype)
    k, v = (torch.randn(bsz, kv_heads or heads, kv_len or length, hd, generator=gen).to(device, dtype) for _ in "kv")
    return q, k, v


def _check_equals_stock(device, dtype, **shape):
    q, k, v = _qkv(device=device, dtype=dtype, **shape)
    assert lse_attention.applies(_Attn(), q, k, v, None, 0.25, {"dropout": 0.0, "scaling": 0.25})
    out, lse = lse_attention.attend(q, k, v, 0.25)
    stock = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    assert torch.equal(out, stock.transpose(1, 2).contiguous()) and out.is_contiguous()
    logits = (q.float() @ k.float().transpose(-1, -2)) * 0.25
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=device).tril()
    want = torch.logsumexp(logits.masked_fill(~causal, float("-inf")), -1)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    print(f"{device} {dtype} {tuple(q.shape)}: SDPA backend {lse_attention.backend(q, k, v, 0.25)}")
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_output_is_stock_sdpa_and_lse_is_the_row_logsumexp():
    _check_equals_stock("cpu", torch.float32)


def test_declines_calls_it_cannot_reproduce():
    q, k, v = _qkv()
    attn, ok = _Attn(), {"dropout": 0.0}
    assert lse_attention.applies(attn, q, k, v, None, 0.25, ok)
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    assert not lse_attention.applies(attn, q, k, v, mask, 0.25, ok)  # a padding mask: not plain causal
    assert not lse_attention.applies(attn, q, k, v, None, 0.25, {"dropout": 0.1})
    assert not lse_attention.applies(attn, q, k, v, None, 0.25, {"softcap": 30.0})
    assert not lse_attention.applies(attn, *_qkv(kv_heads=2), None, 0.25, ok)  # GQA
    assert not lse_attention.applies(attn, *_qkv(kv_len=15), None, 0.25, ok)  # a cached prefix
    assert not lse_attention.applies(attn, *_qkv(length=1), None, 0.25, ok)  # a decode step
    assert not lse_attention.applies(attn, *_qkv(hd=12), None, 0.25, ok)  # SDPA would pad the head dim
    gqa = _Attn()
    gqa.num_key_value_groups = 2
    assert not lse_attention.applies(gqa, q, k, v, None, 0.25, ok)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # the user's backend choice wins
        assert not lse_attention.applies(attn, q, k, v, None, 0.25, ok)


def test_the_pruner_asks_only_where_the_fused_kernel_scores(monkeypatch):
    """Without the fused kernel (CPU, no Triton path chosen) no layer asks for the LSE: the stock
    function runs and the pruned forward is unchanged."""
    model, make_inputs = tiny_llava(num_kv_heads=4)
    batch = make_inputs([(5, IMAGES["llava"][0], 7)])
    calls = []
    original = lse_attention.attend

    def spy(*args):
        calls.append(1)
        return original(*args)

    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family="llava")
    monkeypatch.setattr(lse_attention, "attend", spy)
    with fitprune.apply(model, recipe, fused_scores=False) as m, torch.no_grad():
        m(**batch)
    assert calls == []


@pytest.mark.gpu
def test_cuda_output_is_stock_sdpa_and_lse_is_the_row_logsumexp():
    for shape in ({}, {"bsz": 8, "heads": 32, "length": 651, "hd": 128}):
        _check_equals_stock("cuda", torch.bfloat16, **shape)
        _check_equals_stock("cuda", torch.float16, **shape)


@pytest.mark.gpu
def test_cuda_graphs_static_cache_and_statistics_with_the_lse(monkeypatch):
    """The LSE route under the engine's other paths, on a bf16 MHA model: a CUDA-graph replay of the
    pruned prefill drops what eager drops; generate into a static cache (compiled decode) gives the
    dynamic cache's tokens; statistics collection (every layer scored, a probe) takes the LSE and
    agrees with the run without it."""
    pytest.importorskip("triton")
    from fitprune.stats import collect_stats

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, make_inputs = tiny_llava(num_kv_heads=4)
    model = model.to("cuda", torch.bfloat16)
    a = IMAGES["llava"][0]
    batch = {k: v.cuda() for k, v in make_inputs([(4, a, 5, 0), (4, a, 5, 1)]).items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family="llava")
    calls, original = [], lse_attention.attend
    monkeypatch.setattr(lse_attention, "attend", lambda *args: calls.append(1) or original(*args))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with fitprune.apply(model, recipe) as m:
            eager = m(**batch).logits
            eager_dropped = fitprune.last_report(m).dropped
            dynamic = m.generate(**batch, **kw)
            static = m.generate(**batch, **kw, cache_implementation="static")
        assert len(calls) >= 6  # every pruned prefill scored with the LSE (2 pruning layers each)
        assert torch.equal(static, dynamic)
        with fitprune.apply(model, recipe) as m, fitprune.graph_prefill(m):
            for _ in range(2):  # capture, then replay
                graphed = m(**batch).logits
                assert fitprune.last_report(m).dropped == eager_dropped
            assert fitprune.prefill_graphs(m).replays >= 1
        torch.testing.assert_close(graphed, eager, rtol=1e-2, atol=2e-2)
    n = len(calls)
    with_lse = collect_stats(model, [batch])
    assert len(calls) == n + 4  # all 4 layers scored
    monkeypatch.setattr(lse_attention, "applies", lambda *args, **kwargs: False)
    without = collect_stats(model, [batch])
    assert len(calls) == n + 4
    for name in ("cross", "self_"):
        got, want = getattr(with_lse, name), getattr(without, name)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=3e-2, atol=1e-3)
