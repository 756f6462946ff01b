"""Scoring rules: which alive visual tokens a pruning layer drops.

All functions are pure tensor code on the compressed sequence of one layer (B = batch,
H = query heads, Hkv = key/value heads, Lc = tokens alive entering the layer, R = query rows scored).

* ``fitprune`` (paper §3, DESIGN.md §2): head-max attention A; cross score
  c_v = mean_{t∈T} A[t, v] over the text rows after the last visual token, self score
  s_v = mean_{i∈V} A[i, v] over the alive visual rows (causal, zeros counted); drop the lowest c·s.
* ``fastv``: the last real token's head-mean attention (FastV, Chen et al. 2024); drop the lowest.
* ``random``: seeded uniform scores (a control).
"""

from __future__ import annotations

import torch

__all__ = ["head_max_probs", "cross_self", "fastv_scores", "last_true", "random_scores", "select_drops",
           "state_cross_self", "takes_counts", "use_fused"]

# Work memory for one head chunk of attention probabilities (float32 elements, 512 MiB).
CHUNK_ELEMENTS = 128 * 1024 * 1024


def _allowed_bias(mask: torch.Tensor | None, row_start: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Additive float32 bias (B or 1, R, Lc) for rows [row_start, q_len) from a layer's attention mask.

    ``mask`` is what the model passes its attention function: None (plain causal), a 4D bool
    (True = attend) or additive float mask (B, 1, Lq, Lkv), or a 2D FlashAttention padding mask (B, Lkv).
    """
    rows = torch.arange(row_start, q_len, device=device)[:, None] + (kv_len - q_len)
    causal = torch.arange(kv_len, device=device)[None, :] <= rows  # (R, Lkv)
    neg = torch.finfo(torch.float32).min
    if mask is None:
        return torch.where(causal, 0.0, neg)[None]
    if mask.dim() == 2:  # FlashAttention padding mask: 1 = real token
        allowed = causal[None] & mask[:, None, :].bool()
        return torch.where(allowed, 0.0, neg)
    m = mask[:, 0, row_start:q_len, :]
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, neg)
    return m.float().clamp(min=neg)


def head_max_probs(
    query: torch.Tensor,  # (B, H, Lc, hd), after RoPE
    key: torch.Tensor,  # (B, Hkv, Lkv, hd), after RoPE and cache update
    mask: torch.Tensor | None,
    scaling: float,
    row_start: int = 0,
    reduce: str = "max",
) -> torch.Tensor:
    """Softmax attention probabilities of rows [row_start, Lc), reduced over heads: (B, R, Lkv) float32.

    Heads are processed in chunks so memory stays at one chunk of (B, h, R, Lkv) float32.
    """
    bsz, n_heads, q_len, _ = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    rows = q_len - row_start
    bias = _allowed_bias(mask, row_start, q_len, kv_len, query.device)
    chunk = max(1, min(n_heads, CHUNK_ELEMENTS // max(1, bsz * rows * kv_len)))
    out = None
    for h0 in range(0, n_heads, chunk):
        h1 = min(n_heads, h0 + chunk)
        q = query[:, h0:h1, row_start:]  # (B, h, R, hd)
        kv_heads = torch.arange(h0, h1, device=query.device) // groups
        k = key.index_select(1, kv_heads)  # (B, h, Lkv, hd)
        # q·kᵀ in the model's dtype (tensor cores for bf16/fp16), softmax in float32
        logits = (q @ k.transpose(-1, -2)).float()
        probs = torch.softmax(logits * scaling + bias[:, None], dim=-1)  # (B, h, R, Lkv)
        if reduce == "max":
            part = probs.amax(dim=1)
            out = part if out is None else torch.maximum(out, part)
        else:  # mean
            part = probs.sum(dim=1)
            out = part if out is None else out + part
    return out if reduce == "max" else out / n_heads


def cross_self(
    probs: torch.Tensor,  # (B, R, Lkv) head-max probabilities of rows [row_start, Lc)
    text_rows: torch.Tensor,  # (B, R) bool: text query rows T
    visual_rows: torch.Tensor,  # (B, R) bool: alive visual query rows V
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross score c (mean over T) and self score s (mean over V), each (B, Lkv) float32."""
    t = text_rows.float()
    v = visual_rows.float()
    c = torch.einsum("brk,br->bk", probs, t) / t.sum(1, keepdim=True).clamp(min=1)
    s = torch.einsum("brk,br->bk", probs, v) / v.sum(1, keepdim=True).clamp(min=1)
    return c, s


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """(B,) long: the index of each row's last True in ``mask`` (B, L) bool (-1 where none), on the
    device with no host sync: each sample's last real token under left or right padding."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions, -1).amax(1)


def _row_mask(mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """The attention mask of one query row per sample (``rows`` (B,) long), as a 4D mask (B, 1, 1, Lkv)
    of ``mask``'s kind (bool or additive float; None and 2D padding masks become causal bool rows)."""
    bsz = rows.shape[0]
    if mask is not None and mask.dim() == 4:
        full = mask[:, 0].expand(bsz, q_len, mask.shape[-1])
        return full.gather(1, rows.view(bsz, 1, 1).expand(bsz, 1, mask.shape[-1]))[:, None]
    keys = torch.arange(kv_len, device=rows.device)
    allowed = keys[None, :] <= (rows + (kv_len - q_len))[:, None]  # causal, (B, Lkv)
    if mask is not None:  # FlashAttention padding mask (B, Lkv): 1 = real token
        allowed = allowed & mask.bool()
    return allowed[:, None, None, :]


def fastv_scores(query, key, mask, scaling, last_rows: torch.Tensor | None = None) -> torch.Tensor:
    """FastV: head-mean attention from each sample's last query row, (B, Lkv). ``last_rows`` (B,) long:
    that row per sample, its last real token (a right-padded sample ends in padding rows); None: the
    last row of the batch for every sample (left padding or none)."""
    q_len = query.shape[2]
    if last_rows is None:
        return head_max_probs(query, key, mask, scaling, row_start=q_len - 1, reduce="mean")[:, 0]
    bsz, n_heads, _, head_dim = query.shape
    rows = query.gather(2, last_rows.view(bsz, 1, 1, 1).expand(bsz, n_heads, 1, head_dim))  # (B, H, 1, hd)
    return head_max_probs(rows, key, _row_mask(mask, last_rows, q_len, key.shape[2]), scaling, reduce="mean")[:, 0]


def random_scores(shape: tuple[int, int], seed: int, layer: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(layer))
    return torch.rand(shape, generator=gen).to(device)


def select_drops(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, Lc) bool: the k[b] lowest-scoring candidates of each sample (ties: earlier position first)."""
    masked = torch.where(candidates, scores.float(), torch.inf)
    order = torch.sort(masked, dim=1, stable=True).indices
    k = torch.minimum(k, candidates.sum(1))
    ranks_dropped = torch.arange(scores.shape[1], device=scores.device)[None, :] < k[:, None]
    return torch.empty_like(candidates).scatter_(1, order, ranks_dropped)  # order covers every slot


def use_fused(query: torch.Tensor, fused_scores: bool | None) -> bool:
    """Whether FitPrune's c and s come from the fused kernel for ``query``: ``fused_scores`` None =
    wherever it can run, True = required (RuntimeError where it cannot), False = never."""
    if fused_scores is False:
        return False
    from .kernels import fused_scores as kernel  # imports Triton (if installed) on first use only

    if kernel.supported(query):
        return True
    if fused_scores:
        raise RuntimeError(f"fused_scores=True, but the fused kernel cannot run on {query.device} "
                           f"({'no Triton' if kernel.triton is None else 'needs a CUDA device, sm_80+'}); "
                           "apply the recipe with fused_scores=None (auto) or False")
    return False


def takes_counts(state, query, fused_scores: bool | None) -> bool:
    """Whether :func:`state_cross_self` hands the fused kernel the host-known row counts (and an
    attention log-sum-exp): the kernel runs and every sample has visual tokens, so its text rows (after
    its last one) and its visual rows all lie in [first candidate row, Lc)."""
    return use_fused(query, fused_scores) and all(f < state.input_len for f in state.first_visual)


def state_cross_self(state, query, key, mask, scaling: float, candidates: torch.Tensor,
                     fused_scores: bool | None = None, constants=None,
                     lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FitPrune's c and s (B, Lc) for the alive visual slots of a pruner's prefill ``state``
    (:class:`fitprune.prefill_state.PrefillState`; 0 before its first candidate row), by the fused
    kernel (``fitprune.kernels.fused_scores``, no attention probabilities materialised) or the torch
    path, as :func:`use_fused` decides. ``constants`` (the pruner's
    :class:`~fitprune.device_constants.DeviceConstants`): where :func:`takes_counts`, the fused kernel
    then takes the host counts n_text and alive_visual instead of building the row weights on the
    device, and ``lse`` (B, H, Lc), the layer attention's log-sum-exp (:mod:`fitprune.lse_attention`),
    instead of its own first pass."""
    first = state.first_candidate_row()  # system rows are neither T nor V
    if use_fused(query, fused_scores):
        from .kernels import fused_scores as kernel

        if constants is not None and takes_counts(state, query, fused_scores):
            inverse = constants.inverse_counts(state.n_text, state.alive_visual, query.device)
            return kernel.fused_cross_self_flags(query, key, mask, scaling, first, state.text, state.valid,
                                                 candidates, inverse, lse=lse)
        return kernel.fused_cross_self(query, key, mask, scaling, first, state.text[:, first:] & state.valid[:, first:],
                                       candidates[:, first:])
    text_rows = state.text[:, first:] & state.valid[:, first:]  # (B, R)
    probs = head_max_probs(query, key, mask, scaling, row_start=first)
    return cross_self(probs, text_rows, candidates[:, first:])
