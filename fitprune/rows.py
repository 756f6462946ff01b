"""Row gathers of the hidden states: the survivors' rows of a (B, L, D) tensor, moved in wide words.

A pruning layer gathers the survivors' rows of the hidden states: once, at the input of the norm before
the MLP (:func:`fitprune.mlp_rows.norm_before_mlp`), or else at the MLP's input and the layer's output.
``torch.gather`` with the slot index broadcast over the hidden size moves one element per
thread, and for bf16 that is 2 bytes: on the H100 it ran at about a third of the memory bandwidth
(`scripts/profile_prefill.py`, LLaVA-NeXT batch 8: 0.23 ms per gather of about 130 MB).

:func:`take_rows` moves the same bytes as 8-byte words: a row of D bf16 values is D / 4 int64 words, and
a gather of integers copies bits, so the result has ``torch.gather``'s values, each as stored. Where a
row's bytes do not divide into wider words, or the tensor is not contiguous in its last dimension, it
moves integers of one value's size. :func:`put_rows`, the scatter back to full length (the generic MLP
path, the final norm), moves words the same way. Integers carry no gradient, so where autograd records
(grad enabled and the input requires grad) both use ``torch.gather`` / ``scatter`` on the values
themselves (:func:`records_grad`).
"""

from __future__ import annotations

import torch

__all__ = ["gather_rows", "put_rows", "records_grad", "take_rows", "wide_view"]

_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)  # widest first


def wide_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., D) viewed, without a copy, as integer words: the widest (8, 4 or 2 bytes) that divides
    a row, its offset and its strides where the last dimension is contiguous, else words of one value's
    size. Copying integers copies bits, so a gather of the view moves every value as stored (NaN
    payloads too). ``x`` itself where it has no integer word of its size (complex128)."""
    size = x.element_size()
    if x.dim() > 0 and x.stride(-1) == 1:
        row_bytes = x.shape[-1] * size
        for word in _WORDS:
            if word.itemsize <= size:
                break
            if row_bytes % word.itemsize == 0 and (x.storage_offset() * size) % word.itemsize == 0 and all(
                    (s * size) % word.itemsize == 0 for s in x.stride()[:-1]):
                return x.view(word)
    same = next((w for w in _WORDS if w.itemsize == size), None)
    return x if same is None or x.dim() == 0 else x.view(same)


def records_grad(x: torch.Tensor) -> bool:
    """True where autograd records an operation on ``x``: a copy through integer words would cut it off."""
    return x.requires_grad and torch.is_grad_enabled()


def take_rows(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """The rows ``sel`` (B, Lc) of ``x`` (B, L, D): (B, Lc, D), the values of
    ``torch.gather(x, 1, sel[..., None].expand(-1, -1, D))``, moved as stored in the widest words a row
    allows (:func:`wide_view`)."""
    if x.dim() != 3 or sel.dim() != 2 or sel.shape[0] != x.shape[0]:
        raise ValueError(f"take_rows: x (B, L, D) and sel (B, Lc) expected; got {tuple(x.shape)} and "
                         f"{tuple(sel.shape)}")
    return gather_rows(x, sel)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` (..., Lc) along dim -2 of ``x`` (..., L, D), the leading dims alike: (..., Lc, D),
    moved as stored in the widest words a row allows (:func:`wide_view`), or as values where autograd
    records (:func:`records_grad`). :func:`take_rows` checks its shapes and calls this."""
    if records_grad(x):  # neither integer words nor Tensor.view(dtype) carry a gradient
        return torch.gather(x, -2, index[..., None].expand(*index.shape, x.shape[-1]))
    wide = wide_view(x)
    return torch.gather(wide, -2, index[..., None].expand(*index.shape, wide.shape[-1])).view(x.dtype)


def put_rows(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros of (B, ``length``, D) with the rows of ``src`` (B, Lc, D) at ``idx`` (B, Lc): the values of
    ``zeros.scatter(1, idx[..., None].expand(-1, -1, D), src)``, moved as stored in the widest words a
    row allows.
    ``idx`` must be distinct within each sample (a scatter of duplicates keeps an arbitrary one)."""
    if src.dim() != 3 or idx.shape != src.shape[:2]:
        raise ValueError(f"put_rows: src (B, Lc, D) and idx (B, Lc) expected; got {tuple(src.shape)} and "
                         f"{tuple(idx.shape)}")
    full = src.new_zeros(src.shape[0], length, src.shape[-1])
    if records_grad(src):
        return full.scatter(1, idx[..., None].expand(-1, -1, src.shape[-1]), src)
    wide_src, wide_full = wide_view(src.contiguous()), wide_view(full)  # same words: both contiguous
    wide_full.scatter_(1, idx[..., None].expand(-1, -1, wide_full.shape[-1]), wide_src)
    return full
