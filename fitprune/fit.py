"""Fit FitPrune recipes to FLOPs budgets by replaying the α-walk on stored statistics.

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

Beyond the authors: the feasible recipe is *trimmed* to the budget at token granularity, and a
budget grid is made *monotone* (see :func:`fit`).

Speed: the walk without a stop depends on neither the budget nor the FLOPs convention; a
budget's stop only truncates it. So each α is walked once (sort orders precomputed per layer, all
samples at once with numpy) and shared by every budget of a :func:`fit` call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

from .calibration import CalibrationStats
from .flops import CONVENTIONS, ModelDims, layer_macs
from .recipe import Recipe

__all__ = ["STOP_RULES", "FitResult", "fit", "predicted_reduction", "walk"]

STOP_RULES = ("mean", "sample")  # "mean": the authors' check on the sample average; "sample": per sample
_VISUAL_ONLY = frozenset({"fitprune-paper"})  # conventions that count visual tokens only
_RATIO_EPS = 1e-9  # ragged counts: floor(mean(k * n_ref / n) + eps) absorbs float rounding
_FEASIBLE_EPS = 1e-12  # a reduction this close below the budget counts as meeting it (float noise)


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


# -- costs ----------------------------------------------------------------------------------------


class _Cost:
    """Vectorised ``layer_macs``: every convention is ``D + A·n + B·n² + C·n'`` in the token counts."""

    def __init__(self, dims: ModelDims, convention: str) -> None:
        f = lambda n, n2: layer_macs(dims, n, n2, convention)  # noqa: E731
        self.D = f(0, 0)
        self.C = f(1, 1) - f(1, 0)
        self.B = (f(2, 0) - 2 * f(1, 0) + self.D) / 2
        self.A = f(1, 0) - self.D - self.B
        for n, n2 in ((577.0, 301.0), (2880.0, 17.0)):
            if not math.isclose(self(np.float64(n), np.float64(n2)), f(n, n2), rel_tol=1e-9):
                raise NotImplementedError(f"convention {convention!r} is not quadratic in the token count")

    def __call__(self, n_in: np.ndarray, n_out: np.ndarray) -> np.ndarray:
        n_in = np.asarray(n_in, dtype=np.float64)
        return self.D + self.A * n_in + self.B * n_in * n_in + self.C * np.asarray(n_out, dtype=np.float64)


class _Budget:
    """The budget check of one (convention, budget, stop rule) over a calibration set."""

    def __init__(self, cost: _Cost, n_visual: np.ndarray, n_other: np.ndarray, L: int, budget: float, stop: str):
        self.cost, self.n_visual, self.n_other, self.L, self.stop = cost, n_visual, n_other, L, stop
        full = L * cost(n_visual + n_other, n_visual + n_other)  # (S,)
        self.target = (1.0 - budget) * full  # (S,)
        self.target_sum = (1.0 - budget) * math.fsum(full)

    def stop_layers(self, counts: np.ndarray) -> np.ndarray:
        """``(S,)`` first layer each sample stops pruning at (``L``: never), for unstopped ``counts`` ``(S, L)``."""
        S, L = counts.shape
        n_out = self.n_visual[:, None] - np.cumsum(counts, axis=1)  # (S, L): alive after layer l
        n_in = np.concatenate([self.n_visual[:, None], n_out[:, :-1]], axis=1)  # (S, L): entering layer l
        o = self.n_other[:, None]
        layer = self.cost(n_in + o, n_out + o)  # (S, L)
        spent = np.concatenate([np.zeros((S, 1)), np.cumsum(layer, axis=1)[:, :-1]], axis=1)  # before layer l
        forecast = spent + (L - np.arange(L))[None, :] * self.cost(n_in + o, n_in + o)  # (S, L)
        if self.stop == "sample":
            fits = forecast <= self.target[:, None]
            return np.where(fits.any(axis=1), fits.argmax(axis=1), L)
        for l in range(L):
            if math.fsum(forecast[:, l]) <= self.target_sum:
                return np.full(S, l)
        return np.full(S, L)


def _n_other(stats: CalibrationStats, convention: str) -> np.ndarray:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; known: {', '.join(sorted(CONVENTIONS))}")
    if convention in _VISUAL_ONLY:
        return np.zeros(stats.num_samples, dtype=np.int64)
    return stats.n_system + stats.n_text


# -- the walk -------------------------------------------------------------------------------------


class _Prepared:
    """Per-layer sort orders of one calibration set, shared by every α (layout ``(L, S, V)``).

    Holds ascending scores (float64), flat sort orders (intp) and ranks (int16) for both scores:
    about 36 bytes per (sample, layer, token), ~440 MB for 655 x 32 x 576.
    """

    def __init__(self, stats: CalibrationStats) -> None:
        if not stats.is_unpruned:
            raise ValueError(
                "the statistical fit needs statistics of an unpruned pass (n_alive == n_visual); "
                "these come from a pruned pass: re-collect without a recipe"
            )
        S, L, V = stats.cross.shape
        self.S, self.L, self.V = S, L, V
        self.n_visual = stats.n_visual
        self.exists = np.arange(V)[None, :] < stats.n_visual[:, None]  # (S, V)
        self.cross_mass = np.ascontiguousarray(stats.cross_mass.T)  # (L, S)
        self.self_mass = np.ascontiguousarray(stats.self_mass.T)
        rows = (np.arange(S, dtype=np.intp) * V)[:, None]
        self.sorted, self.flat_order, self.rank = [], [], []
        for scores in (stats.cross, stats.self_):
            vals = np.nan_to_num(scores.transpose(1, 0, 2), nan=np.inf)  # (L, S, V); missing tokens sort last
            order = np.argsort(vals, axis=2, kind="stable")  # (L, S, V)
            svals = np.take_along_axis(vals, order, axis=2).astype(np.float64)
            svals[np.isinf(svals)] = 0.0
            rank = np.empty(order.shape, dtype=np.int16 if V < 2**15 else np.int32)
            np.put_along_axis(rank, order, np.arange(V, dtype=rank.dtype)[None, None, :], axis=2)
            self.sorted.append(svals)
            self.flat_order.append(order + rows[None])  # indices into alive.ravel()
            self.rank.append(rank)

    def run(self, alpha: float, stop_layer: np.ndarray | None = None, track: bool = False):
        """Drop counts ``(S, L)`` of the α-walk; samples stop pruning at layer ``stop_layer[s]``.

        With ``track``, also the surviving cross / self mass ``(S, L)`` after each layer's pruning.
        """
        S, L, V = self.S, self.L, self.V
        counts = np.zeros((S, L), dtype=np.int64)
        alive = self.exists.copy()
        surv = (np.zeros((S, L)), np.zeros((S, L))) if track else None
        keep = (1.0 - alpha)
        buf = np.empty((S, V))
        for l in range(L):
            active = None if stop_layer is None else (l < stop_layer)
            if alpha > 0.0 and (active is None or active.any()):
                drop = alive.copy()
                for i, mass in enumerate((self.cross_mass, self.self_mass)):
                    a = np.take(alive, self.flat_order[i][l])  # (S, V) alive, in ascending-score order
                    np.multiply(self.sorted[i][l], a, out=buf)
                    np.cumsum(buf, axis=1, out=buf)  # prefix masses
                    np.subtract(buf[:, -1:], buf, out=buf)  # surviving mass after dropping each prefix
                    k = np.count_nonzero(buf >= (keep * mass[l])[:, None], axis=1)  # longest valid prefix
                    drop &= self.rank[i][l] < k[:, None]
                if active is not None:
                    drop &= active[:, None]
                counts[:, l] = np.count_nonzero(drop, axis=1)
                alive &= ~drop
            if track:
                for i in range(2):
                    kept = np.take(alive, self.flat_order[i][l])
                    surv[i][:, l] = np.einsum("sv,sv->s", self.sorted[i][l], kept)
        return (counts, surv) if track else counts


def _check_inputs(stats: CalibrationStats, dims: ModelDims) -> None:
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be a CalibrationStats, got {type(stats).__name__}")
    if not isinstance(dims, ModelDims):
        raise TypeError(f"dims must be a fitprune.flops.ModelDims, got {type(dims).__name__}")
    if stats.num_layers != dims.num_layers:
        raise ValueError(
            f"statistics have {stats.num_layers} layers but the model has {dims.num_layers}: "
            "they come from another model; re-collect statistics for this checkpoint"
        )


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, Real) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_budget(budget: float) -> float:
    if not isinstance(budget, Real) or isinstance(budget, bool) or not math.isfinite(float(budget)):
        raise ValueError(f"budget must be a number, got {budget!r}")
    if not 0.0 <= float(budget) < 1.0:
        raise ValueError(
            f"budget = {budget!r}: a budget is the fraction of prefill FLOPs to remove, in [0, 1) "
            "(0.6 removes 60 %)"
        )
    return float(budget)


def _check_stop(stop: str) -> None:
    if stop not in STOP_RULES:
        raise ValueError(f"unknown stop rule {stop!r}; known: {', '.join(STOP_RULES)}")


def walk(
    stats: CalibrationStats,
    alpha: float,
    dims: ModelDims,
    budget: float,
    convention: str = "full",
    *,
    stop: str = "mean",
) -> np.ndarray:
    """Per-sample drop counts ``(S, L)`` of the α-walk with the budget check (module docstring).

    ``alpha = 0`` drops nothing (tokens of exactly zero score included); ``alpha = 1`` drops every
    alive token at the first layer that the budget check lets prune.
    """
    _check_inputs(stats, dims)
    alpha, budget = _check_alpha(alpha), _check_budget(budget)
    _check_stop(stop)
    check = _Budget(_Cost(dims, convention), stats.n_visual, _n_other(stats, convention), stats.num_layers, budget, stop)
    prep = _Prepared(stats)
    unstopped = prep.run(alpha)
    return _truncate(unstopped, check.stop_layers(unstopped))


def _truncate(counts: np.ndarray, stop_layer: np.ndarray) -> np.ndarray:
    return np.where(np.arange(counts.shape[1])[None, :] < stop_layer[:, None], counts, 0)


# -- recipes from walks ---------------------------------------------------------------------------


def _mean_counts(counts: np.ndarray, n_visual: np.ndarray) -> tuple[list[int], int]:
    """Floor of the per-layer mean drop count, on the grid of ``n_ref = max(n_visual)`` tokens."""
    n_ref = int(n_visual.max())
    if np.all(n_visual == n_ref):
        return [int(c) for c in counts.sum(axis=0) // counts.shape[0]], n_ref  # exact integer floor
    scaled = counts * (n_ref / n_visual)[:, None]
    return [int(c) for c in np.floor(scaled.mean(axis=0) + _RATIO_EPS)], n_ref


def _schedule(fractions: Sequence[float], n_visual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Recipe.drop_counts`` for every sample: tokens entering / leaving each layer, ``(S, L)`` each."""
    left = n_visual.astype(np.int64)
    n_in, n_out = [], []
    for f in fractions:
        k = np.minimum(np.floor(f * n_visual + 1e-6).astype(np.int64), left)  # Recipe.drop_counts' float ops
        n_in.append(left)
        left = left - k
        n_out.append(left)
    return np.stack(n_in, axis=1), np.stack(n_out, axis=1)


def _reduction(fractions: Sequence[float], cost: _Cost, n_visual: np.ndarray, n_other: np.ndarray, L: int) -> float:
    n_in, n_out = _schedule(fractions, n_visual)
    o = n_other[:, None]
    pruned = math.fsum(cost(n_in + o, n_out + o).sum(axis=1))
    full = math.fsum(L * cost(n_visual + n_other, n_visual + n_other))
    return 1.0 - pruned / full if full else 0.0


def predicted_reduction(recipe: Recipe, stats: CalibrationStats, dims: ModelDims, convention: str = "full") -> float:
    """Fraction of the calibration set's total prefill MACs that ``recipe`` removes.

    ``1 - sum_s pruned_s / sum_s unpruned_s`` over the samples' own token counts (visual only under
    ``"fitprune-paper"``). With equal counts it equals ``flops.recipe_reduction`` for those counts.
    """
    _check_inputs(stats, dims)
    if recipe.num_layers != dims.num_layers:
        raise ValueError(f"recipe has {recipe.num_layers} layers, the model has {dims.num_layers}")
    return _reduction(recipe.drop_fractions, _Cost(dims, convention), stats.n_visual, _n_other(stats, convention), dims.num_layers)


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
    """
    _check_inputs(stats, dims)
    if checkpoint is not None and stats.checkpoint is not None and stats.checkpoint != checkpoint:
        if not allow_other_checkpoint:
            raise ValueError(
                f"statistics were collected on checkpoint {stats.checkpoint}, not {checkpoint}: re-collect them "
                "for this checkpoint, or pass allow_other_checkpoint=True to fit them anyway"
            )
        warnings.warn(f"fitting statistics of checkpoint {stats.checkpoint} for {checkpoint} (explicit override)")
    budgets = [_check_budget(b) for b in budgets]
    if not budgets:
        return []
    _check_stop(stop)
    if not (isinstance(tol, Real) and 0.0 < float(tol) < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")

    L = dims.num_layers
    cost = _Cost(dims, convention)
    n_other = _n_other(stats, convention)
    prep = _Prepared(stats) if walker is None else None
    walks: dict[float, np.ndarray] = {}  # α -> unstopped counts (S, L)

    def unstopped(alpha: float) -> np.ndarray:
        if alpha not in walks:
            walks[alpha] = prep.run(alpha) if walker is None else _checked_walk(walker(alpha), stats, alpha)
        return walks[alpha]

    def trial(alpha: float, check: _Budget) -> _Trial:
        counts = unstopped(alpha)
        stop_layer = check.stop_layers(counts)
        mean, n_ref = _mean_counts(_truncate(counts, stop_layer), stats.n_visual)
        red = _reduction([c / n_ref for c in mean], cost, stats.n_visual, n_other, L)
        return _Trial(alpha, mean, n_ref, red, stop_layer)

    def search(budget: float) -> tuple[_Trial, bool, int, tuple[float, float]]:
        n_ref = int(stats.n_visual.max())
        if budget == 0.0:
            return _Trial(0.0, [0] * L, n_ref, 0.0, np.zeros(stats.num_samples, dtype=np.int64)), True, 0, (0.0, 0.0)
        check = _Budget(cost, stats.n_visual, n_other, L, budget, stop)
        best = trial(1.0, check)
        evals = 1
        if best.reduction < budget - _FEASIBLE_EPS:
            return best, False, evals, (1.0, 1.0)
        lo, hi = 0.0, 1.0
        while hi - lo > tol + 1e-12 and evals < max_iter:
            mid = (lo + hi) / 2
            t = trial(mid, check)
            evals += 1
            if t.reduction >= budget - _FEASIBLE_EPS:
                hi, best = mid, t
            else:
                lo = mid
        return best, True, evals, (lo, hi)

    def meets(counts: list[int], n_ref: int, budget: float, floor: np.ndarray | None) -> bool:
        if floor is not None and np.any(np.cumsum(counts) < floor):
            return False
        return _reduction([x / n_ref for x in counts], cost, stats.n_visual, n_other, L) >= budget - _FEASIBLE_EPS

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
                f"token after layer 0 removes only {t.reduction:.4f} of the prefill; returning that recipe with "
                "feasible=False (layer 0 always runs on every token, and under 'full' system and text tokens are "
                "never dropped)",
                stacklevel=2,
            )
        if prep is None:
            loss = [np.full(L, np.nan)] * 2
        else:
            _, surv = prep.run(t.alpha, stop_layer=t.stop_layer, track=True)
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
        results[b] = FitResult(
            recipe=recipe,
            alpha=t.alpha,
            predicted_reduction=_reduction(recipe.drop_fractions, cost, stats.n_visual, n_other, L),
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


def _trim(counts: list[int], meets: Callable[[list[int]], bool]) -> tuple[list[int], int]:
    """Take drops back from the deepest pruned layers while ``meets(counts)`` holds.

    ``meets`` must be monotone (fewer drops never helps) and hold for ``counts``. Returns the new
    counts and how many drops were taken back.
    """
    counts, removed = list(counts), 0
    for l in reversed(range(len(counts))):
        if counts[l] == 0:
            continue
        lo, hi = 0, counts[l]  # take back r drops, r in [lo, hi]; r = lo is known to be fine
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if meets(counts[:l] + [counts[l] - mid] + counts[l + 1:]):
                lo = mid
            else:
                hi = mid - 1
        counts[l] -= lo
        removed += lo
        if counts[l] > 0:
            break
    return counts, removed
