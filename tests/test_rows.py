"""fitprune.rows: row gathers and scatters in wide words copy the rows' bits exactly: torch.gather's and
scatter's values, NaN included (a NaN keeps its stored bits, where torch's bf16 gather on the CPU
canonicalises them)."""

from __future__ import annotations

import pytest
import torch

from fitprune import rows


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _sel(bsz: int, length: int, kept: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=gen)[:kept] for _ in range(bsz)])


@pytest.mark.parametrize("dtype, dim, word", [
    (torch.bfloat16, 64, torch.int64),   # 128-byte rows: 8-byte words
    (torch.float16, 6, torch.int32),     # 12-byte rows: 4-byte words
    (torch.float32, 3, torch.int32),     # 12-byte rows of 4-byte values: nothing wider divides them
    (torch.bfloat16, 3, torch.int16),    # 6-byte rows: no word wider than a value divides them
    (torch.float32, 2, torch.int64),
])
def test_take_rows_is_torch_gather_bit_for_bit(dtype, dim, word):
    x = torch.randn(3, 11, dim).to(dtype)
    x[0, 2, 0] = float("nan")
    x[1, 4, -1] = -0.0
    sel = _sel(3, 11, 7)
    assert rows.wide_view(x).dtype == word
    got = rows.take_rows(x, sel)
    index = sel[..., None].expand(-1, -1, dim)
    assert got.dtype == dtype and got.shape == (3, 7, dim)
    _same(got, torch.gather(x, 1, index))
    as_stored = torch.gather(x.view(torch.uint8).view(3, 11, dim, -1), 1, index[..., None].expand(
        -1, -1, -1, x.element_size()))
    assert torch.equal(_bits(got), as_stored.reshape(3, 7, -1))


def test_take_rows_of_views_widens_only_as_far_as_offsets_and_strides_allow():
    base = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    sel = _sel(2, 9, 5, seed=1)
    for x, word in ((base[..., 1:9], torch.int16),     # an offset of one value (2 bytes)
                    (base[..., ::2], torch.int16),     # last-dim stride 2: one value per word
                    (base[..., 4:8], torch.int64),     # offset 8 bytes, rows of 8 bytes, 32 bytes apart
                    (base[:, :, :12], torch.int64)):   # rows of 24 bytes, 32 bytes apart
        assert rows.wide_view(x).dtype == word
        got = rows.take_rows(x, sel)
        _same(got, torch.gather(x, 1, sel[..., None].expand(-1, -1, x.shape[-1])))
    assert rows.wide_view(torch.zeros(2, 3, dtype=torch.complex128)).dtype == torch.complex128  # no such integer


@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 64), (torch.float32, 3), (torch.float16, 6)])
def test_put_rows_is_a_scatter_into_zeros(dtype, dim):
    src = torch.randn(2, 5, dim).to(dtype)
    idx = _sel(2, 9, 5, seed=2)
    got = rows.put_rows(src, idx, 9)
    want = torch.zeros(2, 9, dim, dtype=dtype).scatter(1, idx[..., None].expand(-1, -1, dim), src)
    assert got.dtype == dtype
    _same(got, want)
    untouched = torch.ones(2, 9, dtype=torch.bool).scatter(1, idx, False)
    assert not got[untouched].any()


def test_bad_shapes_say_what_was_received():
    x = torch.zeros(2, 4, 8)
    expected = r"take_rows: x \(B, L, D\) and sel \(B, Lc\) expected; got \(2, 4, 8\) and \(3, 2\)"
    with pytest.raises(ValueError, match=expected):
        rows.take_rows(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"put_rows: .* got \(2, 4, 8\) and \(2, 3\)"):
        rows.put_rows(x, torch.zeros(2, 3, dtype=torch.long), 6)


def test_gradients_flow_through_gathers_and_scatters_where_autograd_records():
    sel = _sel(2, 9, 5, seed=3)
    index = sel[..., None].expand(-1, -1, 16)
    x = torch.randn(2, 9, 16, requires_grad=True)
    weights = torch.randn(2, 5, 16)
    (rows.take_rows(x, sel) * weights).sum().backward()
    want = torch.zeros(2, 9, 16).scatter(1, index, weights)  # d/dx of the gathered rows' weighted sum
    assert torch.equal(x.grad, want)
    src = torch.randn(2, 5, 16, requires_grad=True)
    full = rows.put_rows(src, sel, 9)
    assert torch.equal(full.detach(), torch.zeros(2, 9, 16).scatter(1, index, src.detach()))
    (full * torch.arange(9.0)[None, :, None]).sum().backward()
    assert torch.equal(src.grad, sel[..., None].float().expand(-1, -1, 16))  # each row's weight: its slot
    with torch.no_grad():  # nothing recorded: the integer words again, the same values
        assert not rows.records_grad(x)
        assert torch.equal(rows.take_rows(x, sel), torch.gather(x, 1, index))
    from fitprune.reslice import gather_seq

    table = torch.randn(1, 9, 16, requires_grad=True)
    gather_seq(table, sel).sum().backward()
    assert torch.equal(table.grad[0], torch.zeros(9, 16).index_add(0, sel.flatten(), torch.ones(10, 16)))
