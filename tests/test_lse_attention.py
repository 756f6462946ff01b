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
    """attend() gives transformers' own SDPA attention output, bit for bit, and the row log-sum-exp."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(device=device, dtype=dtype, **shape)
    attn = _Attn()
    attn.num_key_value_groups = q.shape[1] // k.shape[1]
    assert lse_attention.applies(attn, q, k, v, None, 0.25, {"dropout": 0.0, "scaling": 0.25})
    out, lse = lse_attention.attend(q, k, v, 0.25)
    stock, _ = sdpa_attention_forward(attn, q, k, v, None, dropout=0.0, scaling=0.25)
    assert torch.equal(out, stock) and out.is_contiguous()
    groups = attn.num_key_value_groups
    k = k.repeat_interleave(groups, 1)  # each query head's key head, for the reference
    logits = (q.float() @ k.float().transpose(-1, -2)) * 0.25
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=device).tril()
    want = torch.logsumexp(logits.masked_fill(~causal, float("-inf")), -1)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    print(f"{device} {dtype} {tuple(q.shape)}, {groups} query heads per key head: SDPA backend "
          f"{lse_attention.backend(q, k[:, ::groups], v, 0.25)}")
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_output_is_stock_sdpa_and_lse_is_the_row_logsumexp():
    _check_equals_stock("cpu", torch.float32)
    _check_equals_stock("cpu", torch.float32, heads=8, kv_heads=2)  # grouped keys, as Qwen2-VL's 28 / 4


def test_grouped_keys_apply_only_where_stock_passes_them_grouped(monkeypatch):
    """GQA takes the LSE route only where transformers itself would hand SDPA the grouped keys
    (``use_gqa_in_sdpa``); where it repeats them first, or its rule cannot be found, it declines."""
    q, k, v = _qkv(heads=8, kv_heads=2)
    gqa = _Attn()
    gqa.num_key_value_groups = 4
    assert lse_attention.applies(gqa, q, k, v, None, 0.25, {})
    monkeypatch.setattr(lse_attention, "_stock_passes_grouped", lambda mask, key, value: False)
    assert not lse_attention.applies(gqa, q, k, v, None, 0.25, {})
    monkeypatch.undo()
    monkeypatch.setattr(lse_attention, "_stock_gqa_rule", lambda: None)
    assert not lse_attention.applies(gqa, q, k, v, None, 0.25, {})


def test_declines_calls_it_cannot_reproduce():
    q, k, v = _qkv()
    attn, ok = _Attn(), {"dropout": 0.0}
    assert lse_attention.applies(attn, q, k, v, None, 0.25, ok)
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    assert not lse_attention.applies(attn, q, k, v, mask, 0.25, ok)  # a padding mask: not plain causal
    assert not lse_attention.applies(attn, q, k, v, None, 0.25, {"dropout": 0.1})
    assert not lse_attention.applies(attn, q, k, v, None, 0.25, {"softcap": 30.0})
    assert not lse_attention.applies(attn, *_qkv(kv_heads=2), None, 0.25, ok)  # key heads the module does not group
    assert not lse_attention.applies(attn, *_qkv(kv_len=15), None, 0.25, ok)  # a cached prefix
    assert not lse_attention.applies(attn, *_qkv(length=1), None, 0.25, ok)  # a decode step
    assert not lse_attention.applies(attn, *_qkv(hd=12), None, 0.25, ok)  # SDPA would pad the head dim
    gqa = _Attn()
    gqa.num_key_value_groups = 2
    assert not lse_attention.applies(gqa, q, k, v, None, 0.25, ok)  # groups that do not match the heads
    assert not lse_attention.applies(gqa, *_qkv(heads=4, kv_heads=2), mask, 0.25, ok)  # GQA under a mask
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
    for shape in ({}, {"bsz": 8, "heads": 32, "length": 651, "hd": 128},
                  {"bsz": 8, "heads": 28, "kv_heads": 4, "length": 1045, "hd": 128}):  # Qwen2-VL's grouped keys
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
