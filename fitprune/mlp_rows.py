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
hook hands the layer :func:`survivors`, a broadcast zero (no memory, no kernel) that carries the MLP
rows and the survivors' slots. The layer's own last step, ``residual + h``, then gathers the
survivors' rows of the residual and adds the MLP rows to them, and the layer returns the compacted
rows. Against the generic path this saves the zero fill, the scatter, the full-length sum and the
gather of the sum: one gather and one add of the survivors' rows are left. Each value is the stock
sum of the same two numbers (the generic path's equal too, up to the sign of a zero: ``-0 + 0``).
Should anything else be done with the stand-in, it behaves as the broadcast zero, the layer returns
the full-length residual, and the pruner gathers and adds after the layer (:attr:`Survivors.taken`
tells it which happened).

Where the MLP's input is a norm of that same residual (``residual = h; h = self.norm(h); h =
self.mlp(h)``, :func:`norm_before_mlp`: every folded family above), the pruner gathers the survivors'
rows at the norm's input instead of the MLP's. The norm then runs on the survivors too, and the
residual sum reuses the gathered rows: one gather per pruning layer instead of two, and no norm of
rows about to be dropped. Each row's norm depends on that row alone; the tests find the same bits as
the full-length norm gathered (on the CPU, and in bf16 on the H100).
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch import nn

from .profiling import stage
from .rows import put_rows, take_rows

__all__ = ["Survivors", "feeds_residual", "full_length", "norm_before_mlp", "stand_in", "survivors"]


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


@functools.cache
def _norm_feeding_mlp(layer_type: type, mlp_attr: str) -> str | None:
    if not _ends_with_residual_add(layer_type, mlp_attr):
        return None
    source = inspect.getsource(layer_type.forward)  # readable: the check above read it
    attr = re.escape(mlp_attr)
    tail = (rf"residual = (\w+)\s*\n\s*\1 = self\.(\w+)\(\1\)\s*\n\s*\1 = self\.{attr}\(\1\)\s*\n"
            rf"\s*\1 = residual \+ \1\s*\n\s*return \1\s*$")
    found = re.search(tail, source.rstrip() + "\n")
    if found is None or source.count(f"self.{found[2]}(") != 1:
        return None
    return found[2]


def norm_before_mlp(layer: nn.Module, mlp_attr: str = "mlp") -> nn.Module | None:
    """The module between the residual and the MLP of a folding layer (:func:`feeds_residual`), where
    its forward ends ``residual = h; h = self.<norm>(h); h = self.mlp(h); h = residual + h; return h``
    (the post-attention norm of LLaMA, Mistral, Qwen2 and Qwen2-VL): its input is the residual the MLP
    output is added to. None where the source does not say so. The pruner gathers the survivors' rows
    at that module's input, so the norm and the MLP run on the survivors and the residual sum reuses
    the rows (:func:`survivors` with ``gathered``)."""
    name = _norm_feeding_mlp(type(layer), mlp_attr)
    module = getattr(layer, name, None) if name is not None else None
    return module if isinstance(module, nn.Module) else None


def full_length(rows: torch.Tensor, sel: torch.Tensor, length: int) -> torch.Tensor:
    """Generic path: the MLP's survivor rows (B, Lc, D) scattered into zeros of (B, length, D)."""
    return put_rows(rows, sel, length)


def stand_in(rows: torch.Tensor, length: int, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Folded path: a broadcast zero of (B, length, D) for the layer to add (no memory). ``zero``: a
    0-d zero of ``rows``' dtype and device made earlier (none is filled now: one launch fewer)."""
    zero = rows.new_zeros(()) if zero is None else zero
    return zero.expand(rows.shape[0], length, rows.shape[-1])


_ADDS = {torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add, torch.add}


class Survivors(torch.Tensor):
    """The folded MLP output of a pruning layer (:func:`survivors`): a broadcast zero of (B, L, D) whose
    sum with a full-length tensor is that tensor's survivor rows plus the MLP rows, (B, Lc, D). Any
    other operation sees the plain broadcast zero. ``taken`` turns True when the sum was taken."""

    rows: torch.Tensor
    sel: torch.Tensor
    taken: bool
    source: torch.Tensor | None  # the residual whose survivors' rows were gathered already ...
    gathered: torch.Tensor | None  # ... and those rows

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _ADDS and not kwargs and len(args) == 2:
            a, b = args
            me, other = (a, b) if isinstance(a, Survivors) else (b, a)
            if (isinstance(me, Survivors) and not isinstance(other, Survivors) and isinstance(other, torch.Tensor)
                    and other.shape == me.shape and other.dtype == me.rows.dtype):
                me.taken = True
                with torch._C.DisableTorchFunctionSubclass(), stage("compaction"):
                    rows = me.gathered if other is me.source else take_rows(other, me.sel)  # source None: gather
                    return rows + me.rows
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def survivors(rows: torch.Tensor, sel: torch.Tensor, length: int, zero: torch.Tensor | None = None,
              gathered: tuple[torch.Tensor, torch.Tensor] | None = None) -> Survivors:
    """Folded path: the MLP rows (B, Lc, D) of the survivors ``sel`` (B, Lc), handed to the layer as a
    broadcast zero of (B, ``length``, D) that compacts the layer's residual sum (:class:`Survivors`).
    ``zero``: as in :func:`stand_in`. ``gathered``: (residual, its rows ``sel``) taken earlier (at the
    norm before the MLP, :func:`norm_before_mlp`); a sum with that very residual reuses the rows."""
    out = torch.Tensor._make_subclass(Survivors, stand_in(rows, length, zero))
    out.rows, out.sel, out.taken = rows, sel, False
    out.source, out.gathered = gathered if gathered is not None else (None, None)
    return out
