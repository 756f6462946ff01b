"""The re-slicing functions (fitprune.reslice) on their own: small hand-made masks, checked entry by entry
against a direct construction from the definition, and never changing their inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from fitprune.reslice import (decode_mask, gather_seq, gather_tables, layer_kwargs, mask_fill, prefill_mask,
                              stack_tables)
from fitprune.rows import wide_view

NEG = torch.finfo(torch.float32).min


def _compressed():
    """Two samples of length 6; sample 0 keeps positions 0 1 3 5, sample 1 keeps 2 4 5 and one
    invalid left-pad slot (index 0, pointing at position 0)."""
    idx = torch.tensor([[0, 1, 3, 5], [0, 2, 4, 5]])
    valid = torch.tensor([[True, True, True, True], [False, True, True, True]])
    return idx, valid


def _causal_bool(bsz: int, length: int) -> torch.Tensor:
    m = torch.tril(torch.ones(length, length, dtype=torch.bool))
    return m[None, None].expand(bsz, 1, length, length).clone()


def _expected_prefill(allowed_full, idx, valid):
    """(B, 1, Lc, Lc) bool from the definition: slot i may see slot j iff j is valid and the full mask
    allowed position idx[i] to see idx[j]; an invalid slot sees at most itself (as the full mask allows)."""
    bsz, lc = idx.shape
    out = torch.zeros(bsz, 1, lc, lc, dtype=torch.bool)
    for b, i, j in itertools.product(range(bsz), range(lc), range(lc)):
        if valid[b, i]:
            out[b, 0, i, j] = bool(valid[b, j]) and bool(allowed_full[b, idx[b, i], idx[b, j]])
        else:
            out[b, 0, i, j] = i == j and bool(allowed_full[b, idx[b, i], idx[b, i]])
    return out


def test_gather_seq_picks_positions_per_sample_and_broadcasts_the_batch():
    idx, _ = _compressed()
    t = torch.arange(6.0)[None, :, None].expand(1, 6, 3) * torch.tensor([1.0, 10.0, 100.0])  # (1, L, D)
    out = gather_seq(t, idx)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[..., 0], idx.float()) and torch.equal(out[..., 2], 100 * idx.float())
    lead = torch.stack([t, -t])  # (2, 1, L, D): a leading dim (M-RoPE's 3 sections have one)
    out = gather_seq(lead, idx)
    assert out.shape == (2, 2, 4, 3) and torch.equal(out[1], -gather_seq(t, idx))


@pytest.mark.parametrize("dtype, word", [(torch.bfloat16, torch.int16), (torch.float32, torch.int32)])
def test_gather_seq_moves_rows_as_stored_in_wide_words(dtype, word):
    idx, _ = _compressed()
    t = torch.randn(3, 1, 6, 8, generator=torch.Generator().manual_seed(1)).to(dtype)  # (lead, 1, L, D)
    t.view(word)[0, 0, idx[0, 1], 3] = -1  # a NaN with a payload: bits, not values, must move
    expanded = t.expand(3, 2, 6, 8)  # the batch broadcast, stride 0
    assert wide_view(expanded).dtype == torch.int64  # 16 or 32 bytes a row: 8-byte words
    out = gather_seq(t, idx)
    want = torch.gather(expanded, -2, idx[None, :, :, None].expand(3, 2, 4, 8))
    assert out.dtype == dtype and out.shape == (3, 2, 4, 8)
    assert torch.equal(out.view(word), want.view(word))


def test_rope_tables_gathered_once_equal_one_gather_each():
    idx, _ = _compressed()
    gen = torch.Generator().manual_seed(0)
    for lead in ((), (3,)):  # LLaMA's (1, L, D) tables, and Qwen2-VL's multimodal (3, 1, L, D)
        cos, sin = (torch.randn(*lead, 1, 6, 8, generator=gen) for _ in range(2))
        stacked = stack_tables((cos, sin))
        assert stacked is not None and stacked.shape == (2, *cos.shape)
        got = gather_tables((cos, sin), stacked, idx)
        want = (gather_seq(cos, idx), gather_seq(sin, idx))
        assert all(torch.equal(g, w) and g.is_contiguous() for g, w in zip(got, want))
        assert got[0].shape == (*lead, 2, 4, 8)
    # tables that differ in dtype or shape are not stacked; each is gathered alone
    for pair in ((cos, sin.double()), (cos, sin[..., :4])):
        assert stack_tables(pair) is None
        assert all(torch.equal(g, gather_seq(t, idx)) for g, t in zip(gather_tables(pair, None, idx), pair))


def test_layer_kwargs_reslice_once_per_version_and_drop_position_ids():
    idx, valid = _compressed()
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    mask = _causal_bool(2, 6)
    kwargs = {"attention_mask": mask, "position_embeddings": (cos, sin), "position_ids": torch.arange(6)[None],
              "hidden_states": "unchanged"}
    cache: dict = {}
    first = layer_kwargs(kwargs, cache, 1, idx, valid, False)
    assert first["position_ids"] is None and first["hidden_states"] == "unchanged"
    assert kwargs["position_ids"] is not None  # the caller's kwargs are not changed
    assert torch.equal(first["attention_mask"], prefill_mask(mask, idx, valid, False))
    assert all(torch.equal(g, gather_seq(t, idx)) for g, t in zip(first["position_embeddings"], (cos, sin)))
    again = layer_kwargs(kwargs, cache, 1, idx, valid, False)  # a later layer of the same version shares them
    assert again["attention_mask"] is first["attention_mask"]
    assert again["position_embeddings"] is first["position_embeddings"]
    stacked = cache[(id(kwargs["position_embeddings"]), "stacked")]
    layer_kwargs(kwargs, cache, 2, idx[:, 1:], valid[:, 1:], True)  # the next version reuses the stacked tables
    assert cache[(id(kwargs["position_embeddings"]), "stacked")] is stacked


def test_mask_fill_keeps_the_mask_type():
    allowed = torch.tensor([True, False, True])
    assert torch.equal(mask_fill(torch.tensor([True, True, False]), allowed), torch.tensor([True, False, False]))
    filled = mask_fill(torch.tensor([0.0, -1.0, 2.0]), allowed)
    assert filled.tolist() == [0.0, NEG, 2.0]


def test_prefill_mask_without_a_mask():
    idx, valid = _compressed()
    assert prefill_mask(None, idx, torch.ones_like(valid), True) is None  # still plain causal: is_causal stays
    got = prefill_mask(None, idx, valid, False)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None].expand(2, 6, 6)
    assert got.dtype == torch.bool and torch.equal(got, _expected_prefill(causal, idx, valid))


def test_prefill_mask_of_a_4d_bool_and_float_mask():
    idx, valid = _compressed()
    full = _causal_bool(2, 6)
    full[1, 0, :, 0] = False  # sample 1: position 0 is padding
    before = full.clone()
    got = prefill_mask(full, idx, valid, False)
    assert torch.equal(full, before)  # pure: the input is untouched
    assert torch.equal(got, _expected_prefill(full[:, 0], idx, valid))
    additive = torch.where(full, 0.0, NEG)
    got_f = prefill_mask(additive, idx, valid, False)
    assert got_f.dtype == torch.float32 and torch.equal(got_f == 0.0, _expected_prefill(full[:, 0], idx, valid))
    assert torch.all((got_f == 0.0) | (got_f == NEG))
    shared = prefill_mask(full[:1], idx, valid, False)  # a (1, 1, L, L) mask serves every sample
    assert torch.equal(shared, _expected_prefill(full[:1].expand(2, -1, -1, -1)[:, 0], idx, valid))


def test_prefill_mask_of_a_2d_padding_mask():
    idx, valid = _compressed()
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    got = prefill_mask(pad, idx, valid, False)
    assert torch.equal(got, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))


def test_decode_mask_against_the_shortened_cache():
    idx, valid = _compressed()
    input_len, q_len, n_new = 6, 1, 3
    kv_len = input_len + n_new
    assert decode_mask(None, idx, torch.ones_like(valid), True, input_len, q_len, kv_len) is None
    got = decode_mask(None, idx, valid, False, input_len, q_len, kv_len)
    assert got.shape == (2, 1, q_len, 4 + n_new)
    assert torch.equal(got[:, 0, 0, :4], valid) and got[:, 0, 0, 4:].all()  # the new tokens: all seen
    two = decode_mask(None, idx, valid, False, input_len, 2, kv_len)  # two query rows: causal among new
    assert two[:, 0, :, 4:].tolist() == [[[True, True, False], [True, True, True]]] * 2

    full = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool)
    full[1, 0, 0, 0] = False  # padding
    full[0, 0, 0, 7] = False  # some new column masked
    before = (full.clone(), idx.clone(), valid.clone())
    got = decode_mask(full, idx, valid, False, input_len, q_len, kv_len)
    assert all(torch.equal(a, b) for a, b in zip(before, (full, idx, valid)))  # pure
    want_old = torch.stack([full[b, 0, 0, idx[b]] & valid[b] for b in range(2)])
    assert torch.equal(got[:, 0, 0, :4], want_old) and torch.equal(got[..., 4:], full[..., input_len:])
    additive = torch.where(full, 0.0, NEG)
    got_f = decode_mask(additive, idx, valid, False, input_len, q_len, kv_len)
    assert torch.equal(got_f == 0.0, got)

    pad = torch.ones(2, kv_len, dtype=torch.long)
    pad[1, 0] = 0
    got2 = decode_mask(pad, idx, valid, False, input_len, q_len, kv_len)
    assert got2.shape == (2, 4 + n_new) and torch.equal(got2[:, :4], want_old.long()) and got2[:, 4:].all()
