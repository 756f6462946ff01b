"""A pruning layer's causal attention with its log-sum-exp: the kernel stock SDPA runs, asked for both.

FitPrune's scores need every scored row's softmax statistics. Flash attention computes them (its
log-sum-exp, LSE) and ``torch.nn.functional.scaled_dot_product_attention`` drops them, so the fused
scores' first pass (``fitprune.kernels.fused_scores``) recomputed them: a second q·kᵀ over the rows.
:func:`attend` calls the flash kernel that SDPA itself would pick, through its aten op, and returns
the layer's output exactly as transformers' ``sdpa_attention_forward`` returns it (the same kernel on
the same tensors: the same bits) together with the LSE.

It applies only where that equivalence is certain, and returns None everywhere else (the caller then
runs the stock function): transformers' ``sdpa`` implementation, no mask (plain causal, SDPA's
``is_causal``), as many key/value heads as query heads, keys no longer than the queries (no cached
prefix), no dropout, soft-capping or position bias, and SDPA's own backend choice for these tensors is
flash attention (``torch._fused_sdp_choice``: a user's ``sdpa_kernel`` context is honoured).
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

__all__ = ["attend", "applies"]

_FLASH = int(SDPBackend.FLASH_ATTENTION)


def applies(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, scaling: float,
            kwargs: dict) -> bool:
    """True when :func:`attend` reproduces stock SDPA attention for this call (module doc)."""
    if mask is not None or kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("is_causal") is False:
        return False
    if not getattr(module, "is_causal", True) or getattr(module, "num_key_value_groups", 1) != 1:
        return False
    q_len = query.shape[2]
    if q_len < 2 or key.shape[2] != q_len or key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
        return False
    if query.shape[-1] % 8 or value.shape[-1] != query.shape[-1]:  # SDPA would pad the head dim first
        return False
    if query.device.type not in ("cuda", "cpu") or torch.is_grad_enabled() and query.requires_grad:
        return False
    return torch._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scaling) == _FLASH


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
    """``(output, lse)`` of causal attention on (B, H, L, hd) tensors: ``output`` (B, L, H, hd)
    contiguous, as ``sdpa_attention_forward`` returns it; ``lse`` (B, H, L) float32, natural log of the
    row sums of exp(scaling · q·kᵀ). Call only where :func:`applies` said True."""
    if query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False,
                                                                       scale=scaling)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                               scale=scaling)
    return out.transpose(1, 2).contiguous(), lse
