"""Static KV caches at the pruned lengths: a pruned prefill that stock ``generate`` decodes compiled.

A stock ``StaticCache`` (``generate(..., cache_implementation="static")``) gives every layer one
buffer of ``max_cache_len`` slots, so the decode step has fixed shapes and transformers compiles it
(``torch.compile``, CUDA graphs on a GPU): the fastest decode stock transformers offers. A pruned
prefill leaves layer ``l`` with only the ``n_l`` slots it kept, so those buffers do not fit it.

When a recipe's prefill receives a ``StaticCache``, the pruner swaps each of its layers for a
:class:`PrunedStaticLayer` (:func:`convert`) and arms it (:func:`arm`). An armed layer takes the
prefill's keys and values as they are, like a ``DynamicCache`` layer, so the prefill runs exactly as
with the default cache. At the end of the prefill (:func:`finish_prefill`) each layer lays them into
a static buffer of ``n_l + room`` slots, where ``room = max_cache_len - prompt length`` is what the
decode steps may add. From then on it is a stock static layer over that shorter buffer: fixed shapes,
in-place writes at its own fill count, a tensor counter, static addresses. The decode step's masks
are built for ``max_cache_len`` columns in original positions (what layer 0 reports) and re-sliced
per layer by :func:`fitprune.reslice.decode_mask`, whose output has exactly ``n_l + room`` columns.

The buffers are reused by the next prefill whenever it gives a layer the same length (the same
recipe on prompts of one geometry), so the compiled decode keeps its static addresses from one
``generate`` call to the next. A layer that was not armed (the cache reused after the recipe was
removed) behaves as a stock ``StaticLayer``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache, StaticLayer

__all__ = ["PrunedStaticLayer", "arm", "armed", "convert", "decoding", "finish_prefill", "is_pruned_static", "prefill_kwargs"]

STOCK, PREFILL, PENDING, DECODE = "stock", "prefill", "pending", "decode"


class PrunedStaticLayer(StaticLayer):
    """A static cache layer whose buffer holds the slots the pruned prefill kept plus the decode room.

    ``max_cache_len`` stays the stock value (the length of the decode masks, in original positions);
    the buffer may be shorter. ``mode``: ``stock`` (not armed: a stock ``StaticLayer``), ``prefill``
    (armed, waiting for the prefill's states), ``pending`` (holding them as given), ``decode`` (laid
    into the static buffer).
    """

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len, **kwargs)
        self.mode = STOCK
        self.room = 0
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # static keys, values

    @classmethod
    def replacing(cls, layer: StaticLayer) -> "PrunedStaticLayer":
        new = cls(layer.max_cache_len)
        if layer.is_initialized:  # keep the stock buffers: a later stock use needs no new allocation
            new._buffers = (layer.keys, layer.values)
            new.cumulative_length = layer.cumulative_length
        return new

    # ------------------------------------------------------------------ the pruner's calls
    def arm(self, prompt_len: int) -> None:
        if prompt_len > self.max_cache_len:
            raise ValueError(f"the prompt has {prompt_len} tokens but the static cache holds {self.max_cache_len}; "
                             "make the cache longer (max_cache_len) or the prompt shorter")
        self.mode, self.room = PREFILL, self.max_cache_len - prompt_len
        self.keys = self.values = None
        self.is_initialized = False

    def finish_prefill(self) -> None:
        """Lay the prefill's states into the static buffer (reused when its shape fits)."""
        if self.mode != PENDING:
            raise RuntimeError(f"finish_prefill on a layer in mode {self.mode!r}: the prefill did not reach it")
        keys, values = self.keys, self.values
        n = keys.shape[-2]
        k_buf, v_buf = self._fitting(keys, values, n + self.room)
        k_buf[:, :, :n].copy_(keys)
        v_buf[:, :, :n].copy_(values)
        if self.room:
            k_buf[:, :, n:].zero_()
            v_buf[:, :, n:].zero_()
        self.keys, self.values = k_buf, v_buf
        self.cumulative_length.fill_(n)
        self.mode = DECODE

    def _fitting(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        """Static buffers of ``length`` slots for states like ``keys``/``values``: the last ones if they fit."""
        old = self._buffers
        shape_k = (*keys.shape[:2], length, keys.shape[-1])
        shape_v = (*values.shape[:2], length, values.shape[-1])
        if (old is not None and tuple(old[0].shape) == shape_k and tuple(old[1].shape) == shape_v
                and old[0].dtype == keys.dtype and old[0].device == keys.device):
            return old
        k_buf = torch.zeros(shape_k, dtype=keys.dtype, device=keys.device)
        v_buf = torch.zeros(shape_v, dtype=values.dtype, device=values.device)
        counter = torch.zeros((), dtype=torch.long, device=keys.device)
        for t in (k_buf, v_buf, counter):
            torch._dynamo.mark_static_address(t)
        self._buffers, self.cumulative_length = (k_buf, v_buf), counter
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True
        return self._buffers

    # ------------------------------------------------------------------ the cache-layer interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.mode == PREFILL:  # the prefill: keep what the layer gives, as a DynamicCache layer does
            self.keys, self.values = key_states, value_states
            self.is_initialized = True
            self.mode = PENDING
            return key_states, value_states
        if self.mode == PENDING:
            raise RuntimeError("a second update before the pruned prefill was laid into the static cache; "
                               "fitprune's cache handles one prefill call, then decode steps")
        if self.mode == STOCK and (not self.is_initialized or self.keys is None
                                   or self.keys.shape[-2] != self.max_cache_len):
            self._stock_buffers(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)

    def _stock_buffers(self, key_states, value_states) -> None:
        self.keys, self.values = self._fitting(key_states, value_states, self.max_cache_len)
        self.keys.zero_()
        self.values.zero_()
        self.cumulative_length.zero_()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.mode in (PREFILL, PENDING):
            return (self.keys.shape[-2] if self.mode == PENDING else 0) + query_length, 0
        return self.max_cache_len, 0

    def get_seq_length(self):
        if self.mode == PREFILL or not self.is_initialized:
            return 0
        if self.mode == PENDING:
            return self.keys.shape[-2]
        return self.cumulative_length

    def reset(self) -> None:
        super().reset()
        self.mode = STOCK

    def __repr__(self) -> str:
        length = None if self.keys is None else self.keys.shape[-2]
        return f"PrunedStaticLayer(mode={self.mode}, slots={length}, max_cache_len={self.max_cache_len})"


def is_pruned_static(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and isinstance(layers[0], PrunedStaticLayer)


def convert(cache) -> bool:
    """Swap a ``StaticCache``'s layers for :class:`PrunedStaticLayer` (once). True if ``cache`` is
    one fitprune can prune into; False for every other kind of cache."""
    if is_pruned_static(cache):
        return True
    if not isinstance(cache, StaticCache):
        return False
    layers = cache.layers
    kinds = {type(layer).__name__ for layer in layers}
    if kinds != {"StaticLayer"}:
        raise NotImplementedError(
            f"fitprune prunes into static caches of plain full-attention layers; this one has {sorted(kinds)}. "
            "Use the default cache (no cache_implementation) for this model while a recipe is applied."
        )
    cache.layers = [PrunedStaticLayer.replacing(layer) for layer in layers]
    return True


def arm(cache, prompt_len: int) -> None:
    for layer in cache.layers:
        layer.arm(prompt_len)


def prefill_kwargs(kwargs: dict, prompt_len: int) -> dict:
    """The model's prefill kwargs with a prepared 4-D mask cut to the prompt's columns.

    ``generate`` builds the prefill's mask for a static cache before the forward, as wide as the
    stock buffers (``max_cache_len`` columns, the ones past the prompt masked). An armed layer attends
    to the prompt's states only, as a ``DynamicCache`` layer does, so its mask has the prompt's width."""
    mask = kwargs.get("attention_mask")

    def cut(m):
        return m[..., :prompt_len] if isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[-1] > prompt_len else m

    if isinstance(mask, dict):
        return {**kwargs, "attention_mask": {k: cut(v) for k, v in mask.items()}}
    if isinstance(mask, torch.Tensor):
        return {**kwargs, "attention_mask": cut(mask)}
    return kwargs


def finish_prefill(cache) -> None:
    for layer in cache.layers:
        layer.finish_prefill()


def armed(cache) -> bool:
    """True while a pruned static cache waits for its prefill's states."""
    return is_pruned_static(cache) and cache.layers[0].mode == PREFILL


def decoding(cache) -> bool:
    """True when a forward with ``cache`` is a decode step (the cache holds a prompt). For a pruned
    static cache this reads the host-side mode only, so a compiled decode step never syncs on it."""
    if is_pruned_static(cache):
        return cache.layers[0].mode == DECODE
    return cache.get_seq_length() > 0
