"""A pruning layer's selection and state compaction in one Triton launch per prefill layer.

Replaces, for a batch of B rows of L slots, what the torch path does in about 20 small kernels and two
sorts (``scoring.select_drops``, the pruner's keep-order sort, the gathers of the per-slot state):

1. drop: the ``k[b]`` lowest-scoring candidates of each row, ties broken by the earlier slot (what a
   stable ascending sort gives). Each slot's key is its float32 score mapped to an order-preserving
   int32 (``-0.0`` counted as ``0.0``), shifted above the slot index, so keys are distinct and one
   bitonic ``tl.sort`` orders them. The ``k``-th smallest key is the threshold: a candidate is dropped
   when its key is at most that.
2. keep order: the slots kept (valid and not dropped) in slot order, left-padded to ``new_len`` with
   the last not-kept slots in slot order, exactly the slots the torch path's stable sort of the keep
   flags puts there. Positions come from two prefix sums.
3. the new per-slot state (original position, visual / text / real flags, valid) is written at those
   positions, and the dropped original positions (-1 elsewhere) for the report.

One program per row; the row's L slots live in registers (L <= :data:`MAX_SLOTS`). The hidden states are
gathered outside, with the returned ``sel``.
"""

from __future__ import annotations

import torch

try:  # optional: CPU installs and CI have no Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

from .fused_scores_jit import _interpreting, _jit

__all__ = ["MAX_SLOTS", "can_run", "for_state", "fused_select_compact", "warps"]

MAX_SLOTS = 8192  # slots per row kept in registers (LLaVA-NeXT's ~3000 need 4096)


def warps(block: int) -> int:
    """Warps of the one program per row for a row of ``block`` slots (a power of two): 4 up to 1024, 8 at 2048,
    32 from 4096 on. H100, batch 1 and 8, one run (``scripts/bench_select_kernel.py``,
    benchmarks/h100-2026-12-06-s32.md): at 4096 slots (LLaVA-NeXT's 3003 rows) 32 warps took 87 µs a call
    against 112 µs with 8 (16: 122); at 1024 and 2048 slots every choice took 56-68 µs, about what the
    host takes to launch a call, so those stay as they were. 8192 slots are not measured."""
    return 4 if block <= 1024 else 8 if block <= 2048 else 32


def can_run(scores: torch.Tensor) -> bool:
    """True when the kernel can take these (B, L) scores: Triton imports, the row fits in registers,
    and they are on a CUDA device (or Triton's interpreter is on: the CPU tests)."""
    return (triton is not None and scores.shape[-1] <= MAX_SLOTS
            and (scores.device.type == "cuda" or _interpreting()))


@_jit
def _select_compact(
    SCORES, CAND, VALID, K, IDX, VIS, TXT, REAL,  # (B, L) inputs (contiguous); K (B,)
    DROP, DPOS, SEL, NVALID, NIDX, NVIS, NTXT, NREAL,  # (B, L) and (B, new_len) outputs
    n_slots, new_len,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    ok = j < n_slots
    row = b * n_slots + j
    cand = tl.load(CAND + row, mask=ok, other=0) != 0
    score = tl.load(SCORES + row, mask=ok, other=0.0).to(tl.float32) + 0.0  # -0.0 + 0.0 == +0.0
    score = tl.where(cand, score, float("inf"))
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order == float order
    key = (ordered.to(tl.int64) << 32) | j.to(tl.int64)  # distinct: ties go to the earlier slot
    key = tl.where(ok, key, 0x7FFFFFFFFFFFFFFF)
    ranked = tl.sort(key)
    n_cand = tl.sum(cand.to(tl.int32), 0)
    k = tl.minimum(tl.load(K + b).to(tl.int32), n_cand)
    threshold = tl.max(tl.where(j == k - 1, ranked, -0x7FFFFFFFFFFFFFFF - 1), 0)  # k-th smallest (k >= 1)
    drop = cand & (key <= threshold) & (k > 0)

    valid = tl.load(VALID + row, mask=ok, other=0) != 0
    keep = valid & ~drop
    not_kept = ok & ~keep
    kept_before = tl.cumsum(keep.to(tl.int32), 0)  # inclusive
    not_kept_before = tl.cumsum(not_kept.to(tl.int32), 0)
    n_keep = tl.sum(keep.to(tl.int32), 0)
    n_not_kept = n_slots - n_keep
    pad = new_len - n_keep  # this row's left padding
    skip = n_not_kept - pad  # the first not-kept slots that find no place
    out = tl.where(keep, pad + kept_before - 1, not_kept_before - 1 - skip)
    write = ok & (keep | (not_kept_before - 1 >= skip))
    dst = b * new_len + out

    idx = tl.load(IDX + row, mask=ok, other=0)
    tl.store(DROP + row, drop.to(tl.int8), mask=ok)
    tl.store(DPOS + row, tl.where(drop, idx, -1), mask=ok)
    tl.store(SEL + dst, j.to(tl.int64), mask=write)
    tl.store(NVALID + dst, keep.to(tl.int8), mask=write)
    tl.store(NIDX + dst, idx, mask=write)
    tl.store(NVIS + dst, tl.load(VIS + row, mask=ok, other=0), mask=write)
    tl.store(NTXT + dst, tl.load(TXT + row, mask=ok, other=0), mask=write)
    tl.store(NREAL + dst, tl.load(REAL + row, mask=ok, other=0), mask=write)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int8) if t.dtype == torch.bool else t.contiguous()


def fused_select_compact(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor, valid: torch.Tensor,
                         idx: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, real: torch.Tensor,
                         new_len: int) -> dict[str, torch.Tensor]:
    """Drop the ``k[b]`` lowest-scoring ``candidates`` of each row and compact the per-slot state.

    Inputs are (B, L) (``k``: (B,) integers); bool flags. Returns ``drop`` (B, L) bool, ``dropped``
    (B, L) original positions of the dropped slots (-1 elsewhere), and at the ``new_len`` slots kept
    after the layer: ``sel`` (B, new_len) int64 slot indices, ``valid``, ``idx``, ``visual``, ``text``,
    ``real``. Equals ``scoring.select_drops`` followed by the pruner's stable keep-order sort and gathers.
    """
    bsz, n_slots = scores.shape
    if triton is None:
        raise RuntimeError("fused selection needs Triton; the pruner uses the torch path without it")
    if n_slots > MAX_SLOTS or not 0 < new_len <= n_slots:
        raise ValueError(f"fused selection: L = {n_slots} (at most {MAX_SLOTS}) and new_len = {new_len} "
                         f"(1..L) expected")
    device = scores.device
    block = max(16, triton.next_power_of_2(n_slots))
    out = {
        "drop": torch.empty(bsz, n_slots, dtype=torch.bool, device=device),
        "dropped": torch.empty(bsz, n_slots, dtype=idx.dtype, device=device),
        "sel": torch.empty(bsz, new_len, dtype=torch.int64, device=device),
        "valid": torch.empty(bsz, new_len, dtype=torch.bool, device=device),
        "idx": torch.empty(bsz, new_len, dtype=idx.dtype, device=device),
        "visual": torch.empty(bsz, new_len, dtype=torch.bool, device=device),
        "text": torch.empty(bsz, new_len, dtype=torch.bool, device=device),
        "real": torch.empty(bsz, new_len, dtype=torch.bool, device=device),
    }
    flags = [_bytes(t) for t in (candidates, valid)]
    state = [_bytes(t) for t in (idx, visual, text, real)]
    outputs = [out["drop"].view(torch.int8), out["dropped"], out["sel"], out["valid"].view(torch.int8),
               out["idx"], out["visual"].view(torch.int8), out["text"].view(torch.int8), out["real"].view(torch.int8)]
    _select_compact[(bsz,)](scores.contiguous(), flags[0], flags[1], k.contiguous(), *state, *outputs,
                            n_slots, new_len, BLOCK=block, num_warps=warps(block))
    return out


def for_state(state, scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor, counts: list[int]) -> dict:
    """:func:`fused_select_compact` on a pruner's prefill state (:class:`fitprune.prefill_state.PrefillState`)
    with the host-known drop ``counts``: the kept slots are left-padded to the longest row."""
    return fused_select_compact(scores, candidates, k, state.valid, state.idx, state.visual, state.text,
                                state.real, state.width_after(counts))
