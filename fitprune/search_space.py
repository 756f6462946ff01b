"""The search space of :mod:`fitprune.search`: its configuration, candidates, seeds and local moves.

A candidate is a schedule (per-layer drop fractions of the initial visual tokens) and a scoring
rule. Every schedule is put on the budget by :func:`project`: its shape is kept and scaled until
the predicted reduction on the calibration set's own token counts just meets the budget, then
trimmed at token granularity. Under the ``"full"`` convention that prediction equals the
reduction measured from the executed token counts on those samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .baselines import FAMILIES, divprune, pyramid, visionzip
from .cost import FEASIBLE_EPS, TokenCounts, trim_counts
from .divergence import Divergence
from .recipe import Recipe

__all__ = ["SCORINGS", "Candidate", "SearchConfig", "neighbours", "one_hot", "project", "project_input", "seed_pool",
           "split_batches"]

SCORINGS = ("fitprune", "fastv")
BASELINE_SEEDS = ("fastv", "pyramid", "dart", "divprune", "visionzip")  # the baselines, each with its own rule
PRE_LLM = {"divprune": divprune, "visionzip": visionzip}  # baselines that select before the language model


@dataclass(frozen=True)
class SearchConfig:
    """What the search tries. ``full()`` is the GPU default; ``small()`` the 2-core CPU main job's.

    Layers are FastV's K (tokens gone from layer K on; the recipe entry sits at index K-1).
    ``walk_starts`` are first-layer constraints of the α-walk (entry indices), ``walk_caps`` its
    per-layer caps (fractions of the visual tokens; ``None``: no cap). ``shares``: fraction of the
    drops at the first stage of a two-stage pyramid. ``finalists`` seeds get ``rounds`` of local
    moves, which stop once a budget's divergence passes (the seeds' included) reach ``max_evals``.
    ``heldout``: fraction of the calibration batches kept out of the search to decide. ``tokens``: answer positions in the KL.
    ``tolerance``: the decided recipe's measured reduction lies in [budget, budget + tolerance].
    ``baselines``: the baselines seeded with their own scoring rules (so the search cannot lose to
    them on the calibration set); ``visionzip`` only on LLaVA-1.5-layout models. Pre-LLM seeds
    (DivPrune, VisionZip) are decided on like every seed but get no local moves.
    ``refine`` / ``progressive``: also seed with the refined / progressive α-walk (live passes).
    """

    first_layers: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10)
    pyramids: tuple[tuple[int, ...], ...] = ((2, 6), (2, 8), (3, 8), (4, 10), (2, 6, 12), (3, 9, 16))
    shares: tuple[float, ...] = (0.5, 0.7, 0.85)
    walk_starts: tuple[int, ...] = (0, 1, 2, 4)
    walk_caps: tuple[float | None, ...] = (None, 0.5)
    scorings: tuple[str, ...] = SCORINGS
    finalists: int = 3
    rounds: int = 6
    max_evals: int = 300
    heldout: float = 0.5
    tokens: int = 1
    tolerance: float = 0.01
    refine: bool = True
    progressive: bool = False
    baselines: tuple[str, ...] = BASELINE_SEEDS

    @classmethod
    def full(cls, **changes) -> SearchConfig:
        return replace(cls(), **changes)

    @classmethod
    def small(cls, **changes) -> SearchConfig:
        """The 2-core CPU main job's search: 8 seeds, c·s scoring plus the baselines' own, no local moves
        (65-86 s per budget on the demo model with 6 + 6 calibration samples, float32, 2-core AVX2 CPU)."""
        base = cls(first_layers=(2, 4), pyramids=((2, 6),), shares=(0.7,), walk_starts=(0, 2), walk_caps=(None,),
                   scorings=("fitprune",), finalists=1, rounds=0, max_evals=16, refine=False, progressive=False,
                   baselines=("fastv", "pyramid", "divprune"))
        return replace(base, **changes)

    def __post_init__(self) -> None:
        bad = [s for s in self.scorings if s not in SCORINGS]
        if bad or not self.scorings:
            raise ValueError(f"scorings {list(self.scorings)}: pick one or more of {', '.join(SCORINGS)}")
        bad = [s for s in self.baselines if s not in BASELINE_SEEDS]
        if bad:
            raise ValueError(f"baselines {bad}: pick from {', '.join(BASELINE_SEEDS)}")
        if not 0.0 < self.heldout < 1.0:
            raise ValueError(f"heldout = {self.heldout!r}: the fraction of calibration batches held out, in (0, 1)")
        for name in ("finalists", "max_evals", "tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} = {v!r}: must be a positive integer")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds = {self.rounds!r}: must be a non-negative integer")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance = {self.tolerance!r}: the allowed overshoot of the budget, in [0, 1)")


@dataclass
class Candidate:
    """One schedule at one budget: per-layer drop fractions, a scoring rule, where it came from."""

    fractions: tuple[float, ...]
    scoring: str
    origin: str
    predicted: float = float("nan")
    search: Divergence | None = None
    heldout: Divergence | None = None
    seed: bool = True
    meta: dict = field(default_factory=dict)
    input_fraction: float = 0.0  # removed before layer 0 (pre-LLM seeds)

    def recipe(self, **fields) -> Recipe:
        fields = {"method": "fitprune", "metadata": {}, **fields}
        if self.scoring in PRE_LLM:  # the baseline's own builder (VisionZip's merged share comes with it)
            return PRE_LLM[self.scoring](len(self.fractions), ratio=self.input_fraction).with_updates(**fields)
        return Recipe(tuple(float(f) for f in self.fractions), scoring=self.scoring, input_fraction=self.input_fraction,
                      **fields)

    def row(self, n_ref: int) -> dict:
        """A JSON-able summary (drop counts on the ``n_ref`` grid)."""
        r = self.recipe()
        return {"origin": self.origin, "scoring": self.scoring, "seed": self.seed, "drops": r.drop_counts(n_ref),
                "input_drops": r.input_count(n_ref),
                "predicted_reduction": self.predicted,
                "kl_search": None if self.search is None else self.search.kl,
                "kl_heldout": None if self.heldout is None else self.heldout.kl,
                "measured_reduction_search": None if self.search is None else self.search.flops_reduction}


# -- splitting and projecting ----------------------------------------------------------------------


def split_batches(batches: Sequence, heldout: float) -> tuple[list[int], list[int]]:
    """Indices of the search and held-out batches: every ``round(1/heldout)``-th batch is held out
    (the last batch when that picks none). The two parts are disjoint and cover every batch.

    Raises ``ValueError`` when either part would be empty (fewer than two batches).
    """
    n = len(batches)
    if n < 2:
        raise ValueError(
            f"the calibration set comes in {n} batch(es); holding a part out to decide needs at least 2: use a "
            "smaller batch size or more calibration samples"
        )
    every = max(2, round(1.0 / heldout))
    held = [i for i in range(n) if i % every == every - 1] or [n - 1]
    return [i for i in range(n) if i not in held], held


def project(shape: Sequence[float], counts: TokenCounts, budget: float) -> tuple[tuple[float, ...], float] | None:
    """Scale ``shape`` (per-layer drop fractions) to the least drops whose predicted reduction meets ``budget``.

    The scaled counts are then trimmed at token granularity (the deepest layers give drops back
    while the budget stays met). Returns ``(fractions, predicted reduction)``, or ``None`` when even dropping every token at
    the shape's first pruning layer falls short.
    """
    s = np.clip(np.asarray(shape, dtype=np.float64), 0.0, None)
    nz = np.flatnonzero(s > 0)
    if nz.size == 0:
        return ((0.0,) * len(s), 0.0) if budget <= 0 else None
    top = 1.0 / s[nz[0]]  # the first pruning layer then drops every token

    def at(p: float) -> tuple[float, ...]:
        f = np.minimum(p * s, 1.0)
        cum = np.minimum(np.cumsum(f), 1.0)
        return tuple(float(x) for x in np.diff(cum, prepend=0.0))

    if counts.reduction(at(top)) < budget - FEASIBLE_EPS:
        return None
    lo, hi = 0.0, top
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if counts.reduction(at(mid)) >= budget - FEASIBLE_EPS:
            hi = mid
        else:
            lo = mid
    # on the grid of the largest visual count, take back the deepest drops the budget can spare
    n_ref = int(counts.n_visual.max())
    grid = Recipe(at(hi)).drop_counts(n_ref)
    grid, _ = trim_counts(grid, lambda c: counts.reduction([x / n_ref for x in c]) >= budget - FEASIBLE_EPS)
    f = tuple(x / n_ref for x in grid)
    return f, counts.reduction(f)


def project_input(counts: TokenCounts, budget: float) -> tuple[float, float] | None:
    """The least ``input_fraction`` (tokens removed before layer 0) whose predicted reduction meets ``budget``.

    On the grid of the largest visual count (``k / n_ref``), by bisection over ``k``. Returns
    ``(input_fraction, predicted reduction)``, or ``None`` when removing every visual token falls short.
    """
    zeros = [0.0] * counts.num_layers
    n_ref = int(counts.n_visual.max())
    meets = lambda k: counts.reduction(zeros, k / n_ref) >= budget - FEASIBLE_EPS  # noqa: E731
    if n_ref == 0 or not meets(n_ref):
        return None
    lo, hi = 0, n_ref  # meets(hi) holds
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi / n_ref, counts.reduction(zeros, hi / n_ref)


# -- seeds and moves -------------------------------------------------------------------------------


def one_hot(L: int, entries: Mapping[int, float]) -> list[float]:
    v = [0.0] * L
    for i, x in entries.items():
        if 0 <= i < L:
            v[i] += x
    return v


def _shape_seeds(L: int, config: SearchConfig) -> list[tuple[list[float], str]]:
    out = [(one_hot(L, {k - 1: 1.0}), f"layer K={k}") for k in config.first_layers if 1 <= k <= L]
    for stages in config.pyramids:
        stages = [k for k in stages if 1 <= k <= L]
        if len(stages) < 2:
            continue
        for share in config.shares:
            rest = 1.0 - share
            tail = [rest * w / sum(0.6 ** j for j in range(len(stages) - 1)) for w in
                    (0.6 ** j for j in range(len(stages) - 1))]
            weights = [share] + tail
            name = "+".join(str(k) for k in stages)
            out.append((one_hot(L, {k - 1: w for k, w in zip(stages, weights)}), f"pyramid {name} share {share:g}"))
    return out


def neighbours(c: Candidate, step: float) -> list[tuple[list[float], str, str]]:
    """Shapes one local move away from ``c``: (fractions, scoring, move name)."""
    f = list(c.fractions)
    L = len(f)
    nz = [i for i, x in enumerate(f) if x > 0]
    if not nz or c.input_fraction > 0:
        return []
    out = []
    for i in sorted(nz, key=lambda i: -f[i])[:4]:  # the four largest pruning layers
        for j in (i - 1, i + 1):
            if 0 <= j < L:
                g = list(f)
                moved = step * g[i]
                g[i] -= moved
                g[j] += moved
                out.append((g, c.scoring, f"shift {step:g} {i}->{j}"))
    first = nz[0]
    for j in (first - 1, first + 1):
        if 0 <= j < L and (j < first or len(nz) == 1 or j < nz[1]):
            g = list(f)
            g[j] += g[first]
            g[first] = 0.0
            out.append((g, c.scoring, f"first {first}->{j}"))
    if len(nz) == 1:
        for gap in (2, 4):
            j = first + gap
            if j < L:
                g = list(f)
                g[j] = step * g[first]
                g[first] -= g[j]
                out.append((g, c.scoring, f"split {step:g} {first}->{j}"))
    for other in SCORINGS:
        if other != c.scoring:
            out.append((f, other, f"scoring {other}"))
    return out


def seed_pool(budget, L, config, counts, walks, extra, n_ref, family=None) -> list[Candidate]:
    """The distinct seeds of one budget, each on the budget: the α-walk recipes ``walks`` and the
    built-in shapes with every scoring of ``config``, the baselines with their own scoring, and the
    ``extra`` recipes (kept as they are when they already meet the budget within the tolerance)."""
    shapes: list[tuple[Sequence[float], str, str]] = []
    for recipe, name in walks:
        for scoring in config.scorings:
            shapes.append((recipe.drop_fractions, scoring, name))
    for shape, name in _shape_seeds(L, config):
        for scoring in config.scorings:
            shapes.append((shape, scoring, name))
    own = {"fastv": (one_hot(L, {1: 1.0}), "fastv", "FastV K=2"),  # the baselines, with their own scoring
           "pyramid": (pyramid(L, keep=0.5).drop_fractions, "fastv", "PDrop pyramid"),
           "dart": (one_hot(L, {1: 1.0}), "dart", "DART K=2")}
    shapes += [own[b] for b in config.baselines if b in own]
    given = len(shapes)
    pre = [(b, f"{b} (pre-LLM)") for b in config.baselines if b in PRE_LLM and family in FAMILIES.get(b, (family,))]
    for r in extra:
        if r.input_fraction > 0:
            pre.append((r.scoring, f"given {r.method or 'recipe'} ({r.scoring})"))
        else:
            shapes.append((r.drop_fractions, r.scoring if r.scoring in (*SCORINGS, "dart") else "fitprune",
                           f"given {r.method or 'recipe'}"))
    pool, seen = [], set()
    p = project_input(counts, budget) if pre else None
    for scoring, name in pre:
        if p is not None and ("input", scoring) not in seen:
            seen.add(("input", scoring))
            pool.append(Candidate((0.0,) * L, scoring, name, predicted=p[1], input_fraction=p[0]))
    for i, (shape, scoring, name) in enumerate(shapes):
        as_is = counts.reduction(shape) if i >= given else math.nan  # a given recipe that meets the budget stays
        if budget <= as_is <= budget + config.tolerance:
            p = (tuple(shape), as_is)
        else:
            p = project(shape, counts, budget)
        if p is None:
            continue
        fractions, predicted = p
        key = (scoring, tuple(Recipe(fractions).drop_counts(n_ref)))
        if key in seen:
            continue
        seen.add(key)
        pool.append(Candidate(fractions, scoring, f"{name} ({scoring})", predicted=predicted))
    return pool
