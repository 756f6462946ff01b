"""Re-slicing what a decoder layer receives to the tokens still alive (pure functions, DESIGN §3).

After a pruning layer the sequence is *compressed*: slot ``j`` of sample ``b`` holds the token at
original position ``idx[b, j]``, and ``valid[b, j]`` is False on the slots that only left-pad a
ragged batch. Every later layer needs its attention mask and its RoPE cos/sin for those slots, in
prefill and in each decode step against the shortened caches. Masks come in every form
transformers passes: None (plain causal), a 4D bool (True = attend) or additive float mask, or a 2D
FlashAttention padding mask.
"""

from __future__ import annotations

import torch

from .rows import gather_rows

__all__ = ["decode_mask", "gather_seq", "gather_tables", "layer_kwargs", "mask_fill", "prefill_mask",
           "stack_tables"]


def gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather positions along dim -2 of (..., B|1, L, D) with idx (B, Lc) → (..., B, Lc, D); the rows move
    as stored, in the widest integer words a row allows (:func:`fitprune.rows.gather_rows`)."""
    lead = t.shape[:-3]
    bsz, lc = idx.shape
    t = t.expand(*lead, bsz, t.shape[-2], t.shape[-1])
    return gather_rows(t, idx.expand(*lead, bsz, lc))


def stack_tables(tables) -> torch.Tensor | None:
    """RoPE's (cos, sin) stacked on a new leading dim, for :func:`gather_tables`; None where they differ
    in shape, dtype or device (each is then gathered alone)."""
    tables = tuple(tables)
    first = tables[0]
    if len(tables) < 2 or any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device
                              for t in tables[1:]):
        return None
    return torch.stack(tables)


def gather_tables(tables, stacked: torch.Tensor | None, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``tables`` (..., B|1, L, D) gathered at ``idx`` (B, Lc): one gather of ``stacked``
    (:func:`stack_tables` of them) where there is one, else one per table."""
    if stacked is None:
        return tuple(gather_seq(t, idx) for t in tables)
    return tuple(gather_seq(stacked, idx).unbind(0))


def mask_fill(mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def prefill_mask(mask, idx: torch.Tensor, valid: torch.Tensor, all_valid: bool):
    """Re-slice a prefill attention mask to the alive slots (rows and columns)."""
    bsz, lc = idx.shape
    device = idx.device
    if mask is None and all_valid:
        return None  # still plain causal in compressed order: SDPA keeps is_causal
    eye = torch.eye(lc, dtype=torch.bool, device=device)[None]
    if mask is None:
        allowed = torch.tril(torch.ones(lc, lc, dtype=torch.bool, device=device))[None] & valid[:, None, :]
        return (allowed | (eye & ~valid[:, :, None]))[:, None]
    if mask.dim() == 2:  # FlashAttention: (B, L) padding mask
        return mask.gather(1, idx) * valid.to(mask.dtype)
    m = mask.expand(bsz, *mask.shape[1:])
    b = torch.arange(bsz, device=device)[:, None, None]
    m = m[b, 0, idx[:, :, None], idx[:, None, :]]  # (B, Lc, Lc)
    m = mask_fill(m, valid[:, None, :] | (eye & ~valid[:, :, None]))
    return m[:, None]


def decode_mask(mask, idx: torch.Tensor, valid: torch.Tensor, all_valid: bool, input_len: int, q_len: int,
                 kv_len: int):
    """Mask for a decode step at a layer whose prefill cache holds only the slots ``idx``."""
    bsz, lc = idx.shape
    device = idx.device
    n_new = kv_len - input_len
    if mask is None:
        if all_valid:
            return None
        old = valid[:, None, :].expand(bsz, q_len, lc)
        rows = torch.arange(q_len, device=device)[:, None] + (n_new - q_len)
        new = (torch.arange(n_new, device=device)[None, :] <= rows)[None].expand(bsz, -1, -1)
        return torch.cat([old, new], dim=-1)[:, None]
    if mask.dim() == 2:
        return torch.cat([mask[:, :input_len].gather(1, idx) * valid.to(mask.dtype), mask[:, input_len:]], 1)
    m = mask.expand(bsz, *mask.shape[1:])
    index = idx[:, None, None, :].expand(bsz, m.shape[1], m.shape[2], lc)
    old = mask_fill(torch.gather(m[..., :input_len], -1, index), valid[:, None, None, :])
    return torch.cat([old, m[..., input_len:]], dim=-1)


def layer_kwargs(kwargs: dict, cache: dict, version: int, idx: torch.Tensor, valid: torch.Tensor,
                   all_valid: bool) -> dict:
    """A later layer's prefill kwargs re-sliced to the alive slots: its attention mask and RoPE tables.

    ``cache`` (the prefill's ``resliced`` dict) keeps each re-sliced value per (input, version), so the
    layers of one version share it, and RoPE's (cos, sin) stacked once per forward (one gather per
    version, :func:`gather_tables`). Position ids are dropped: the gapped ids of the survivors look like
    packed sequences to FlashAttention, and the re-sliced tables already hold their positions."""
    kwargs = dict(kwargs)
    for name in ("attention_mask", "position_embeddings"):
        value = kwargs.get(name)
        key = (id(value), version)
        if key not in cache:
            if name == "attention_mask":
                cache[key] = prefill_mask(value, idx, valid, all_valid)
            elif value is None:
                cache[key] = None
            else:
                stacked_key = (id(value), "stacked")
                if stacked_key not in cache:
                    cache[stacked_key] = stack_tables(value)
                cache[key] = gather_tables(value, cache[stacked_key], idx)
        kwargs[name] = cache[key]
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = None
    return kwargs
