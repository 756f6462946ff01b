"""The MLP of a pruning layer on the surviving rows only, with the fewest full-length copies.

At a layer that drops tokens, the drop is chosen inside attention, after the residual stream of the
layer is already full length. The MLP then runs on the survivors' rows only (gathered before it),
and the layer output keeps only the survivors (gathered after the layer). Between the two, the stock
decoder layer adds the MLP output to the full-length residual, so the MLP output has to be full
length too.

Generic path (any decoder layer): scatter the MLP rows into a zero tensor of the full length; the
layer adds it to the residual; the survivors are gathered from the sum. That writes one full-length
zero tensor and scatters into it at every pruning layer.

Folded path, for decoder layers whose forward ends ``h = self.mlp(h); h = residual + h; return h``
(:func:`feeds_residual`: LLaMA, Mistral, Qwen2, Qwen2-VL and Qwen2.5-VL in transformers 5.x): the MLP
hook hands the layer a broadcast zero (no memory, no kernel), so the layer returns the residual
itself; the survivors' rows of the residual are gathered and the MLP rows added to them. The sum is
bit for bit the generic path's (``x + 0 == x``); it saves the zero fill and the scatter of one
full-length hidden tensor per pruning layer.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch import nn

__all__ = ["feeds_residual", "full_length", "stand_in"]


@functools.cache
def _ends_with_residual_add(layer_type: type, mlp_attr: str) -> bool:
    try:
        source = inspect.getsource(layer_type.forward)
    except (OSError, TypeError):  # no source (compiled, generated): take the generic path
        return False
    attr = re.escape(mlp_attr)
    tail = rf"(\w+) = self\.{attr}\(\1\)\s*\n\s*\1 = residual \+ \1\s*\n\s*return \1\s*$"
    return source.count(f"self.{mlp_attr}(") == 1 and re.search(tail, source.rstrip() + "\n") is not None


def feeds_residual(layer: nn.Module, mlp_attr: str = "mlp") -> bool:
    """True when ``layer``'s forward adds its MLP's output straight to the residual and returns the
    sum, with nothing in between (so the MLP output may be folded in after the layer). Read once per
    class from the forward's source; False whenever that cannot be confirmed."""
    return _ends_with_residual_add(type(layer), mlp_attr)


def full_length(rows: torch.Tensor, sel: torch.Tensor, length: int) -> torch.Tensor:
    """Generic path: the MLP's survivor rows (B, Lc, D) scattered into zeros of (B, length, D)."""
    full = rows.new_zeros(rows.shape[0], length, rows.shape[-1])
    return full.scatter(1, sel[..., None].expand(-1, -1, rows.shape[-1]), rows)


def stand_in(rows: torch.Tensor, length: int, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Folded path: a broadcast zero of (B, length, D) for the layer to add (no memory). ``zero``: a
    0-d zero of ``rows``' dtype and device made earlier (none is filled now: one launch fewer)."""
    zero = rows.new_zeros(()) if zero is None else zero
    return zero.expand(rows.shape[0], length, rows.shape[-1])
