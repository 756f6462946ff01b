"""The Triton kernels of FitPrune's fused cross and self scores (:mod:`fitprune.kernels.fused_scores` is
the wrapper that launches them; B = batch, H = query heads, Hkv = key heads, R = scored query rows
[row_start, Lq), Lkv = keys):

1. ``_row_stats``: per (b, h, row) the log-sum-exp m + log l of the row's allowed logits (running max m
   and sum l of exp(logit - m), flash-attention style, no values). Grid (R / BLOCK_M, B·H), the last row
   block of each (b, h) (under a causal mask, the most keys) first.
2. ``_cross_self``: per (b, column block, split of the row blocks): loop over heads, keeping the running
   max of logit - lse; one exp after the loop gives the head-max probability (exp is monotonic, so
   max_h exp(a_h) = exp(max_h a_h): one exp per tile entry instead of one per head; 1.2-1.3x faster
   on the H200); then c += Σ_rows p·t_r/|T|, s += Σ_rows p·v_r/|V|. The mask's bias, the same for every
   head, is added once, after the max. Each split writes its own partial (no atomics, deterministic);
   the wrapper sums the splits in torch. Grid (B, splits, Lkv / BLOCK_N): blocks start x fastest, so under a
   causal mask the column blocks with the most rows start first (longest first: no long program left for
   the end; H100, batch 8, first pruning layer on the attention's LSE: NeXT 1.314 -> 1.103 ms, Qwen2-VL
   0.282 -> 0.267 ms against the grid (Lkv / BLOCK_N, splits, B), one run,
   benchmarks/h100-2026-12-06-s31-order-scores-kernel-b8.log; end to end not resolved). Under grouped
   keys (GQA) the head loop runs over key heads, and each key tile is loaded once for the query heads
   that share it (Qwen2-VL-7B's 7: first pruning layer at batch 8 on the H100, 0.261 -> 0.242 ms on the
   attention's LSE, benchmarks/h100-2026-12-06-s31-gqa-scores-kernel-b8.log).

Logits are recomputed in pass 2 (2 × the q·kᵀ FLOPs of one head-chunk pass) and never stored.

Numerics follow the torch path: q·kᵀ accumulates in float32 and is rounded to the input dtype (the
torch path multiplies in the model dtype), then ``* scaling + bias`` in float32; masked entries hold
float32's min like ``scoring._allowed_bias``. fp32 inputs use IEEE dots (no TF32), as torch does.
On the attention's own log-sum-exp (ROUND False) the logits stay in float32, as flash computes them.

Masks are read in the kernels (MASK_MODE, the wrapper's CAUSAL / PADDING_2D / BOOL_4D / FLOAT_4D);
nothing (B, R, Lkv) is built. Causal (modes 0 and 1) skips the key blocks past the diagonal; 4D masks make
no causal assumption, so a tile is skipped only when every entry of its mask tile is masked.

Under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is first imported; the tests run the
kernels on the CPU that way) the ``INTERPRET`` constexpr works around two Triton 3.6 interpreter bugs in
bf16; the compiled code never takes that branch. :func:`_jit` and :func:`_interpreting` are shared with
:mod:`fitprune.kernels.fused_select`.
"""

from __future__ import annotations

import os

try:  # optional: CPU installs and CI have no Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None


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
