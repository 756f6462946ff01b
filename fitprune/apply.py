"""Public entry points: put a recipe on a live model, take it off again.

``fitprune.apply(model, recipe)`` works in place (like ``peft.get_peft_model``): it switches the
language model's attention to the scoring twin of its current implementation and adds hooks; all
state lives in ``model._fitprune``. ``fitprune.remove(model)`` (or leaving the ``with`` block)
restores the implementation and removes every hook, leaving the stock model.
"""

from __future__ import annotations

import os

from torch import nn

from . import attention as attn_registry
from .adapters import get_adapter
from .kernels import FUSED_SCORES_ENV
from .prune import Pruner, PruneReport
from .recipe import Recipe, validate_for

__all__ = ["Applied", "apply", "attach", "remove", "last_report", "resolve_fused_scores"]

_ATTR = "_fitprune"


class Applied:
    """Handle returned by :func:`apply`; a context manager whose exit undoes the apply."""

    def __init__(self, model: nn.Module, pruner: Pruner, original_impl: str):
        self.model = model
        self.pruner = pruner
        self.original_impl = original_impl

    @property
    def recipe(self) -> Recipe:
        return self.pruner.recipe

    @property
    def last_report(self) -> PruneReport | None:
        """Token counts the last pruned prefill executed (None before the first one)."""
        return self.pruner.last_report

    def remove(self) -> nn.Module:
        return remove(self.model)

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        if getattr(self.model, _ATTR, None) is self:
            remove(self.model)

    def __repr__(self) -> str:
        r = self.pruner.recipe
        return f"Applied(method={r.method!r}, scoring={r.scoring!r}, layers={r.num_layers}, budget={r.budget})"


def apply(model: nn.Module, recipe: Recipe, *, fused_scores: bool | None = None) -> Applied:
    """Prune ``model``'s visual tokens during prefill as ``recipe`` says. Modifies ``model`` in place.

    Checks the recipe against the model before any compute (family, layer count), refuses a second
    apply, and keeps the language model on its fast attention (SDPA / FlashAttention): scores are
    computed only at layers with a nonzero entry, only for the query rows they need.

    ``fused_scores`` chooses how FitPrune's scores are computed: ``None`` (default) the fused Triton
    kernel wherever it can run (a CUDA device of compute capability 8.0+ with Triton installed), else
    the torch path; ``True`` the kernel, and a ValueError now if it cannot run on the language model's
    device; ``False`` the torch path. Under ``None`` the environment variable FITPRUNE_FUSED_SCORES=0
    means ``False``; it is read here, once, never during a forward.

    >>> with fitprune.apply(model, fitprune.preset("llava-1.5-7b/60")):
    ...     out = model.generate(**inputs, max_new_tokens=32)
    """
    return attach(model, recipe, fused_scores=fused_scores)


def attach(model: nn.Module, recipe: Recipe, probe=None, fused_scores: bool | None = None) -> Applied:
    """:func:`apply` with an optional :class:`fitprune.prune.Probe` (statistics, progressive fit)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"apply() needs a fitprune.Recipe, got {type(recipe).__name__}; load one with Recipe.load(path)")
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError(
            "a fitprune recipe is already applied to this model; call fitprune.remove(model) first"
        )
    adapter = get_adapter(model)
    lm = adapter.language_model(model)
    validate_for(recipe, family=adapter.family, num_layers=len(lm.layers))
    original_impl = lm.config._attn_implementation
    base = original_impl[len(attn_registry.PREFIX):] if original_impl.startswith(attn_registry.PREFIX) else original_impl
    twin = attn_registry.wrapped_name(base)  # raises for unsupported implementations
    pruner = Pruner(model, recipe, adapter, probe=probe, fused_scores=resolve_fused_scores(fused_scores, lm))
    handle = Applied(model, pruner, base)
    lm.set_attn_implementation(twin)
    pruner.install()
    setattr(model, _ATTR, handle)
    return handle


def resolve_fused_scores(setting: bool | None, lm: nn.Module) -> bool | None:
    """The pruner's fused-scores setting: ``setting`` itself, or for None the environment's default
    (FITPRUNE_FUSED_SCORES=0: False, else None = automatic). True is checked against the language
    model's device now, so a wrong setting fails before any compute."""
    if setting is None:
        return False if os.environ.get(FUSED_SCORES_ENV, "1") == "0" else None
    if not isinstance(setting, bool):
        raise TypeError(f"fused_scores must be True, False or None, got {setting!r}")
    if setting:
        from .kernels import fused_scores

        device = next(lm.parameters()).device
        if not fused_scores.supported(device):
            why = "Triton is not installed" if fused_scores.triton is None else f"the language model is on {device}"
            raise ValueError(f"fused_scores=True needs the fused Triton kernel, which runs on a CUDA device of "
                             f"compute capability 8.0+ with Triton installed; {why}. Use fused_scores=None "
                             "(the kernel where it can run) or False (the torch path).")
    return setting


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the stock attention implementation is back and no hook is left."""
    handle = getattr(model, _ATTR, None)
    if handle is None:
        raise RuntimeError("no fitprune recipe is applied to this model")
    handle.pruner.remove()
    handle.pruner.lm.set_attn_implementation(handle.original_impl)
    delattr(model, _ATTR)
    return model


def last_report(model: nn.Module) -> PruneReport | None:
    handle = getattr(model, _ATTR, None)
    return None if handle is None else handle.last_report
