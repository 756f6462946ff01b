"""Fit FitPrune recipes to FLOPs budgets: bisect α of the α-walk (:mod:`fitprune.alpha_walk`).

DESIGN §2, "Fitting" (the *statistical* evaluation): for a tolerance α in [0, 1], walk the decoder
layers in order; at each layer every sample drops the intersection of two sets of its alive visual
tokens — the longest prefix in ascending cross score ``c`` whose removal keeps the surviving cross
mass ``>= (1 - α) * C_l``, and likewise in self score ``s`` against ``(1 - α) * S_l`` — unless the
budget check before that layer says the forward already fits the budget. The recipe entry of a
layer is the floor of the per-sample drop count averaged over samples. α is binary-searched to the
smallest value whose recipe meets the budget.

Facts taken from the authors' code (github.com/ywh187/FitPrune,
``LLaVA_1.5/llava/eval/statistical_analysis.py``; functions named, line numbers approximate; no
code copied):

* ``fit_model`` (~l. 124-143), the per-layer loop: *before* layer ``l`` prunes, the predicted cost
  is "what was spent in layers < l" plus "every layer from ``l`` on at the current token counts",
  summed over samples and divided by their number, compared with ``(1 - budget) * unpruned``; when
  it fits, the layer loop breaks, so pruning stops for *all* samples at once (``stop="mean"``,
  our default). ``stop="sample"`` stops each sample on its own cost instead.
* ``rest_flops`` (~l. 98) / ``calculate_origin_flops`` (~l. 279): the costs are the
  ``"fitprune-paper"`` convention (visual tokens only); under ``"full"`` the same check counts
  system + text tokens too.
* The prefix rule (~l. 225-235): the first ``i`` with ``sum - sum(sorted[:i]) < C_ref - α * C_ref``
  gives ``max(i - 1, 0)`` drops, i.e. the longest prefix whose surviving mass stays ``>=`` the
  threshold (none when even keeping everything falls short). Their loop never tests dropping
  *all* tokens and reuses a stale count when no ``i`` breaks (α near 1); here every prefix length
  0..n is allowed, so α = 1 drops every alive token.
* Intersection (~l. 237-241): tokens in both prefixes (``unique(..., return_counts) > 1``); the
  scheme is ``scheme[l] // n_samples`` (~l. 274, floor of the mean).
* ``statistical_analysis`` (~l. 327): bisection on [0, 1] while the bracket is wider than 0.01,
  deciding on the walk's own budget flag and printing the *last midpoint's* scheme, which may
  miss the budget. When that midpoint never reached the budget the walk never stopped, which is
  why the published recipes prune a little in almost every layer (their 90 % recipe removes
  89.68 %). Here feasibility is decided on the final floored recipe's predicted reduction and the
  **feasible** end of the bracket is returned.

This is the sweep's ``fitprune-paper`` method, the faithful reproduction. The default ``fitprune``
method is the divergence search (:mod:`fitprune.search`), which uses these walks as seeds.

Beyond the authors: the feasible recipe is *trimmed* to the budget at token granularity, and a
budget grid is made *monotone* (see :func:`fit`).

Speed: the walk without a stop depends on neither the budget nor the FLOPs convention; a
budget's stop only truncates it. So each α is walked once (sort orders precomputed per layer, all
samples at once with numpy) and shared by every budget of a :func:`fit` call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from .alpha_walk import STOP_RULES, Prepared, check_budget, check_stop, mean_counts, truncate, walk
from .calibration import CalibrationStats
from .cost import FEASIBLE_EPS, BudgetCheck, LayerCost, check_inputs, other_tokens, predicted_reduction, reduction
from .cost import trim_counts as _trim
from .flops import ModelDims
from .recipe import Recipe

__all__ = ["STOP_RULES", "FitResult", "fit", "predicted_reduction", "walk"]


@dataclass(frozen=True)
class FitResult:
    """One fitted budget.

    ``per_layer_mass_loss[l]`` / ``per_layer_self_mass_loss[l]`` (each shape ``(num_layers,)``): the
    mean over samples of the fraction of layer ``l``'s reference mass ``C_l`` / ``S_l`` held by the
    tokens the α-walk (at ``alpha``, with its budget stop, before trimming) had dropped by the end
    of layer ``l``. ``iterations`` counts the α values tried (walks, cached ones included).
    """

    recipe: Recipe
    alpha: float
    predicted_reduction: float
    feasible: bool
    per_layer_mass_loss: tuple[float, ...]
    per_layer_self_mass_loss: tuple[float, ...]
    iterations: int

    @property
    def budget(self) -> float:
        return float(self.recipe.budget)


# -- the fit --------------------------------------------------------------------------------------


@dataclass
class _Trial:
    alpha: float
    counts: list[int]
    n_ref: int
    reduction: float
    stop_layer: np.ndarray


def fit(
    stats: CalibrationStats,
    budgets: Sequence[float],
    dims: ModelDims,
    *,
    convention: str = "full",
    family: str | None = None,
    tol: float = 0.01,
    max_iter: int = 60,
    stop: str = "mean",
    trim: bool = True,
    monotone: bool = True,
    progress: Callable[[int, int, FitResult], None] | None = None,
    walker: Callable[[float], np.ndarray] | None = None,
    checkpoint: str | None = None,
    allow_other_checkpoint: bool = False,
    start: int = 0,
    cap: float | None = None,
    prepared: Prepared | None = None,
) -> list[FitResult]:
    """Fit one recipe per budget (same order as ``budgets``); deterministic.

    For each budget, α is bisected on [0, 1] until the bracket is at most ``tol`` wide (the
    authors' 0.01 by default; at most ``max_iter`` walks), and the recipe of the bracket's
    **feasible** end is returned: its predicted reduction on the calibration counts
    (:func:`predicted_reduction`) is ``>= budget``. A budget no recipe can meet (e.g. 0.99 under
    ``"full"`` when system + text tokens alone cost more than 1 %) gives ``feasible=False``, the
    recipe that drops every visual token after layer 0, and a warning. Budget 0 gives the empty
    recipe.

    With ``trim`` (default), the budget check is finished at token granularity: the α-search moves
    the reduction in jumps (a whole layer's drops appear or vanish when the stop layer moves), so
    the recipe of the feasible α can overshoot the budget by a point or more on small calibration
    sets. Trimming takes drops back from the deepest pruned layers, as many as keeps the budget
    met (``metadata["trimmed"]`` counts them, on the ``n_visual_ref`` grid). ``trim=False`` returns
    the floored mean of the α-walk unchanged.

    With ``monotone`` (default), a larger budget never keeps more visual tokens at any layer than a
    smaller one of the same call: where the α-search would (a corner case: feasibility is not
    nested across budgets, because the floor and the stop layer move with α), the recipe takes
    the layer-wise cumulative maximum of the smaller budgets' drops, and its metadata says so.
    ``progress(done, total, result)`` is called after each budget.

    ``walker(alpha)`` replaces the statistical replay: it returns the per-sample drop counts
    ``(S, L)`` of the *unstopped* α-walk (e.g. run on the live model, :mod:`fitprune.progressive`);
    the budget stop, averaging, search, trimming and envelope stay the same. ``stats`` then only
    supplies token counts and ids, and the per-layer mass losses are NaN (the walker's token sets
    are unknown here).

    ``start`` and ``cap`` constrain the statistical walk (:meth:`fitprune.alpha_walk.Prepared.run`):
    no layer before ``start`` prunes, no layer drops more than ``cap`` of the initial visual tokens.
    ``prepared``: the sort orders of ``stats`` from an earlier call (:class:`Prepared`), reused.
    """
    check_inputs(stats, dims)
    if not isinstance(start, Integral) or isinstance(start, bool) or not 0 <= start < dims.num_layers:
        raise ValueError(f"start = {start!r}: the first layer allowed to prune, an integer in [0, {dims.num_layers})")
    if cap is not None and (isinstance(cap, bool) or not (isinstance(cap, Real) and 0.0 < float(cap) <= 1.0)):
        raise ValueError(f"cap = {cap!r}: the most a layer may drop, a fraction of the visual tokens in (0, 1]")
    if walker is not None and (start or cap is not None):
        raise ValueError("start and cap constrain the statistical walk; a walker runs its own")
    if checkpoint is not None and stats.checkpoint is not None and stats.checkpoint != checkpoint:
        if not allow_other_checkpoint:
            raise ValueError(
                f"statistics were collected on checkpoint {stats.checkpoint}, not {checkpoint}: re-collect them "
                "for this checkpoint, or pass allow_other_checkpoint=True to fit them anyway"
            )
        warnings.warn(f"fitting statistics of checkpoint {stats.checkpoint} for {checkpoint} (explicit override)")
    budgets = [check_budget(b) for b in budgets]
    if not budgets:
        return []
    check_stop(stop)
    if not (isinstance(tol, Real) and 0.0 < float(tol) < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")

    L = dims.num_layers
    cost = LayerCost(dims, convention)
    n_other = other_tokens(stats, convention)
    prep = (prepared if prepared is not None else Prepared(stats)) if walker is None else None
    if prep is not None and (prep.S, prep.L) != (stats.num_samples, stats.num_layers):
        raise ValueError(f"prepared holds {prep.S} samples x {prep.L} layers; these statistics have "
                         f"{stats.num_samples} x {stats.num_layers}: prepare them from the same statistics")
    constraint = {"start": int(start), "cap": None if cap is None else float(cap)}
    walks: dict[float, np.ndarray] = {}  # α -> unstopped counts (S, L)

    def unstopped(alpha: float) -> np.ndarray:
        if alpha not in walks:
            walks[alpha] = prep.run(alpha, **constraint) if walker is None else _checked_walk(walker(alpha), stats, alpha)
        return walks[alpha]

    def trial(alpha: float, check: BudgetCheck) -> _Trial:
        counts = unstopped(alpha)
        stop_layer = check.stop_layers(counts)
        mean, n_ref = mean_counts(truncate(counts, stop_layer), stats.n_visual)
        red = reduction([c / n_ref for c in mean], cost, stats.n_visual, n_other, L)
        return _Trial(alpha, mean, n_ref, red, stop_layer)

    def search(budget: float) -> tuple[_Trial, bool, int, tuple[float, float]]:
        n_ref = int(stats.n_visual.max())
        if budget == 0.0:
            return _Trial(0.0, [0] * L, n_ref, 0.0, np.zeros(stats.num_samples, dtype=np.int64)), True, 0, (0.0, 0.0)
        check = BudgetCheck(cost, stats.n_visual, n_other, L, budget, stop)
        best = trial(1.0, check)
        evals = 1
        if best.reduction < budget - FEASIBLE_EPS:
            return best, False, evals, (1.0, 1.0)
        lo, hi = 0.0, 1.0
        while hi - lo > tol + 1e-12 and evals < max_iter:
            mid = (lo + hi) / 2
            t = trial(mid, check)
            evals += 1
            if t.reduction >= budget - FEASIBLE_EPS:
                hi, best = mid, t
            else:
                lo = mid
        return best, True, evals, (lo, hi)

    def meets(counts: list[int], n_ref: int, budget: float, floor: np.ndarray | None) -> bool:
        if floor is not None and np.any(np.cumsum(counts) < floor):
            return False
        return reduction([x / n_ref for x in counts], cost, stats.n_visual, n_other, L) >= budget - FEASIBLE_EPS

    results: dict[float, FitResult] = {}
    floor = None  # (L,) cumulative drops of the largest budget done so far (monotone envelope)
    done = 0
    for b in sorted(set(budgets)):  # ascending: each budget's envelope needs the smaller ones
        t, feasible, evals, bracket = search(b)
        cum = np.cumsum(t.counts)
        adjusted = bool(monotone and floor is not None and np.any(floor > cum))
        if adjusted:
            cum = np.maximum(cum, floor)
        counts = [int(x) for x in np.diff(cum, prepend=0)]
        n_trimmed = 0
        if trim and feasible and b > 0.0:
            bound = floor if monotone else None
            counts, n_trimmed = _trim(counts, lambda c: meets(c, t.n_ref, b, bound))
        floor = np.cumsum(counts) if floor is None else np.maximum(floor, np.cumsum(counts))
        if not feasible:
            warnings.warn(
                f"budget {b:g} cannot be met under the {convention!r} FLOPs convention: dropping every visual "
                f"token after layer {start}{'' if cap is None else f' (at most {cap:g} per layer)'} removes only {t.reduction:.4f} of the prefill; returning that recipe with "
                "feasible=False (layer 0 always runs on every token, and under 'full' system and text tokens are "
                "never dropped)",
                stacklevel=2,
            )
        if prep is None:
            loss = [np.full(L, np.nan)] * 2
        else:
            _, surv = prep.run(t.alpha, stop_layer=t.stop_layer, track=True, **constraint)
            with np.errstate(invalid="ignore", divide="ignore"):
                loss = [np.where(m > 0, 1.0 - s / m, 0.0).mean(axis=0) for s, m in zip(surv, (stats.cross_mass, stats.self_mass))]
        metadata = {
            "alpha": t.alpha,
            "alpha_bracket": list(bracket),
            "calibration": stats.calib_id,
            "n_samples": stats.num_samples,
            "n_visual_ref": t.n_ref,
            "fit": "statistical",
            "stop": stop,
            "tol": float(tol),
            "trimmed": n_trimmed,
        }
        if start or cap is not None:
            metadata.update(start=int(start), cap=None if cap is None else float(cap))
        if adjusted:
            metadata["monotone_adjusted"] = True
        recipe = Recipe.from_counts(
            counts,
            t.n_ref,
            method="fitprune",
            scoring="fitprune",
            family=family if family is not None else stats.family,
            checkpoint=stats.checkpoint,
            budget=b,
            flops_convention=convention,
            metadata=metadata,
        )
        predicted = reduction(recipe.drop_fractions, cost, stats.n_visual, n_other, L)
        recipe = recipe.with_updates(metadata={**metadata, "predicted_reduction": predicted, "feasible": feasible})
        results[b] = FitResult(
            recipe=recipe,
            alpha=t.alpha,
            predicted_reduction=predicted,
            feasible=feasible,
            per_layer_mass_loss=tuple(float(x) for x in loss[0]),
            per_layer_self_mass_loss=tuple(float(x) for x in loss[1]),
            iterations=evals,
        )
        if progress is not None:
            for _ in range(budgets.count(b)):
                done += 1
                progress(done, len(budgets), results[b])
    return [results[b] for b in budgets]


def _checked_walk(counts, stats: CalibrationStats, alpha: float) -> np.ndarray:
    counts = np.asarray(counts)
    shape = (stats.num_samples, stats.num_layers)
    if counts.shape != shape or counts.dtype.kind not in "iu":
        raise ValueError(f"walker({alpha}) returned {counts.dtype} {counts.shape}; expected integer drop counts {shape}")
    if counts.min(initial=0) < 0 or np.any(counts.sum(axis=1) > stats.n_visual):
        raise ValueError(f"walker({alpha}) returned negative counts or drops more tokens than a sample has")
    return counts.astype(np.int64)
