"""The α-walk of FitPrune on stored statistics (DESIGN §2, "Fitting"; the *statistical* evaluation).

For a tolerance α in [0, 1], walk the decoder layers in order; at each layer every sample drops the
intersection of two sets of its alive visual tokens: the longest prefix in ascending cross score
``c`` whose removal keeps the surviving cross mass ``>= (1 - α) * C_l``, and likewise in self score
``s`` against ``(1 - α) * S_l``. The walk here runs without a budget stop; a budget's stop
(:class:`fitprune.cost.BudgetCheck`) only truncates it, which is exact because what a layer drops
never depends on later layers. :mod:`fitprune.fit` bisects α on top of it.

Two constraints beyond the authors' walk, used by the recipe search (:mod:`fitprune.search`):
``start`` (no layer before it prunes) and ``cap`` (no layer drops more than ``cap`` of a sample's
initial visual tokens; when the α-rule's set is larger, the tokens lowest in ``c·s`` go, as at
inference).

Speed: sort orders are precomputed per layer once per calibration set and shared by every α, all
samples at once with numpy.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from .calibration import CalibrationStats
from .cost import BudgetCheck, LayerCost, check_inputs, other_tokens
from .flops import ModelDims

__all__ = ["STOP_RULES", "Prepared", "check_alpha", "check_budget", "check_stop", "mean_counts", "truncate", "walk"]

STOP_RULES = ("mean", "sample")  # "mean": the authors' check on the sample average; "sample": per sample
_RATIO_EPS = 1e-9  # ragged counts: floor(mean(k * n_ref / n) + eps) absorbs float rounding


class Prepared:
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
        self._stats = stats
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

    def run(self, alpha: float, stop_layer: np.ndarray | None = None, track: bool = False, *,
            start: int = 0, cap: float | None = None):
        """Drop counts ``(S, L)`` of the α-walk; samples stop pruning at layer ``stop_layer[s]``.

        Layers before ``start`` drop nothing; with ``cap``, a layer drops at most
        ``floor(cap · n_visual)`` of a sample's tokens (the lowest in ``c·s`` of the α-rule's set).
        With ``track``, also the surviving cross / self mass ``(S, L)`` after each layer's pruning.
        """
        S, L, V = self.S, self.L, self.V
        counts = np.zeros((S, L), dtype=np.int64)
        alive = self.exists.copy()
        surv = (np.zeros((S, L)), np.zeros((S, L))) if track else None
        keep = (1.0 - alpha)
        buf = np.empty((S, V))
        limit = None if cap is None else np.floor(cap * self.n_visual + 1e-9).astype(np.int64)  # (S,)
        for l in range(L):
            active = None if stop_layer is None else (l < stop_layer)
            if alpha > 0.0 and l >= start and (active is None or active.any()):
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
                if limit is not None:
                    drop = self._capped(drop, l, limit)
                counts[:, l] = np.count_nonzero(drop, axis=1)
                alive &= ~drop
            if track:
                for i in range(2):
                    kept = np.take(alive, self.flat_order[i][l])
                    surv[i][:, l] = np.einsum("sv,sv->s", self.sorted[i][l], kept)
        return (counts, surv) if track else counts

    def _capped(self, drop: np.ndarray, layer: int, limit: np.ndarray) -> np.ndarray:
        """``drop`` with at most ``limit[s]`` tokens per sample: those lowest in ``c·s`` stay dropped."""
        over = np.count_nonzero(drop, axis=1) > limit
        if not over.any():
            return drop
        rows = np.flatnonzero(over)
        score = np.nan_to_num(self._stats.cross[rows, layer] * self._stats.self_[rows, layer], nan=np.inf)
        score = np.where(drop[rows], score, np.inf)
        order = np.argsort(score, axis=1, kind="stable")
        keep_dropped = np.arange(self.V)[None, :] < limit[rows, None]
        capped = np.zeros((len(rows), self.V), dtype=bool)
        np.put_along_axis(capped, order, keep_dropped, axis=1)
        drop = drop.copy()
        drop[rows] = capped & drop[rows]
        return drop


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, Real) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_budget(budget: float) -> float:
    if not isinstance(budget, Real) or isinstance(budget, bool) or not math.isfinite(float(budget)):
        raise ValueError(f"budget must be a number, got {budget!r}")
    if not 0.0 <= float(budget) < 1.0:
        raise ValueError(
            f"budget = {budget!r}: a budget is the fraction of prefill FLOPs to remove, in [0, 1) "
            "(0.6 removes 60 %)"
        )
    return float(budget)


def check_stop(stop: str) -> None:
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
    check_inputs(stats, dims)
    alpha, budget = check_alpha(alpha), check_budget(budget)
    check_stop(stop)
    check = BudgetCheck(LayerCost(dims, convention), stats.n_visual, other_tokens(stats, convention), stats.num_layers, budget, stop)
    prep = Prepared(stats)
    unstopped = prep.run(alpha)
    return truncate(unstopped, check.stop_layers(unstopped))


def truncate(counts: np.ndarray, stop_layer: np.ndarray) -> np.ndarray:
    return np.where(np.arange(counts.shape[1])[None, :] < stop_layer[:, None], counts, 0)


def mean_counts(counts: np.ndarray, n_visual: np.ndarray) -> tuple[list[int], int]:
    """Floor of the per-layer mean drop count, on the grid of ``n_ref = max(n_visual)`` tokens."""
    n_ref = int(n_visual.max())
    if np.all(n_visual == n_ref):
        return [int(c) for c in counts.sum(axis=0) // counts.shape[0]], n_ref  # exact integer floor
    scaled = counts * (n_ref / n_visual)[:, None]
    return [int(c) for c in np.floor(scaled.mean(axis=0) + _RATIO_EPS)], n_ref


