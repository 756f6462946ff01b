"""What a pruning schedule costs in time, from a measured per-layer latency curve; a lower bound on the
time of any schedule at a FLOPs budget.

A pruned prefill runs each decoder layer on the tokens left there. Given ``t(n)``, the time one stock
layer takes on ``n`` tokens at a batch size (``scripts/bench_layer_latency.py`` measures it, graphed),
a schedule's prefill costs about ``Σ_l t_l`` with no pruner overhead: selection, compaction and scoring
come on top. A layer whose attention sees ``n_in`` tokens and whose MLP sees ``n_out`` (tokens drop right
after the attention) is charged ``w·t(n_in) + (1 - w)·t(n_out)``, ``w`` the attention's share of the
layer's weights (:func:`attention_share`; weight reads dominate where ``t`` is flat).

Where ``t`` is flat (few tokens, the GEMMs read all their weights for little work) a FLOPs cut buys
little time, so the FLOPs-ideal speed-up is out of reach there whatever the pruner costs.
:func:`time_bound` bounds it: over every schedule that keeps all tokens in layer 0 and never adds
tokens back, the least time at a FLOPs budget under this model (a Lagrangian dynamic programme over
per-layer counts on a token grid; its ``bound_ms`` is the lower convex envelope of (FLOPs, time) at the
budget, so no grid schedule keeping those FLOPs is faster, and ``ms`` is a feasible schedule's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cost import FEASIBLE_EPS, LayerCost
from .flops import ModelDims, recipe_token_schedule
from .recipe import Recipe

__all__ = ["LatencyCurve", "TimeBound", "attention_share", "schedule_ms", "time_bound"]


@dataclass(frozen=True)
class LatencyCurve:
    """``t(n)`` in ms of one decoder layer at ``tokens[i]`` tokens, linear between the points. Below the
    first point a layer costs ``ms[0]`` (measure from a few tokens); past the last it is an error."""

    tokens: tuple[int, ...]
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        tokens, ms = np.asarray(self.tokens), np.asarray(self.ms, dtype=np.float64)
        if tokens.ndim != 1 or tokens.shape != ms.shape or len(tokens) < 2:
            raise ValueError(f"a latency curve needs two or more (tokens, ms) points of equal count; got "
                             f"{tokens.shape} tokens and {ms.shape} times")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens[0] < 1 or np.any(np.diff(tokens) <= 0):
            raise ValueError(f"token counts must be positive integers in ascending order; got {list(self.tokens)}")
        if not np.all(np.isfinite(ms)) or np.any(ms <= 0):
            raise ValueError(f"times must be finite and positive (ms); got {list(self.ms)}")
        object.__setattr__(self, "tokens", tuple(int(t) for t in tokens))
        object.__setattr__(self, "ms", tuple(float(m) for m in ms))

    @classmethod
    def from_json(cls, curve: dict) -> LatencyCurve:
        """One ``curves`` entry of ``bench_layer_latency.py``'s JSON."""
        return cls(tuple(curve["tokens"]), tuple(curve["ms"]))

    def __call__(self, n) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64)
        if np.any(n > self.tokens[-1]):
            raise ValueError(f"the curve was measured up to {self.tokens[-1]} tokens, asked for {float(n.max()):g}; "
                             "measure it further (bench_layer_latency.py --tokens)")
        return np.interp(n, self.tokens, self.ms)


def attention_share(dims: ModelDims) -> float:
    """The attention projections' share of a decoder layer's weights (q, k, v, o against the MLP's)."""
    q_o = 2 * dims.hidden_size * dims.num_heads * dims.head_dim
    k_v = 2 * dims.hidden_size * dims.num_kv_heads * dims.head_dim
    mlp = (3 if dims.gated_mlp else 2) * dims.hidden_size * dims.intermediate_size
    return (q_o + k_v) / (q_o + k_v + mlp)


def _layer_ms(curve: LatencyCurve, share: float, n_in, n_out) -> np.ndarray:
    return share * curve(n_in) + (1.0 - share) * curve(n_out)


def schedule_ms(curve: LatencyCurve, dims: ModelDims, recipe: Recipe | None, n_visual: int, n_other: int) -> float:
    """Σ over layers of the layer time at the recipe's token counts (``None``: unpruned)."""
    if recipe is None:
        n = np.full(dims.num_layers, n_visual + n_other)
        return float(curve(n).sum())
    attn, mlp = recipe_token_schedule(recipe, n_visual, n_other)
    return float(_layer_ms(curve, attention_share(dims), np.asarray(attn), np.asarray(mlp)).sum())


@dataclass(frozen=True)
class TimeBound:
    """The result of :func:`time_bound`. ``bound_ms``: no schedule keeping the budget's FLOPs takes less.
    ``visual`` (visual tokens left after each layer's attention), ``ms`` and ``reduction`` describe a
    schedule that meets the budget: the programme's optimum nearest the budget on the feasible side, then
    lowered one grid step at a time where that saves the most time per FLOP while it keeps the budget's
    FLOPs. A greedy descent: its time can sit above the bound (and above other schedules'). :meth:`recipe`
    makes it a recipe, e.g. a seed for :func:`fitprune.search.search`."""

    bound_ms: float
    full_ms: float  # the unpruned prefill under the same curve
    visual: tuple[int, ...]
    ms: float  # that schedule's time under the curve
    reduction: float  # the FLOPs it removes (≤ the budget)

    def recipe(self, n_visual: int, **fields) -> Recipe:
        """The schedule as a :class:`Recipe` for ``n_visual`` visual tokens (``fields``: scoring, family, ...)."""
        drops = np.diff(np.concatenate([[n_visual], self.visual])) * -1
        return Recipe.from_counts([int(d) for d in drops], n_visual, **fields)


def _path_cost(t1: np.ndarray, f1: np.ndarray, path: np.ndarray) -> tuple[float, float]:
    """(ms, MACs) of a schedule of count indices ``path``, layer 0 entered at the top index."""
    prev = np.concatenate([[t1.shape[0] - 1], path[:-1]])
    return float(t1[prev, path].sum()), float(f1[prev, path].sum())


def _solve(t1: np.ndarray, f1: np.ndarray, layers: int, lam: float) -> tuple[np.ndarray, float, float]:
    """min over ``layers`` layers of Σ (t - λ·f)[prev, cur] over non-increasing count indices, starting from
    the top index. ``t1, f1``: (K, K) costs of a layer entered at index ``prev`` and left at ``cur`` (the
    same for every layer; t inf where cur > prev). Returns the path and its (ms, MACs)."""
    K = t1.shape[0]
    lam_f = lam * f1
    best = np.full(K, np.inf)
    best[K - 1] = 0.0  # layer 0 is entered with every token
    back = np.zeros((layers, K), dtype=np.int64)
    for layer in range(layers):
        total = best[:, None] + t1 - lam_f  # (prev, cur)
        back[layer] = np.argmin(total, axis=0)
        best = total[back[layer], np.arange(K)]
    path = np.empty(layers, dtype=np.int64)
    path[-1] = int(np.argmin(best))
    for layer in range(layers - 1, 0, -1):
        path[layer - 1] = back[layer, path[layer]]
    return (path, *_path_cost(t1, f1, path))


def _descend(path: np.ndarray, t1: np.ndarray, f1: np.ndarray, target: float) -> np.ndarray:
    """From a schedule keeping at least ``target`` FLOPs, lower one layer's count by one grid step at a time,
    the step that saves the most time per FLOP removed, while the schedule still keeps ``target``: a
    feasible schedule near the budget. ``t1, f1``: (K, K) layer costs by (entering, leaving) index."""
    path = path.copy()
    L, top = len(path), t1.shape[0] - 1
    flops = _path_cost(t1, f1, path)[1]
    layers = np.arange(L)
    while True:
        prev = np.concatenate([[top], path[:-1]])
        nxt = np.concatenate([path[1:], [0]])
        low = path - 1
        ok = (low >= 0) & (low >= nxt)  # stays a count and stays non-increasing
        low = np.maximum(low, 0)
        d_t = t1[prev, low] - t1[prev, path]
        d_f = f1[prev, low] - f1[prev, path]
        follow = layers < L - 1  # the next layer is entered with one step fewer
        d_t[follow] += t1[low[follow], nxt[follow]] - t1[path[follow], nxt[follow]]
        d_f[follow] += f1[low[follow], nxt[follow]] - f1[path[follow], nxt[follow]]
        ok &= (flops + d_f >= target) & (d_f < 0)
        if not ok.any():
            return path
        gain = np.full(L, -np.inf)
        gain[ok] = d_t[ok] / d_f[ok]  # ms saved per MAC removed (both deltas negative)
        layer = int(np.argmax(gain))
        path[layer] -= 1
        flops += float(d_f[layer])


def time_bound(curve: LatencyCurve, dims: ModelDims, n_visual: int, n_other: int, budget: float,
               convention: str = "full", step: int = 8, iterations: int = 60) -> TimeBound:
    """The least time of a schedule (visual counts on a grid of ``step`` tokens, plus 0 and ``n_visual``)
    that removes at most ``budget`` of the prefill FLOPs under ``convention`` (time grows with tokens, so
    the least time sits at the budget); see the module docstring and :class:`TimeBound`."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget is the fraction of FLOPs to remove, in [0, 1); got {budget!r}")
    if n_visual < 1 or n_other < 0 or step < 1:
        raise ValueError(f"need n_visual >= 1, n_other >= 0, step >= 1; got {n_visual}, {n_other}, {step}")
    counts = np.unique(np.concatenate([np.arange(0, n_visual, step), [n_visual]]))  # (K,) ascending
    cost = LayerCost(dims, convention)
    share = attention_share(dims)
    n_in = counts[:, None] + n_other  # (prev, cur)
    n_out = counts[None, :] + n_other
    t1 = _layer_ms(curve, share, n_in, n_out)
    f1 = cost(np.broadcast_to(n_in, t1.shape), np.broadcast_to(n_out, t1.shape))
    grows = counts[None, :] > counts[:, None]
    t1, f1 = np.where(grows, np.inf, t1), np.where(grows, 0.0, f1)
    L = dims.num_layers
    full_ms = schedule_ms(curve, dims, None, n_visual, n_other)
    full_f = float(L * cost(np.float64(n_visual + n_other), np.float64(n_visual + n_other)))
    target = (1.0 - budget - FEASIBLE_EPS) * full_f  # kept FLOPs; the eps absorbs the sums' rounding

    lo_sol = _solve(t1, f1, L, 0.0)  # λ = 0: the fastest schedule, FLOPs aside (every visual token dropped early)
    if lo_sol[2] >= target:
        path, ms, flops = lo_sol
        return TimeBound(ms, full_ms, tuple(int(c) for c in counts[path]), ms, 1 - flops / full_f)
    hi = full_ms / full_f  # λ in ms per MAC: start at the unpruned prefill's rate
    hi_sol = _solve(t1, f1, L, hi)
    for _ in range(200):  # raise λ until kept FLOPs count for more than time (keeping every token meets it)
        if hi_sol[2] >= target:
            break
        hi *= 4.0
        hi_sol = _solve(t1, f1, L, hi)
    else:  # pragma: no cover - keeping every token keeps all the FLOPs
        raise RuntimeError(f"no λ up to {hi:g} keeps {1 - budget:.3f} of the FLOPs; the curve or costs are malformed")
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        sol = _solve(t1, f1, L, mid)
        if sol[2] >= target:
            hi, hi_sol = mid, sol
        else:
            lo, lo_sol = mid, sol
    path = _descend(hi_sol[0], t1, f1, target)
    ms, flops = _path_cost(t1, f1, path)
    ms_b, f_b = hi_sol[1], hi_sol[2]
    # both are optima of T - λF at (nearly) one λ: the line through them supports every schedule, so one
    # keeping F >= target takes at least the line's time at the target
    _, ms_a, f_a = lo_sol
    bound = ms_b if f_a == f_b else ms_a + (ms_b - ms_a) * (target - f_a) / (f_b - f_a)
    return TimeBound(min(bound, ms), full_ms, tuple(int(c) for c in counts[path]), ms, 1 - flops / full_f)
