"""FitPrune's cross and self scores in two Triton passes, without materialising attention probabilities.

Computes what ``scoring.cross_self(scoring.head_max_probs(...), text_rows, visual_rows)`` computes
(B = batch, H = query heads, R = scored query rows [row_start, Lq), Lkv = keys): pass 1 the row
log-sum-exp of every (b, h, row), pass 2 the head-max probabilities summed over the text and the visual
rows of each key block. Given the attention's own log-sum-exp (:mod:`fitprune.lse_attention`) pass 1 is
skipped. The kernels, their numerics and how they read masks: :mod:`fitprune.kernels.fused_scores_jit`.
This module checks the inputs, picks tiles and grids, launches the kernels and sums their partials.
Memory is O(B·H·R) instead of the (B, h, R, Lkv) float32 chunk of the torch path.

Masks the model passes its attention (:func:`_mask_args`), nothing (B, R, Lkv) is built:
* None: causal (key n allowed for row r if n <= r + Lkv - Lq); key blocks past the diagonal are skipped;
* 2D FlashAttention padding mask (B, Lkv): causal & mask[b, n] != 0; same skipping;
* 4D bool (B|1, 1, Lq, Lkv): True = attend; additive float (clamped at float32 min as the torch path
  does): masked where <= -1e38 (float32's or bf16's min: there the logit vanishes from the sum, so the
  torch path gives such entries 0), added to the logit elsewhere (fp16's min -65504 included). No causal
  assumption (some models attend bidirectionally within an image), so tiles are skipped only when every
  entry of the mask tile is masked.
A row with no allowed key gets the uniform 1/Lkv the torch path's softmax gives it; that is added in
torch after pass 2 (pass 2 skips those rows), so causal tile skipping stays exact.
"""

from __future__ import annotations

import functools
import os

import torch

from . import FUSED_SCORES_ENV as ENV_VAR  # "0": the default setting is off (the pruner then uses fitprune.scoring)
from .fused_scores_jit import _cross_self, _interpreting, _row_stats, triton

__all__ = ["ENV_VAR", "available", "fused_cross_self", "fused_cross_self_flags", "pass2_rows", "pass2_tiles",
           "supported"]

NEG = torch.finfo(torch.float32).min  # the torch path's "masked" bias
# Tile shapes, measured on the H200 (batch 8, bf16, the first pruning layer;
# scripts/bench_scores_kernel.py --tiles, benchmarks/h200-2026-12-03-s26-tiles-scores-kernel.log). Pass 2's rows
# per tile follow the scored rows: 128 from LONG_ROWS on (LLaVA-NeXT's 3003 rows: two passes 4.17 ->
# 3.70 ms, on the attention's LSE 2.09 -> 1.45 ms against 64), else 64 (LLaVA-1.5's 651 and Qwen2-VL's
# 1045 rows: 64 was 2-13 % faster, one run). Pass 1 keeps 64 (at 128 both passes together were slower
# everywhere); keys per tile: BLOCK_N.
BLOCK_M, LONG_BLOCK_M, LONG_ROWS = 64, 128, 2048
BLOCK_N = 64
ROW_STATS_BLOCK_M = 64
# pass 2 keeps a head-max tile, a bias tile and the logits live: 8 warps keep it free of register spills
# (bf16, hd 128, sm_90: pass 1 ~140 registers at 4 warps, pass 2 ~245 at 8)
ROW_STATS_WARPS, CROSS_SELF_WARPS = 4, 8
# Pass 2 on the attention's log-sum-exp (the pruner's path under SDPA) takes its own tiles where there are
# enough of them (pass2_tiles): 128 rows × 128 keys with 16 warps. A causal tile's bias is made after the
# head loop, so only the head-max tile and the logits stay live. H100, batch 8, the first pruning layer
# (scripts/bench_scores_kernel.py):
# * among tiles, one run (--tiles 128x128:16:3, benchmarks/h100-2026-12-06-s30-scores-kernel.*): against
#   the 64 / 128 × 64 tiles with 8 warps, LLaVA-1.5 0.209 -> 0.183 ms, LLaVA-NeXT 1.418 -> 1.312 ms,
#   Qwen2-VL 0.332 -> 0.265 ms; with two passes the same tiles were slower;
# * against the kernel before this change, another run (--baseline, ...-s30-scores-kernel-ab.*): NeXT
#   1.433 -> 1.365 ms, Qwen2-VL 0.368 -> 0.269 ms, LLaVA-1.5 0.241 -> 0.243 ms (no gain there).
LSE_BLOCK_M, LSE_BLOCK_N, LSE_WARPS = 128, 128, 16
STAGES = 3  # software-pipelining depth of both passes' loops (Triton's default)
MAX_HEAD_DIM = 256
_TORCH_PATH = f"Pass fused_scores=False to fitprune.apply (or set {ENV_VAR}=0) to score with the torch path."
# mask modes (constexpr in the kernels)
CAUSAL, PADDING_2D, BOOL_4D, FLOAT_4D = 0, 1, 2, 3


def supported(where: torch.Tensor | torch.device | str) -> bool:
    """True when the fused kernel can run on ``where`` (a query tensor, or a device): Triton imports and
    it is a CUDA device of compute capability >= 8.0 (bf16 dots). The pruner asks this per call under
    the automatic setting (``fused_scores=None``); the environment plays no part."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if triton is None or device.type != "cuda":
        return False
    if not isinstance(where, torch.Tensor) and not torch.cuda.is_available():  # a tensor there proves it
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def available(tensor: torch.Tensor) -> bool:
    """What the default setting picks for ``tensor`` in this environment: :func:`supported` and
    FITPRUNE_FUSED_SCORES is not "0" (read now; ``fitprune.apply`` reads it once, at apply time)."""
    return os.environ.get(ENV_VAR, "1") != "0" and supported(tensor)


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 8


# ------------------------------------------------------------------------------------------ wrapper


def _mask_args(mask: torch.Tensor | None, row_start: int, q_len: int, kv_len: int, query: torch.Tensor):
    """(mode, tensor, (smb, smr, smn)) for the kernels, from the mask the model passes its attention."""
    if mask is None:
        return CAUSAL, query, (0, 0, 0)  # the pointer is never read
    if mask.dim() == 2:  # FlashAttention padding mask (B, Lkv): 1 = real token
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        return PADDING_2D, m, (m.stride(0) if m.shape[0] > 1 else 0, 0, m.stride(1))
    if mask.dim() != 4 or mask.shape[-1] != kv_len:
        raise ValueError(
            f"fused scores: expected a mask None, (B, Lkv) or (B, 1, Lq, Lkv={kv_len}); got {tuple(mask.shape)}. "
            + _TORCH_PATH
        )
    m = mask[:, 0, row_start:q_len, :]  # (B|1, R, Lkv), a view
    mode = BOOL_4D if m.dtype == torch.bool else FLOAT_4D
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return mode, m, (m.stride(0) if m.shape[0] > 1 else 0, m.stride(1), m.stride(2))


@functools.cache
def _programs(device_index: int) -> int:
    """Pass-2 programs that fill the GPU: 4 per streaming multiprocessor."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _check(query, key, text_rows, visual_rows, row_start: int) -> None:
    bsz, n_heads, q_len, head_dim = query.shape
    n_rows = q_len - row_start
    if triton is None:
        raise RuntimeError(f"fused scores need Triton (pip install triton). {_TORCH_PATH}")
    if key.dim() != 4 or n_heads % key.shape[1] or key.shape[0] != bsz or key.shape[3] != head_dim:
        raise ValueError(f"fused scores: query {tuple(query.shape)} and key {tuple(key.shape)} must be "
                         "(B, H, Lq, hd) and (B, Hkv, Lkv, hd) with H a multiple of Hkv")
    if head_dim > MAX_HEAD_DIM or query.dtype != key.dtype:
        raise ValueError(f"fused scores handle head_dim <= {MAX_HEAD_DIM} and query/key of one dtype; got "
                         f"{head_dim}, {query.dtype}/{key.dtype}. {_TORCH_PATH}")
    if not 0 <= row_start <= q_len:
        raise ValueError(f"row_start must be in [0, Lq={q_len}]; got {row_start}")
    if tuple(text_rows.shape) != (bsz, n_rows) or tuple(visual_rows.shape) != (bsz, n_rows):
        raise ValueError(f"text_rows / visual_rows must be (B, R) = ({bsz}, {n_rows}); got "
                         f"{tuple(text_rows.shape)} / {tuple(visual_rows.shape)}")


def fused_cross_self(
    query: torch.Tensor,  # (B, H, Lq, hd), after RoPE
    key: torch.Tensor,  # (B, Hkv, Lkv, hd), after RoPE and cache update
    mask: torch.Tensor | None,
    scaling: float,
    row_start: int,
    text_rows: torch.Tensor,  # (B, R) bool: text query rows T (R = Lq - row_start)
    visual_rows: torch.Tensor,  # (B, R) bool: alive visual query rows V
    *,
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    stats_block_m: int = ROW_STATS_BLOCK_M,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FitPrune's c (mean over T) and s (mean over V) of the head-max attention, each (B, Lkv) float32.

    Equals ``scoring.cross_self(scoring.head_max_probs(query, key, mask, scaling, row_start), text_rows,
    visual_rows)`` up to float rounding. ``splits``: groups of row blocks per column block, each writing
    its own partial sums (default: enough programs to fill the GPU). ``block_m`` / ``block_n``: pass 2's
    tile rows / keys (None: :func:`pass2_tiles`), ``stats_block_m``: pass 1's tile rows; powers of two >= 16.
    """
    _check(query, key, text_rows, visual_rows, row_start)
    return _scores(query, key, mask, scaling, row_start, (text_rows, visual_rows), None, splits,
                   (stats_block_m, block_m), block_n)


def fused_cross_self_flags(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float, row_start: int,
    text: torch.Tensor,  # (B, Lq) bool: text slots (a row is in T where ``valid`` is set too)
    valid: torch.Tensor,  # (B, Lq) bool
    visual_rows: torch.Tensor,  # (B, Lq) bool: alive visual slots (V, from row_start on)
    inverse_counts: torch.Tensor,  # (B, 2) float32: 1 / max(1, |T|), 1 / max(1, |V|) per sample
    *,
    lse: torch.Tensor | None = None,  # (B, H, Lq) float32: the layer's attention log-sum-exp (causal only)
    splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    stats_block_m: int = ROW_STATS_BLOCK_M,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_cross_self` of ``text_rows = (text & valid)[:, row_start:]`` and ``visual_rows[:, row_start:]``
    with the counts already known (the pruner keeps them on the host): under a causal mask the kernel
    reads the flags and the inverse counts, so no weights are built (six launches fewer per pruning
    layer, the same bits: ``inverse_counts`` is the same float32 division). Other masks take the
    general path (its dead-row correction needs the weights).

    ``lse``: the log-sum-exp the layer's own flash attention computed (:mod:`fitprune.lse_attention`);
    pass 1 is skipped and p = exp(logit - lse) with float32 logits, so the scores differ from the torch
    path's (which rounds q·kᵀ to the model dtype) by that rounding."""
    if mask is not None:
        if lse is not None:
            raise ValueError("lse is taken under a causal mask (mask None) only")
        return fused_cross_self(query, key, mask, scaling, row_start, text[:, row_start:] & valid[:, row_start:],
                                visual_rows[:, row_start:], splits=splits, block_m=block_m, block_n=block_n,
                                stats_block_m=stats_block_m)
    _check(query, key, text[:, row_start:], visual_rows[:, row_start:], row_start)  # shapes (views)
    if tuple(valid.shape) != tuple(text.shape):
        raise ValueError(f"valid must have the shape of text, {tuple(text.shape)}; got {tuple(valid.shape)}")
    bsz = query.shape[0]
    if tuple(inverse_counts.shape) != (bsz, 2) or inverse_counts.dtype != torch.float32:
        raise ValueError(f"inverse_counts must be (B, 2) = ({bsz}, 2) float32; got {tuple(inverse_counts.shape)} "
                         f"{inverse_counts.dtype}")
    if lse is not None and (tuple(lse.shape) != tuple(query.shape[:3]) or lse.dtype != torch.float32):
        raise ValueError(f"lse must be (B, H, Lq) = {tuple(query.shape[:3])} float32; got {tuple(lse.shape)} "
                         f"{lse.dtype}")
    flags = (_flag_bytes(text), _flag_bytes(valid), _flag_bytes(visual_rows), inverse_counts.contiguous())
    return _scores(query, key, mask, scaling, row_start, None, flags, splits, (stats_block_m, block_m), block_n, lse)


def pass2_rows(n_rows: int) -> int:
    """Pass 2's rows per tile for ``n_rows`` scored query rows: LONG_BLOCK_M from LONG_ROWS on, else BLOCK_M."""
    return LONG_BLOCK_M if n_rows >= LONG_ROWS else BLOCK_M


def pass2_tiles(bsz: int, n_rows: int, kv_len: int, on_lse: bool, programs: int,
                block_m: int | None = None, block_n: int | None = None) -> tuple[int, int, int]:
    """Pass 2's (rows, keys, warps) per tile; ``programs``: those that fill the GPU (4 per multiprocessor).
    ``block_m`` / ``block_n`` given: those, with the warps of the mode (LSE_WARPS on the attention's
    log-sum-exp, else CROSS_SELF_WARPS). Else, on the attention's log-sum-exp (``on_lse``), the LSE tiles
    where there are at least as many of them, bsz × ⌈rows / LSE_BLOCK_M⌉ × ⌈keys / LSE_BLOCK_N⌉, as
    multiprocessors: every 7B geometry's first pruning layer at batch 8, where they were measured, and
    LLaVA-NeXT at batch 1. Smaller problems keep the two-pass tiles, which make 3-4 × as many programs
    (LLaVA-1.5 at batch 1: 30 programs with the LSE tiles, 110 with these, for 132 multiprocessors; H100,
    first pruning layer: 0.097 against 0.119 ms, benchmarks/h100-2026-12-06-s31-tiles-scores-kernel-b1.log)."""
    if block_m is not None or block_n is not None:
        warps = LSE_WARPS if on_lse else CROSS_SELF_WARPS
        return (pass2_rows(n_rows) if block_m is None else block_m), (BLOCK_N if block_n is None else block_n), warps
    tiles = bsz * -(-n_rows // LSE_BLOCK_M) * -(-kv_len // LSE_BLOCK_N)
    if on_lse and 4 * tiles >= programs:
        return LSE_BLOCK_M, LSE_BLOCK_N, LSE_WARPS
    return pass2_rows(n_rows), BLOCK_N, CROSS_SELF_WARPS


def _flag_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _scores(query, key, mask, scaling: float, row_start: int, rows, flags, splits, block_m: tuple[int, int],
            block_n: int, lse: torch.Tensor | None = None):
    """Both passes (pass 2 only, given the attention's ``lse``); row weights from ``rows`` (text_rows,
    visual_rows), or from ``flags`` (text, valid, visual, inverse counts; causal mask only); ``block_m``:
    (pass 1's, pass 2's) tile rows."""
    stats_block_m, block_m = block_m
    bsz, n_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    n_rows = q_len - row_start
    device = query.device
    programs = _programs(device.index if device.index is not None else torch.cuda.current_device()) \
        if query.is_cuda else 2
    block_m, block_n, warps = pass2_tiles(bsz, n_rows, kv_len, lse is not None, programs, block_m, block_n)
    if n_rows == 0 or kv_len == 0:
        zeros = torch.zeros(bsz, kv_len, dtype=torch.float32, device=device)
        return zeros, zeros.clone()
    mode, mask_t, mask_strides = _mask_args(mask, row_start, q_len, kv_len, query)
    common = {"MASK_MODE": mode, "IEEE": query.dtype == torch.float32, "INTERPRET": _interpreting(),
              "BLOCK_N": block_n, "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}  # tl.dot needs K >= 16
    geometry = (n_heads, n_heads // key.shape[1], n_rows, kv_len, row_start, kv_len - q_len, head_dim,
                float(scaling))
    strides = (*query.stride(), *key.stride(), *mask_strides)

    if lse is None:  # pass 1: the softmax log-sum-exp of every (b, h, row)
        row_lse = torch.empty(bsz, n_heads, n_rows, dtype=torch.float32, device=device)
        _row_stats[(triton.cdiv(n_rows, stats_block_m), bsz * n_heads)](
            query, key, mask_t, row_lse, *strides, *geometry, **common, BLOCK_M=stats_block_m,
            num_warps=ROW_STATS_WARPS, num_stages=STAGES)
        stats = (*row_lse.stride(), 0)
    else:  # the attention's own: rows [row_start, Lq) of its (B, H, Lq) log-sum-exp
        row_lse = lse
        stats = (*lse.stride(), row_start)

    uniform = None
    if flags is None:
        # row weights t_r/|T| and v_r/|V|, stacked (2, B, R) so each half is a contiguous (B, R)
        w = torch.stack(rows).float()
        w = w / w.sum(2, keepdim=True).clamp(min=1)
        if mode != CAUSAL:  # causal: every row allows key 0, so no row is dead (fewer kernels at batch 1)
            # a row with no allowed key has the torch path's uniform softmax, 1/Lkv on every key
            dead = (row_lse == NEG).all(1)  # (B, R)
            uniform = (w * dead).sum(2).T[..., None] / kv_len  # (B, 2, 1)
            w = w.masked_fill(dead, 0.0)
        weights, flag_strides = (w[0], w[1], row_lse, row_lse), (0, 0)  # VALID, INV never read
    else:
        text, valid, visual, inv = flags
        if text.stride() != valid.stride() or text.stride() != visual.stride():
            text, valid, visual = (t.contiguous() for t in (text, valid, visual))
        weights, flag_strides = (text, visual, valid, inv), text.stride()

    # pass 2: max over heads, weighted sums over rows; `splits` partials per column block
    n_cb = triton.cdiv(kv_len, block_n)
    if splits is None:
        splits = triton.cdiv(programs, bsz * n_cb)
    splits = max(1, min(int(splits), triton.cdiv(n_rows, block_m)))
    partial = torch.empty(bsz, splits, 2, kv_len, dtype=torch.float32, device=device)
    _cross_self[(bsz, splits, n_cb)](query, key, mask_t, row_lse, *weights, partial, *strides, *flag_strides,
                                     *stats, *geometry, splits, **common, ROW_FLAGS=flags is not None,
                                     ROUND=lse is None, GROUPS=geometry[1], BLOCK_M=block_m, num_warps=warps,
                                     num_stages=STAGES)
    cs = partial[:, 0] if splits == 1 else partial.sum(1)  # (B, 2, Lkv)
    if uniform is not None:
        cs = cs + uniform
    return cs[:, 0], cs[:, 1]
