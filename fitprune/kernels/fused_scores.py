"""FitPrune's cross and self scores in two Triton passes, without materialising attention probabilities.

Computes what ``scoring.cross_self(scoring.head_max_probs(...), text_rows, visual_rows)`` computes
(B = batch, H = query heads, Hkv = key heads, R = scored query rows [row_start, Lq), Lkv = keys):

1. ``_row_stats``: per (b, h, row) the log-sum-exp m + log l of the row's allowed logits (running max m
   and sum l of exp(logit - m), flash-attention style, no values). Grid (R / BLOCK_M, B·H), the last row
   block of each (b, h) (under a causal mask, the most keys) first.
2. ``_cross_self``: per (b, column block, split of the row blocks): loop over heads, keeping the running
   max of logit - lse; one exp after the loop gives the head-max probability (exp is monotonic, so
   max_h exp(a_h) = exp(max_h a_h): one exp per tile entry instead of one per head; 1.2-1.3x faster
   on the H200); then c += Σ_rows p·t_r/|T|, s += Σ_rows p·v_r/|V|. The mask's bias, the same for every
   head, is added once, after the max. Each split writes its own partial (no atomics, deterministic);
   the splits are summed in torch. Grid (B, splits, Lkv / BLOCK_N): blocks start x fastest, so under a
   causal mask the column blocks with the most rows start first (longest first: no long program left for
   the end; H100, batch 8, first pruning layer on the attention's LSE: NeXT 1.314 -> 1.103 ms, Qwen2-VL
   0.282 -> 0.267 ms against the grid (Lkv / BLOCK_N, splits, B), one run,
   benchmarks/h100-2026-12-06-s31-order-scores-kernel-b8.log; end to end not resolved). Under grouped
   keys (GQA) the head loop runs over key heads, and each key tile is loaded once for the query heads
   that share it (Qwen2-VL-7B's 7: first pruning layer at batch 8 on the H100, 0.261 -> 0.242 ms on the
   attention's LSE, benchmarks/h100-2026-12-06-s31-gqa-scores-kernel-b8.log).

Logits are recomputed in pass 2 (2 × the q·kᵀ FLOPs of one head-chunk pass) and never stored: memory is
O(B·H·R) instead of the (B, h, R, Lkv) float32 chunk of the torch path.

Numerics follow the torch path: q·kᵀ accumulates in float32 and is rounded to the input dtype (the
torch path multiplies in the model dtype), then ``* scaling + bias`` in float32; masked entries hold
float32's min like ``scoring._allowed_bias``. fp32 inputs use IEEE dots (no TF32), as torch does.

Masks are read in the kernels, nothing (B, R, Lkv) is built:
* None: causal (key n allowed for row r if n <= r + Lkv - Lq); key blocks past the diagonal are skipped;
* 2D FlashAttention padding mask (B, Lkv): causal & mask[b, n] != 0; same skipping;
* 4D bool (B|1, 1, Lq, Lkv): True = attend; additive float (clamped at float32 min as the torch path
  does): masked where <= -1e38 (float32's or bf16's min: there the logit vanishes from the sum, so the
  torch path gives such entries 0), added to the logit elsewhere (fp16's min -65504 included). No causal
  assumption (some models attend bidirectionally within an image), so tiles are skipped only when every
  entry of the mask tile is masked.
A row with no allowed key gets the uniform 1/Lkv the torch path's softmax gives it; that is added in
torch after pass 2 (pass 2 skips those rows), so causal tile skipping stays exact.

Under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is first imported; the tests run the
kernels on the CPU that way) the ``INTERPRET`` constexpr works around two Triton 3.6 interpreter bugs in
bf16; the compiled code never takes that branch.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # optional: CPU installs and CI have no Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

from . import FUSED_SCORES_ENV as ENV_VAR  # "0": the default setting is off (the pruner then uses fitprune.scoring)

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


# ------------------------------------------------------------------------------------------ kernels


def _jit(fn):
    """``triton.jit`` where Triton is installed; else the plain function (never called)."""
    return fn if triton is None else triton.jit(fn)


def _interpreting() -> bool:
    # Triton's interpreter must be on before Triton is first imported (torch imports it at startup)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@_jit
def _tile_bias(MASK, rows, cols, row_ok, col_ok, smr, smn, row_start, causal_off, MASK_MODE: tl.constexpr):
    """(BM, BN) float32 additive bias of one tile: 0 (or the float mask's value) where the key is allowed,
    float32 min where masked, as ``scoring._allowed_bias``; logit + min rounds to min, so no select is
    needed later. MASK points at this sample's mask."""
    NEG_F: tl.constexpr = -3.4028234663852886e38
    ok = row_ok[:, None] & col_ok[None, :]
    if MASK_MODE <= 1:  # causal; a 2D mask also drops padded keys
        ok = ok & (cols[None, :] <= (row_start + rows + causal_off)[:, None])
        if MASK_MODE == 1:
            ok = ok & (tl.load(MASK + cols * smn, mask=col_ok, other=0) != 0)[None, :]
        return tl.where(ok, 0.0, NEG_F)
    ptrs = MASK + rows[:, None] * smr + cols[None, :] * smn
    if MASK_MODE == 2:  # bool, True = attend
        return tl.where(ok & (tl.load(ptrs, mask=ok, other=0) != 0), 0.0, NEG_F)
    value = tl.maximum(tl.load(ptrs, mask=ok, other=NEG_F).to(tl.float32), NEG_F)
    return tl.where(ok & (value > -1e38), value, NEG_F)  # float32 / bf16 min: the logit vanishes anyway


@_jit
def _logits(q, kt, scaling, IEEE: tl.constexpr, INTERPRET: tl.constexpr, ROUND: tl.constexpr = True):
    """(BM, BN) float32 logits of q (BM, BD) and kᵀ (BD, BN) before the mask: q·kᵀ rounded to the input
    dtype (the torch path multiplies in the model dtype; ROUND False: kept in float32, as flash attention
    does, whose log-sum-exp the LSE mode reads), then * scaling in float32."""
    if INTERPRET:  # Triton 3.6's interpreter: bf16 dots are wrong and float32 → bf16 truncates
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        if ROUND:
            if q.dtype == tl.bfloat16:  # round to nearest even by hand
                bits = s.to(tl.uint32, bitcast=True)
                s = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            else:
                s = s.to(q.dtype).to(tl.float32)
    else:
        if IEEE:  # float32 inputs: no TF32, as torch's matmul
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        if ROUND:
            s = s.to(q.dtype).to(tl.float32)
    return s * scaling


@_jit
def _row_stats(
    Q, K, MASK, LSE_OUT,
    sqb, sqh, sqr, sqd,  # query strides (B, H, Lq, hd)
    skb, skh, skn, skd,  # key strides (B, Hkv, Lkv, hd)
    smb, smr, smn,  # mask strides (b, row of [row_start, Lq), key); smr = 0 for a 2D mask
    n_heads, groups, n_rows, kv_len, row_start, causal_off, head_dim, scaling,
    MASK_MODE: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1: the log-sum-exp ((B, H, R) float32) of the rows of one (row block, b, h); float32's min for a
    row no tile of which has an allowed key."""
    NEG_F: tl.constexpr = -3.4028234663852886e38
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the last row block sees the most keys, so it
    pid_bh = tl.program_id(1)  # starts first of its (b, h)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // groups
    Q += b.to(tl.int64) * sqb  # this sample (int64: B·H·L·hd may pass 2**31)
    K += b.to(tl.int64) * skb
    MASK += b.to(tl.int64) * smb
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) index into R
    row_ok = rows < n_rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_ptrs = Q + h * sqh + (row_start + rows)[:, None] * sqr + d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
    m_i = tl.full([BLOCK_M], NEG_F, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_end = kv_len
    if MASK_MODE <= 1:  # causal: no key right of the block's last row
        n_end = row_start + (pid_m + 1) * BLOCK_M + causal_off
        if n_end > kv_len:
            n_end = kv_len
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < kv_len
        bias = _tile_bias(MASK, rows, cols, row_ok, col_ok, smr, smn, row_start, causal_off, MASK_MODE)
        if tl.max(bias) > NEG_F:  # some key of the tile is allowed
            k_ptrs = K + kvh * skh + cols[None, :] * skn + d[:, None] * skd
            kt = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BD, BN)
            x = _logits(q, kt, scaling, IEEE, INTERPRET) + bias  # (BM, BN), masked: NEG_F
            m_new = tl.maximum(m_i, tl.max(x, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
            m_i = m_new
    out = (b * n_heads + h) * n_rows + rows
    tl.store(LSE_OUT + out, tl.where(l_i > 0, m_i + tl.log(l_i), NEG_F), mask=row_ok)


@_jit
def _head_max(a_max, Q, LSE_IN, kt, h, rows, row_ok, d, d_ok, row_start, sqh, sqr, sqd, stat_b, ssh, ssr, stat_off,
              scaling, IEEE: tl.constexpr, INTERPRET: tl.constexpr, ROUND: tl.constexpr):
    """Pass 2's running max over heads, taking head ``h``: max(a_max, logit - lse) of the rows against kᵀ."""
    q_ptrs = Q + h * sqh + (row_start + rows)[:, None] * sqr + d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
    lse_r = tl.load(LSE_IN + stat_b + h * ssh + (stat_off + rows) * ssr, mask=row_ok, other=0.0)
    return tl.maximum(a_max, _logits(q, kt, scaling, IEEE, INTERPRET, ROUND) - lse_r[:, None])


@_jit
def _cross_self(
    Q, K, MASK, LSE_IN, W_T, W_V, VALID, INV, OUT,
    sqb, sqh, sqr, sqd,
    skb, skh, skn, skd,
    smb, smr, smn,
    swb, swr,  # row-flag strides (B, Lq) when ROW_FLAGS
    ssb, ssh, ssr, stat_off,  # strides of the row statistics and the row they start at
    n_heads, groups, n_rows, kv_len, row_start, causal_off, head_dim, scaling, n_splits,
    MASK_MODE: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr, ROW_FLAGS: tl.constexpr,
    ROUND: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2: partial c and s of one (column block, split, b) into OUT (B, splits, 2, Lkv).

    Row weights: ROW_FLAGS False, W_T / W_V are (B, R) float32 t_r/|T| and v_r/|V|; ROW_FLAGS True, they
    are (B, Lq) bool flags (text rows, visual rows; a text row counts where VALID is set too) and INV
    (B, 2) float32 holds 1/|T|, 1/|V|: the same weights without materialising them.
    Row statistics: LSE_IN is pass 1's log-sum-exp (ROUND True: logits rounded as pass 1 rounds them) or
    the attention's own (B, H, Lq) (ROUND False: float32 logits, as flash computes them); p = exp(logit - lse).
    GROUPS: query heads per key head, as a constexpr (it shapes the head loop; ``groups`` is not read here)."""
    NEG_F: tl.constexpr = -3.4028234663852886e38
    b = tl.program_id(0)  # blocks start in grid order, x fastest: all of column block 0 (under a causal
    split = tl.program_id(1)  # mask the most rows) first, the last column block (the fewest) last, so the
    pid_n = tl.program_id(2)  # long programs do not start at the end and leave the GPU idle around them
    Q += b.to(tl.int64) * sqb  # this sample
    K += b.to(tl.int64) * skb
    MASK += b.to(tl.int64) * smb
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    col_ok = cols < kv_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    c_acc = tl.zeros([BLOCK_N], tl.float32)
    s_acc = tl.zeros([BLOCK_N], tl.float32)
    rb_start = 0
    if MASK_MODE <= 1:  # causal: rows whose last allowed key is left of this block never see it
        first_row = pid_n * BLOCK_N - causal_off - row_start
        if first_row > 0:
            rb_start = first_row // BLOCK_M
    n_rb = tl.cdiv(n_rows, BLOCK_M)
    for rb in range(rb_start + split, n_rb, n_splits):  # this split's row blocks
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        row_ok = rows < n_rows
        if ROW_FLAGS:
            flag = b * swb + (row_start + rows) * swr
            t_r = (tl.load(W_T + flag, mask=row_ok, other=0) != 0) & (tl.load(VALID + flag, mask=row_ok, other=0) != 0)
            w_t = tl.where(t_r, tl.load(INV + 2 * b), 0.0)  # (BM,) t_r / |T| (0: not scored)
            w_v = tl.where(tl.load(W_V + flag, mask=row_ok, other=0) != 0, tl.load(INV + 2 * b + 1), 0.0)
        else:
            w_t = tl.load(W_T + b * n_rows + rows, mask=row_ok, other=0.0)  # (BM,) t_r / |T| (0: not scored)
            w_v = tl.load(W_V + b * n_rows + rows, mask=row_ok, other=0.0)
        if MASK_MODE == 0:  # causal: every tile from rb_start on allows some key; the bias waits for the max
            go = tl.max(w_t + w_v) > 0
        else:
            bias = _tile_bias(MASK, rows, cols, row_ok, col_ok, smr, smn, row_start, causal_off, MASK_MODE)
            go = (tl.max(bias) > NEG_F) & (tl.max(w_t + w_v) > 0)  # something allowed, some row scored
        if go:
            a_max = tl.full([BLOCK_M, BLOCK_N], NEG_F, tl.float32)  # max over heads of logit - lse
            k_tile = K + cols[None, :] * skn + d[:, None] * skd
            k_ok = col_ok[None, :] & d_ok[:, None]
            if GROUPS == 1:  # one loop over the heads: the pipeliner prefetches q and k of the next head
                for h in range(n_heads):
                    kt = tl.load(k_tile + h * skh, mask=k_ok, other=0.0)  # (BD, BN)
                    a_max = _head_max(a_max, Q, LSE_IN, kt, h, rows, row_ok, d, d_ok, row_start, sqh, sqr, sqd,
                                      b * ssb, ssh, ssr, stat_off, scaling, IEEE, INTERPRET, ROUND)
            else:  # grouped keys: each key tile loaded once for the GROUPS query heads that share it
                for kvh in range(n_heads // GROUPS):
                    kt = tl.load(k_tile + kvh * skh, mask=k_ok, other=0.0)
                    for g in range(GROUPS):
                        a_max = _head_max(a_max, Q, LSE_IN, kt, kvh * GROUPS + g, rows, row_ok, d, d_ok, row_start,
                                          sqh, sqr, sqd, b * ssb, ssh, ssr, stat_off, scaling, IEEE, INTERPRET,
                                          ROUND)
            if MASK_MODE == 0:  # not live through the head loop: registers for the tile
                bias = _tile_bias(MASK, rows, cols, row_ok, col_ok, smr, smn, row_start, causal_off, MASK_MODE)
            # masked: + float32 min gives exp 0; a dead row (lse float32 min) gets a finite p and weight 0
            p_max = tl.exp(a_max + bias)
            c_acc += tl.sum(p_max * w_t[:, None], 0)  # rows without an allowed key weigh 0 here
            s_acc += tl.sum(p_max * w_v[:, None], 0)
    out = OUT + (b * n_splits + split) * 2 * kv_len + cols
    tl.store(out, c_acc, mask=col_ok)
    tl.store(out + kv_len, s_acc, mask=col_ok)


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
