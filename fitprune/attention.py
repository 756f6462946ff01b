"""The scoring attention function, registered with transformers' attention and mask interfaces.

For every stock implementation (``sdpa``, ``eager``, ``flash_attention_2``/``_3``) we register a
``fitprune_<name>`` twin. It gives the pruner a look at the layer's post-RoPE queries and keys
(only when the pruner asks for that layer), then calls the stock function for the real output, so
the model never falls back to global eager attention. A callback with a ``wants_lse(query, mask)``
attribute that says True gets the attention's log-sum-exp too (``lse=``): under ``sdpa``, where
:mod:`fitprune.lse_attention` applies, the twin runs the kernel SDPA picks (flash, memory-efficient or
cuDNN) itself and hands the LSE over. The mask function must be registered too: registering only the
attention function silently drops the padding mask (DESIGN.md §3).
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import lse_attention

__all__ = ["PREFIX", "SUPPORTED", "observe", "unobserve", "wrapped_name"]

PREFIX = "fitprune_"
SUPPORTED = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")

# attention module -> callback(module, query, key, attention_mask, scaling)
_OBSERVERS: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()


def observe(module: nn.Module, callback: Callable) -> None:
    _OBSERVERS[module] = callback


def unobserve(module: nn.Module) -> None:
    _OBSERVERS.pop(module, None)


def _stock_function(base: str, module: nn.Module) -> Callable:
    if base == "eager":  # eager lives in each model's own module, not in the global registry
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _make(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        callback = _OBSERVERS.get(module)
        if callback is not None:
            scaling = kwargs.get("scaling", module.scaling)
            wants_lse = getattr(callback, "wants_lse", None)
            choice = None
            if base == "sdpa" and wants_lse is not None and wants_lse(query, attention_mask):
                choice = lse_attention.applies(module, query, key, value, attention_mask, scaling, kwargs)
            if choice:
                output, lse = lse_attention.attend(query, key, value, scaling, choice)  # stock SDPA's kernel and bits
                callback(module, query, key, attention_mask, scaling, lse=lse)
                return output, None
            callback(module, query, key, attention_mask, scaling)
        return _stock_function(base, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def wrapped_name(base: str) -> str:
    """The registered twin of a stock implementation, registering it on first use."""
    if base not in SUPPORTED:
        raise ValueError(
            f"fitprune cannot score with attention implementation {base!r}; "
            f"load the model with attn_implementation in {SUPPORTED} (sdpa is the default)"
        )
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make(base))
        mask_base = "sdpa" if base == "sdpa" else base
        if mask_base.startswith("flash_attention"):
            mask_base = "flash_attention_2"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])
    return name
