"""The prefill cost model the fits share: per-layer MACs, the budget check, predicted reductions.

Every FLOPs convention of :mod:`fitprune.flops` is ``D + A·n + B·n² + C·n'`` in the token counts
entering a layer (``n``) and left for its MLP (``n'``); :class:`LayerCost` evaluates it for arrays
of counts at once. :func:`reduction` is what a recipe removes on a calibration set's own token
counts (each sample's visual, system and text tokens), computed with exactly the floor that
:meth:`fitprune.recipe.Recipe.drop_counts` applies, so on the calibration samples it equals the
reduction measured from executed token counts (``PruneReport.flops``) under ``"full"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .calibration import CalibrationStats
from .flops import CONVENTIONS, ModelDims, layer_macs
from .recipe import Recipe

__all__ = ["BudgetCheck", "LayerCost", "TokenCounts", "check_inputs", "input_counts", "other_tokens",
           "predicted_reduction", "reduction", "token_schedule", "trim_counts"]

VISUAL_ONLY = frozenset({"fitprune-paper"})  # conventions that count visual tokens only
FEASIBLE_EPS = 1e-12  # a reduction this close below the budget counts as meeting it (float noise)


class LayerCost:
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


class BudgetCheck:
    """The α-walk's budget check of one (convention, budget, stop rule) over a calibration set."""

    def __init__(self, cost: LayerCost, n_visual: np.ndarray, n_other: np.ndarray, L: int, budget: float, stop: str):
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


def other_tokens(stats: CalibrationStats, convention: str) -> np.ndarray:
    """Per sample, the tokens a convention counts besides the visual ones (none for the paper's)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; known: {', '.join(sorted(CONVENTIONS))}")
    if convention in VISUAL_ONLY:
        return np.zeros(stats.num_samples, dtype=np.int64)
    return stats.n_system + stats.n_text


def check_inputs(stats: CalibrationStats, dims: ModelDims) -> None:
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be a CalibrationStats, got {type(stats).__name__}")
    if not isinstance(dims, ModelDims):
        raise TypeError(f"dims must be a fitprune.flops.ModelDims, got {type(dims).__name__}")
    if stats.num_layers != dims.num_layers:
        raise ValueError(
            f"statistics have {stats.num_layers} layers but the model has {dims.num_layers}: "
            "they come from another model; re-collect statistics for this checkpoint"
        )


def input_counts(input_fraction: float, n_visual: np.ndarray) -> np.ndarray:
    """``Recipe.input_count`` for every sample: visual tokens removed before layer 0, ``(S,)``."""
    n = n_visual.astype(np.int64)
    return np.minimum(np.floor(input_fraction * n_visual + 1e-6).astype(np.int64), n)


def token_schedule(fractions: Sequence[float], n_visual: np.ndarray,
                   input_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``Recipe.drop_counts`` for every sample: tokens entering / leaving each layer, ``(S, L)`` each."""
    left = n_visual.astype(np.int64) - input_counts(input_fraction, n_visual)
    n_in, n_out = [], []
    for f in fractions:
        k = np.minimum(np.floor(f * n_visual + 1e-6).astype(np.int64), left)  # Recipe.drop_counts' float ops
        n_in.append(left)
        left = left - k
        n_out.append(left)
    return np.stack(n_in, axis=1), np.stack(n_out, axis=1)


def reduction(fractions: Sequence[float], cost: LayerCost, n_visual: np.ndarray, n_other: np.ndarray, L: int,
              input_fraction: float = 0.0) -> float:
    """``1 - Σ_s pruned_s / Σ_s unpruned_s`` for per-layer drop ``fractions`` of the initial visual count
    (and ``input_fraction`` of it removed before layer 0)."""
    n_in, n_out = token_schedule(fractions, n_visual, input_fraction)
    o = n_other[:, None]
    pruned = math.fsum(cost(n_in + o, n_out + o).sum(axis=1))
    full = math.fsum(L * cost(n_visual + n_other, n_visual + n_other))
    return 1.0 - pruned / full if full else 0.0


class TokenCounts:
    """A calibration set's token counts under one convention: predicts any recipe's reduction on it."""

    def __init__(self, stats: CalibrationStats, dims: ModelDims, convention: str = "full") -> None:
        check_inputs(stats, dims)
        self.cost = LayerCost(dims, convention)
        self.n_visual = stats.n_visual.astype(np.int64)
        self.n_other = other_tokens(stats, convention)
        self.num_layers = dims.num_layers
        self.convention = convention

    def reduction(self, fractions: Sequence[float], input_fraction: float = 0.0) -> float:
        return reduction(fractions, self.cost, self.n_visual, self.n_other, self.num_layers, input_fraction)


def predicted_reduction(recipe: Recipe, stats: CalibrationStats, dims: ModelDims, convention: str = "full") -> float:
    """Fraction of the calibration set's total prefill MACs that ``recipe`` removes.

    ``1 - sum_s pruned_s / sum_s unpruned_s`` over the samples' own token counts (visual only under
    ``"fitprune-paper"``). With equal counts it equals ``flops.recipe_reduction`` for those counts.
    """
    check_inputs(stats, dims)
    if recipe.num_layers != dims.num_layers:
        raise ValueError(f"recipe has {recipe.num_layers} layers, the model has {dims.num_layers}")
    return TokenCounts(stats, dims, convention).reduction(recipe.drop_fractions, recipe.input_fraction)


def trim_counts(counts: list[int], meets: Callable[[list[int]], bool]) -> tuple[list[int], int]:
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
