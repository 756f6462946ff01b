"""A pruning layer's causal attention with its log-sum-exp: the kernel stock SDPA runs, asked for both.

FitPrune's scores need every scored row's softmax statistics. Flash attention computes them (its
log-sum-exp, LSE) and ``torch.nn.functional.scaled_dot_product_attention`` drops them, so the fused
scores' first pass (``fitprune.kernels.fused_scores``) recomputed them: a second q·kᵀ over the rows.
:func:`attend` calls the fused kernel SDPA itself picks (flash, memory-efficient or cuDNN attention),
through its aten op with the log-sum-exp requested, and returns
the layer's output exactly as transformers' ``sdpa_attention_forward`` returns it (the same kernel on
the same tensors: the same bits) together with the LSE.

It applies only where that equivalence is certain, and returns None everywhere else (the caller then
runs the stock function): transformers' ``sdpa`` implementation, no mask (plain causal, SDPA's
``is_causal``), keys no longer than the queries (no cached prefix), no dropout, soft-capping or
position bias, and SDPA's own backend choice for these tensors (``torch._fused_sdp_choice``: a user's
``sdpa_kernel`` context is honoured) is one of those three.

Grouped-query attention (fewer key/value heads than query heads: Qwen2-VL's 28 / 4) applies where
transformers hands SDPA the grouped keys with ``enable_gqa`` (its ``use_gqa_in_sdpa``: no mask); the
grouped tensors then go to the aten op of the backend SDPA picks for them, as SDPA passes them.
Checked bit for bit against stock (``tests/test_lse_attention.py``) where SDPA picked cuDNN (H200,
bf16/fp16) and flash (CPU); grouped keys on the flash or memory-efficient CUDA ops are not yet checked.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch.nn.attention import SDPBackend

__all__ = ["attend", "applies", "backend"]

_FLASH, _EFFICIENT, _CUDNN = (int(b) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.CUDNN_ATTENTION))


def backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> int | None:
    """The fused backend stock SDPA picks for causal attention on these tensors (``enable_gqa`` where
    the key heads are fewer), where it is one whose aten op also returns the log-sum-exp (flash,
    memory-efficient or cuDNN on CUDA; flash on the CPU); else None."""
    grouped = key.shape[1] != query.shape[1]
    choice = int(torch._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scaling, enable_gqa=grouped))
    usable = (_FLASH, _EFFICIENT, _CUDNN) if query.is_cuda else (_FLASH,)
    return choice if choice in usable else None


@functools.cache
def _stock_gqa_rule():
    """transformers' own test of whether its SDPA path passes grouped keys with ``enable_gqa`` (None
    where this transformers has none: grouped keys then decline)."""
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
    except ImportError:
        return None
    return use_gqa_in_sdpa, len(inspect.signature(use_gqa_in_sdpa).parameters)


def _stock_passes_grouped(mask, key: torch.Tensor, value: torch.Tensor) -> bool:
    rule = _stock_gqa_rule()
    if rule is None:
        return False
    fn, n_params = rule
    return bool(fn(mask, key, value) if n_params >= 3 else fn(mask, key))


def applies(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, scaling: float,
            kwargs: dict) -> int | None:
    """SDPA's backend for this call (a nonzero :class:`SDPBackend` value) when :func:`attend` reproduces
    stock SDPA attention for it (module doc), else None; pass it on to :func:`attend`."""
    if mask is not None or kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None:
        return None
    if kwargs.get("position_bias") is not None or kwargs.get("is_causal") is False:
        return None
    if not getattr(module, "is_causal", True):
        return None
    q_len, heads, kv_heads = query.shape[2], query.shape[1], key.shape[1]
    groups = getattr(module, "num_key_value_groups", 1)
    if q_len < 2 or key.shape[2] != q_len or value.shape[1] != kv_heads or kv_heads * groups != heads:
        return None
    if groups > 1 and not _stock_passes_grouped(mask, key, value):  # stock would repeat the keys first
        return None
    if query.shape[-1] % 8 or value.shape[-1] != query.shape[-1]:  # SDPA would pad the head dim first
        return None
    if query.device.type not in ("cuda", "cpu") or torch.is_grad_enabled() and query.requires_grad:
        return None
    return backend(query, key, value, scaling)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, choice: int | None = None):
    """``(output, lse)`` of causal attention on (B, H, L, hd) queries and (B, Hkv, L, hd) keys/values
    (Hkv divides H) by the backend SDPA picks: ``output`` (B, L, H, hd) contiguous, as
    ``sdpa_attention_forward`` returns it; ``lse`` (B, H, L) float32 (a view), natural log of the row
    sums of exp(scaling · q·kᵀ). Call only where :func:`applies` gave a backend; ``choice``: that
    backend (None: asked of SDPA again)."""
    choice = backend(query, key, value, scaling) if choice is None else choice
    if not query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                               scale=scaling)
    elif choice == _FLASH:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False,
                                                                       scale=scaling)[:2]
    elif choice == _EFFICIENT:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0, True,
                                                                           scale=scaling)[:2]
    elif choice == _CUDNN:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True,
                                                                       False, scale=scaling)[:2]
    else:
        raise RuntimeError(f"lse_attention.attend: SDPA picks backend {choice} here, which returns no "
                           "log-sum-exp; call applies() first")
    bsz, heads, length = query.shape[:3]
    while lse.dim() > 3 and lse.shape[-1] == 1:  # cuDNN: (B, H, L, 1)
        lse = lse.squeeze(-1)
    lse = lse[..., :length]  # memory-efficient: rows padded to a multiple of 32
    if tuple(lse.shape) != (bsz, heads, length):
        raise RuntimeError(f"lse_attention: backend {choice} returned a log-sum-exp of shape {tuple(lse.shape)}, "
                           f"expected {(bsz, heads, length)}")
    return out.transpose(1, 2).contiguous(), lse.float()
