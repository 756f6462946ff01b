"""Baseline pruning methods, expressed as recipes (DESIGN §2, "Baselines, as recipes").

Every method is a per-layer drop schedule plus a scoring rule, so the engine runs them all through
one code path and the sweep compares them at equal predicted FLOPs (:func:`for_budget`).

Layer convention shared with FastV (arXiv 2403.06764) and PDrop (arXiv 2410.17247): "prune at layer
K" means the tokens are gone from layer K (0-based) onward, chosen by the attention of layer K-1. Our
engine drops right after a layer's attention using that layer's scores, so the entry goes at index
K-1. The one difference: layer K-1's MLP also runs on the pruned set here (slightly cheaper than the
original methods, identical attention scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real

from .flops import ModelDims, recipe_reduction
from .recipe import Recipe, RecipeError

__all__ = ["FAMILIES", "VISIONZIP_CONTEXTUAL", "dart", "divprune", "fastv", "for_budget", "pyramid", "random_recipe", "uniform",
           "visionzip"]

VISIONZIP_CONTEXTUAL = 10 / 64  # share of the kept tokens that VisionZip merges (54 dominant + 10 contextual of 64)
FAMILIES = {"visionzip": ("llava",)}  # methods that need a model layout only some families have (others: all)


def _check_layers(num_layers: int) -> int:
    if not isinstance(num_layers, Integral) or isinstance(num_layers, bool) or num_layers < 1:
        raise RecipeError(f"num_layers must be a positive integer (decoder layers), got {num_layers!r}")
    return int(num_layers)


def _check_fraction(name: str, value: float) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or not 0 <= value <= 1:
        raise RecipeError(f"{name} = {value!r}: must be a number in [0, 1]")
    return float(value)


def fastv(num_layers: int, *, layer: int = 2, ratio: float = 0.5, family: str | None = None) -> Recipe:
    """FastV: drop ``ratio`` of the visual tokens at layer ``K = layer``, scored by the last token's
    head-mean attention of layer K-1 (FastV's defaults K=2, R=50 %).

    Returns a recipe with one nonzero entry, ``drop_fractions[K-1] = R``, shape ``(num_layers,)``.
    """
    n = _check_layers(num_layers)
    if not isinstance(layer, Integral) or isinstance(layer, bool) or not 1 <= layer <= n:
        raise RecipeError(
            f"FastV layer K = {layer!r}: must be an integer in [1, {n}] (tokens are gone from layer K on)"
        )
    r = _check_fraction("FastV ratio R", ratio)
    fractions = [0.0] * n
    fractions[layer - 1] = r
    return Recipe(
        tuple(fractions), scoring="fastv", method="fastv", family=family, metadata={"K": int(layer), "R": r}
    )


def dart(num_layers: int, *, layer: int = 2, ratio: float = 0.5, family: str | None = None) -> Recipe:
    """DART (arXiv 2502.11494): drop ``ratio`` of the visual tokens at layer ``K = layer`` (default 2), keeping
    the pivots and the tokens least duplicated with them (:func:`fitprune.selection.dart_drops`)."""
    recipe = fastv(num_layers, layer=layer, ratio=ratio, family=family)
    return recipe.with_updates(scoring="dart", method="dart")


def divprune(num_layers: int, *, ratio: float, family: str | None = None) -> Recipe:
    """DivPrune (arXiv 2503.02175): remove ``ratio`` of the visual tokens before the language model, keeping
    a max-min diverse subset of their embeddings (:func:`fitprune.selection.divprune_keep`)."""
    n = _check_layers(num_layers)
    r = _check_fraction("DivPrune ratio", ratio)
    return Recipe((0.0,) * n, scoring="divprune", method="divprune", family=family, input_fraction=r,
                  metadata={"R": r})


def visionzip(num_layers: int, *, ratio: float, contextual: float = VISIONZIP_CONTEXTUAL,
              family: str | None = None) -> Recipe:
    """VisionZip (arXiv 2412.04467): remove ``ratio`` of the visual tokens before the language model; of the
    kept ones a share ``contextual`` are merged tokens, the rest dominant by the vision tower's CLS attention
    (:func:`fitprune.selection.visionzip_select`). The recipe says it changes token values (``merge_fraction``)."""
    n = _check_layers(num_layers)
    r = _check_fraction("VisionZip ratio", ratio)
    c = _check_fraction("VisionZip contextual share", contextual)
    return Recipe((0.0,) * n, scoring="visionzip", method="visionzip", family=family, input_fraction=r,
                  merge_fraction=(1.0 - r) * c, metadata={"R": r, "contextual": c})


def uniform(
    num_layers: int,
    *,
    ratio: float,
    start: int = 1,
    end: int | None = None,
    family: str | None = None,
    scoring: str = "fitprune",
) -> Recipe:
    """Drop a total fraction ``ratio`` of the visual tokens, ``ratio / (end - start)`` after each layer
    in ``[start, end)`` (``end`` defaults to ``num_layers``).

    Counts are floored per layer (:meth:`Recipe.drop_counts`), so the tokens actually removed can
    fall short of ``ratio · n_visual`` by up to one per layer.
    """
    n = _check_layers(num_layers)
    end = n if end is None else end
    if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in (start, end)) or not 0 <= start < end <= n:
        raise RecipeError(f"uniform layers [start={start!r}, end={end!r}): need integers with 0 <= start < end <= {n}")
    r = _check_fraction("uniform ratio", ratio)
    per = r / (end - start)
    fractions = tuple(per if start <= i < end else 0.0 for i in range(n))
    return Recipe(
        fractions,
        scoring=scoring,
        method="uniform",
        family=family,
        metadata={"ratio": r, "start": int(start), "end": int(end)},
    )


def pyramid(
    num_layers: int,
    *,
    keep: float = 0.5,
    stages: Sequence[int] | None = None,
    family: str | None = None,
    scoring: str = "fastv",
) -> Recipe:
    """PDrop-style pyramid: at each stage layer K keep ``keep`` of the visual tokens still alive.

    ``stages`` are layers K in FastV's sense (tokens gone from K on; entry at index K-1), default the
    quarter points ``(L//4, L//2, 3L//4)``. As fractions of the initial count, stage ``i`` drops
    ``(1 - keep) · keep**i``; ``keep**len(stages)`` of the tokens survive.
    """
    n = _check_layers(num_layers)
    if stages is None:
        stages = sorted({k for k in (n // 4, n // 2, 3 * n // 4) if k >= 1})
    stages = list(stages)
    ok = all(isinstance(k, Integral) and not isinstance(k, bool) and 1 <= k <= n for k in stages)
    if not stages or not ok or any(a >= b for a, b in zip(stages, stages[1:])):
        raise RecipeError(
            f"pyramid stages {stages!r}: need a non-empty, strictly increasing list of layers in [1, {n}]"
        )
    kp = _check_fraction("pyramid keep", keep)
    fractions = [0.0] * n
    for i, k in enumerate(stages):
        fractions[k - 1] = (1.0 - kp) * kp**i
    return Recipe(
        tuple(fractions),
        scoring=scoring,
        method="pyramid",
        family=family,
        metadata={"keep": kp, "stages": [int(k) for k in stages]},
    )


def random_recipe(schedule: Recipe, seed: int = 0) -> Recipe:
    """The same per-layer schedule as ``schedule``, but the dropped tokens are picked at random."""
    if not isinstance(schedule, Recipe):
        raise RecipeError(f"random_recipe needs a Recipe to copy the schedule from, got {type(schedule).__name__}")
    meta = {**schedule.metadata, "schedule_method": schedule.method}
    return schedule.with_updates(scoring="random", method="random", seed=seed, metadata=meta, merge_fraction=0.0)


def for_budget(
    builder: Callable[[float], Recipe],
    dims: ModelDims,
    budget: float,
    n_visual: int,
    n_other: int = 0,
    convention: str = "full",
    tol: float = 1e-4,
) -> Recipe:
    """The recipe ``builder(p)`` with the smallest ``p`` in [0, 1] whose predicted reduction ≥ ``budget``.

    ``builder`` maps one scalar (e.g. FastV's R, a pyramid's ``1 - keep``) to a recipe, and the
    reduction (:func:`fitprune.flops.recipe_reduction` for ``n_visual`` visual and ``n_other`` other
    tokens) must not decrease with it. Bisection stops at a bracket narrower than ``tol`` and returns
    the feasible end. The result carries ``budget``, ``flops_convention`` and, in ``metadata``,
    ``predicted_reduction``, ``parameter``, ``fit_n_visual``, ``fit_n_other``.
    """
    b = _check_fraction("budget", budget)
    if b >= 1:
        raise RecipeError(f"budget = {budget!r}: must be in [0, 1) (the fraction of prefill FLOPs to remove)")
    if not isinstance(tol, Real) or not tol > 0:
        raise RecipeError(f"tol = {tol!r}: must be a positive number")

    def evaluate(p: float) -> tuple[Recipe, float]:
        recipe = builder(p)
        if not isinstance(recipe, Recipe):
            raise RecipeError(f"builder({p}) returned {type(recipe).__name__}, expected a Recipe")
        return recipe, recipe_reduction(recipe, dims, n_visual, n_other, convention)

    best, achieved = evaluate(1.0)
    if achieved < b:
        raise RecipeError(
            f"budget {b:.4f} is out of reach for {best.method!r}: even at parameter 1.0 it removes only "
            f"{achieved:.4f} of prefill FLOPs ({convention!r} convention, n_visual={n_visual}, n_other={n_other}); "
            "lower the budget or use a method that prunes earlier"
        )
    lo, hi = 0.0, 1.0
    low, low_red = evaluate(0.0)
    if low_red >= b:
        best, achieved, hi = low, low_red, 0.0
    else:
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            recipe, red = evaluate(mid)
            if red >= b:
                hi, best, achieved = mid, recipe, red
            else:
                lo = mid
    meta = {
        **best.metadata,
        "predicted_reduction": achieved,
        "parameter": hi,
        "fit_n_visual": int(n_visual),
        "fit_n_other": int(n_other),
    }
    return best.with_updates(budget=b, flops_convention=convention, metadata=meta)
