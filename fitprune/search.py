"""Fit each budget to the recipe that changes the model's answers least (DESIGN §2b).

The α-walk (:mod:`fitprune.fit`) fits a schedule to attention mass, a proxy. This module searches
schedules directly for the one whose output divergence (:mod:`fitprune.divergence`, KL of the
next-token distribution against the unpruned model, no labels) is smallest at the budget:

1. **Seeds**, each projected onto the budget (:func:`project`: the schedule's shape is kept and
   scaled until the predicted reduction on the calibration token counts just meets the budget):
   the α-walk (statistical; refined and progressive when asked), the α-walk with a constrained
   first pruning layer and a per-layer cap, one pruning layer at each K (FastV's shape), FastV
   itself (K = 2), multi-stage pyramids (PDrop's and two-/three-stage shapes), and any recipes the
   caller adds; each with c·s and with FastV scoring.
2. **Ranking** on the *search* split of the calibration batches.
3. **Local moves** from the best seeds: shift part of a layer's drops to the next or previous
   layer, move the first pruning layer, split a single pruning layer in two, swap the scoring;
   each move is projected back onto the budget (equal FLOPs). Greedy best-improvement, with the
   step halved when no move helps.
4. **Decision** on the *held-out* split: every seed and every local-search end point is measured
   there, and the least divergent recipe whose *measured* reduction meets the budget wins. Both
   divergences are reported, so overfitting to the search split shows.

Because every seed is among the decided candidates, the result's held-out divergence is never
above that of any seed, the baselines included. Whether that carries over to test accuracy is the
measured claim (README, "Recipes that win").
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from .alpha_walk import Prepared
from .baselines import pyramid
from .calibration import CalibrationStats
from .cost import TokenCounts
from .divergence import Divergence, NonFiniteDivergence, Reference, divergence, reference
from .fit import fit
from .flops import ModelDims
from .recipe import Recipe
from .search_space import (PRE_LLM, SCORINGS, Candidate, SearchConfig, neighbours, one_hot, project, project_input,
                           seed_pool, split_batches)

__all__ = ["SCORINGS", "Candidate", "RecipeSearch", "SearchConfig", "SearchResult", "project", "search", "split_batches"]


@dataclass(frozen=True)
class SearchResult:
    """The decided recipe of one budget, its divergences, and what the search saw.

    ``divergence``: KL on the held-out split (what decided); ``divergence_search``: on the search
    split; ``measured_reduction``: FLOPs removed, measured on all calibration samples;
    ``best_seed``: the seed with the least held-out KL (origin and KL), for the gain of the local
    moves; ``candidates``: every candidate evaluated (:meth:`Candidate.row`).
    """

    recipe: Recipe
    budget: float
    feasible: bool
    divergence: float
    divergence_search: float
    measured_reduction: float
    origin: str
    evaluations: int
    seconds: float
    best_seed: dict
    candidates: tuple[dict, ...]


# -- the search ------------------------------------------------------------------------------------


class _Evaluator:
    """Divergence passes with a cache (one per distinct recipe and split) and a pass counter."""

    def __init__(self, model, batches, refs: dict[str, Reference], n_ref: int, log):
        self.model, self.batches, self.refs, self.n_ref, self.log = model, batches, refs, n_ref, log
        self.cache: dict[tuple, Divergence] = {}
        self.passes = 0

    def __call__(self, c: Candidate, split: str, recipe: Recipe | None = None) -> Divergence:
        """Measure ``c`` on ``split`` (``recipe``: the exact recipe to run, e.g. a random one with its seed)."""
        recipe = recipe if recipe is not None else c.recipe()
        key = (split, recipe.scoring, recipe.seed if recipe.scoring == "random" else None,
               tuple(recipe.drop_counts(self.n_ref)), recipe.input_count(self.n_ref), recipe.merge_count(self.n_ref))
        if key not in self.cache:
            self.cache[key] = divergence(self.model, self.batches[split], recipe, self.refs[split])
            self.passes += 1
        d = self.cache[key]
        setattr(c, split, d)
        return d


def _rank(c: Candidate, split: str) -> float:
    d = getattr(c, split)
    return d.kl if d is not None and d.finite else math.inf


class RecipeSearch:
    """One calibration set, split and referenced once: fit budgets, and measure any recipe on it.

    ``batches``: the calibration batches ``stats`` was collected from, in the same order (the
    unpruned statistics seed the α-walks). Building it splits the batches (:func:`split_batches`)
    and computes the unpruned reference of each split (two passes). Divergences are cached per
    distinct recipe, so measuring a baseline that was also a seed costs nothing.
    """

    def __init__(self, model: nn.Module, batches: Sequence, stats: CalibrationStats, dims: ModelDims, *,
                 config: SearchConfig | None = None, convention: str = "full", family: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = config or SearchConfig()
        self.say = log or (lambda msg: None)
        batches = list(batches)
        n_batch = [int(b["input_ids"].shape[0]) for b in batches]
        if sum(n_batch) != stats.num_samples:
            raise ValueError(f"the batches hold {sum(n_batch)} samples but the statistics {stats.num_samples}: pass "
                             "the calibration batches the statistics were collected from, in the same order")
        if convention != "full":
            raise ValueError(f"the search measures FLOPs from executed token counts ('full' convention), not "
                             f"{convention!r}")
        search_idx, held_idx = split_batches(batches, self.config.heldout)
        offsets = np.concatenate([[0], np.cumsum(n_batch)])
        self.rows = {name: np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
                     for name, idx in (("search", search_idx), ("heldout", held_idx))}
        self.parts = {"search": [batches[i] for i in search_idx], "heldout": [batches[i] for i in held_idx]}
        self.say(f"search: {len(self.rows['search'])} samples to search, {len(self.rows['heldout'])} held out to decide")
        self.model, self.stats, self.dims, self.convention = model, stats, dims, convention
        self.family = family if family is not None else stats.family
        refs = {name: reference(model, part, tokens=self.config.tokens) for name, part in self.parts.items()}
        self.counts = TokenCounts(stats, dims, convention)
        self.n_ref = int(stats.n_visual.max())
        self.evaluate = _Evaluator(model, self.parts, refs, self.n_ref, self.say)
        self._walks: dict[float, list] = {}

    @property
    def calibration(self) -> dict:
        """Which samples the divergences are measured on (stored with every recipe)."""
        return {"calib_id": self.stats.calib_id, "n_search": int(len(self.rows["search"])),
                "n_heldout": int(len(self.rows["heldout"])), "heldout": self.config.heldout,
                "tokens": self.config.tokens}

    def baseline(self, name: str, budget: float) -> Recipe:
        """``"fastv"`` (K = 2, its own scoring), ``"dart"`` (K = 2, DART's duplication rule), ``"pyramid"``
        (PDrop's stages, FastV scoring), or the pre-LLM ``"divprune"`` and ``"visionzip"``, matched to
        ``budget`` on the calibration token counts exactly as the search's seeds are.

        A budget the baseline's shape cannot reach (even dropping every visual token at its first
        pruning layer falls short) gives that recipe, with ``metadata["feasible"] = False`` and a
        warning, as the search does for a budget no candidate meets."""
        L = self.dims.num_layers
        shapes = {"fastv": (one_hot(L, {1: 1.0}), "fastv", {"K": 2}),
                  "dart": (one_hot(L, {1: 1.0}), "dart", {"K": 2}),
                  "pyramid": (pyramid(L, keep=0.5).drop_fractions, "fastv", {"stages": pyramid(L).metadata["stages"]})}
        if name in PRE_LLM:
            return self._input_baseline(name, budget)
        if name not in shapes:
            raise ValueError(f"unknown baseline {name!r}; known: {', '.join([*shapes, *PRE_LLM])}")
        shape, scoring, meta = shapes[name]
        p = project(shape, self.counts, budget)
        feasible = p is not None
        if not feasible:  # the shape at its limit: every visual token dropped at its first pruning layer
            first = int(np.flatnonzero(np.asarray(shape) > 0)[0])
            drops = tuple(one_hot(L, {first: 1.0}))
            p = (drops, self.counts.reduction(drops))
            warnings.warn(f"budget {budget:g} is out of reach for {name}: dropping every visual token at its first "
                          f"pruning layer removes {p[1]:.4f} of the prefill; returning that recipe with "
                          "feasible=False", stacklevel=2)
        return Recipe(p[0], scoring=scoring, method=name, family=self.family, checkpoint=self.stats.checkpoint,
                      budget=budget, flops_convention=self.convention,
                      metadata={**meta, "predicted_reduction": p[1], "matched_on": self.stats.calib_id,
                                "feasible": feasible})

    def _input_baseline(self, name: str, budget: float) -> Recipe:
        """A pre-LLM baseline (DivPrune, VisionZip) with the least input fraction that meets ``budget``."""
        p = project_input(self.counts, budget)
        feasible = p is not None
        if not feasible:  # only a prompt without visual tokens could be cheaper: remove them all
            p = (1.0, self.counts.reduction([0.0] * self.dims.num_layers, 1.0))
            warnings.warn(f"budget {budget:g} is out of reach for {name}: removing every visual token before layer 0 "
                          f"removes {p[1]:.4f} of the prefill; returning that recipe with feasible=False", stacklevel=3)
        recipe = PRE_LLM[name](self.dims.num_layers, ratio=p[0], family=self.family)
        return recipe.with_updates(checkpoint=self.stats.checkpoint, budget=budget, flops_convention=self.convention,
                                   metadata={**recipe.metadata, "predicted_reduction": p[1],
                                             "matched_on": self.stats.calib_id, "feasible": feasible})

    def measure(self, recipe: Recipe) -> dict:
        """The recipe's divergence on both splits and its FLOPs reduction measured on all calibration samples."""
        c = Candidate(tuple(recipe.drop_fractions), recipe.scoring, recipe.method or "recipe", seed=False)
        self.evaluate(c, "search", recipe)
        self.evaluate(c, "heldout", recipe)
        return {"divergence": c.heldout.kl, "divergence_search": c.search.kl, "measured_reduction": _combined_reduction(c),
                "divergence_finite": bool(c.heldout.finite and c.search.finite), **self.calibration}

    def fit(self, budgets: Sequence[float], seeds: Mapping[float, Sequence[Recipe]] | None = None) -> list[SearchResult]:
        """The least divergent recipe per budget (module docstring); results in the order of ``budgets``.

        ``seeds``: extra recipes per budget (e.g. a user's own), projected onto the budget like the
        built-in seeds. A budget no candidate meets gives a result with ``feasible=False`` (the recipe
        that drops every visual token after layer 0) and a warning.
        """
        budgets = [float(b) for b in budgets]
        bad = [b for b in budgets if isinstance(b, bool) or not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"budgets must lie in (0, 1) (fractions of prefill FLOPs to remove); got {bad}")
        missing = [b for b in budgets if b not in self._walks]
        if missing:
            self._walks.update(_walk_seeds(self.model, self.parts["search"], self.stats.subset(self.rows["search"]),
                                           missing, self.dims, self.config, self.family))
        return [self._fit_one(b, list((seeds or {}).get(b, []))) for b in budgets]

    def _fit_one(self, b: float, extra: list[Recipe]) -> SearchResult:
        config, evaluate, L = self.config, self.evaluate, self.dims.num_layers
        t0, passes0 = time.perf_counter(), evaluate.passes
        pool = seed_pool(b, L, config, self.counts, self._walks.get(b, []), extra, self.n_ref, self.family)
        if not pool:
            return _infeasible(b, L, self.counts, self.family, self.stats, self.convention)
        for c in pool:
            evaluate(c, "search")
            evaluate(c, "heldout")
        finite = sorted((c for c in pool if math.isfinite(_rank(c, "search"))), key=lambda c: _rank(c, "search"))
        if not finite:
            raise NonFiniteDivergence(f"budget {b:g}: every candidate's divergence is NaN or infinite on the search "
                                      "split; the pruned model's logits are not finite (check the dtype)")
        self.say(f"budget {b:g}: {len(pool)} seeds, best on the search split {finite[0].origin} "
                 f"(KL {_rank(finite[0], 'search'):.4f})")
        ends = _local_search(finite[:config.finalists], b, self.counts, config, evaluate, passes0)
        for c in ends:
            evaluate(c, "heldout")
        decided = _decide(pool + ends, b, config.tolerance)
        if decided is None:
            return _infeasible(b, L, self.counts, self.family, self.stats, self.convention)
        best_seed = min(pool, key=lambda c: _rank(c, "heldout"))
        measured = _combined_reduction(decided)
        seconds = time.perf_counter() - t0
        meta = {"fit": "divergence-search", "origin": decided.origin, "calibration": self.stats.calib_id,
                "n_samples": int(self.stats.num_samples), "divergence": decided.heldout.kl,
                "divergence_search": decided.search.kl, "measured_reduction": measured,
                "predicted_reduction": decided.predicted,
                "best_seed": {"origin": best_seed.origin, "divergence": best_seed.heldout.kl,
                              "divergence_search": best_seed.search.kl},
                "evaluations": evaluate.passes - passes0, "seconds": seconds, "n_visual_ref": self.n_ref,
                **{k: v for k, v in self.calibration.items() if k != "calib_id"}}
        recipe = decided.recipe(method="fitprune", family=self.family, checkpoint=self.stats.checkpoint, budget=b,
                                flops_convention=self.convention, metadata=meta)
        self.say(f"budget {b:g}: decided {decided.origin}, KL held-out {decided.heldout.kl:.4f} (search "
                 f"{decided.search.kl:.4f}; best seed {best_seed.origin} {best_seed.heldout.kl:.4f}), measured "
                 f"−{measured:.4f}, {meta['evaluations']} passes, {seconds:.1f}s")
        return SearchResult(recipe=recipe, budget=b, feasible=True, divergence=decided.heldout.kl,
                            divergence_search=decided.search.kl, measured_reduction=measured, origin=decided.origin,
                            evaluations=meta["evaluations"], seconds=seconds, best_seed=meta["best_seed"],
                            candidates=tuple(c.row(self.n_ref) for c in pool + ends))


def search(model: nn.Module, batches: Sequence, stats: CalibrationStats, budgets: Sequence[float], dims: ModelDims, *,
           config: SearchConfig | None = None, convention: str = "full", family: str | None = None,
           seeds: Mapping[float, Sequence[Recipe]] | None = None,
           log: Callable[[str], None] | None = None) -> list[SearchResult]:
    """:meth:`RecipeSearch.fit` in one call: the least divergent recipe per budget."""
    return RecipeSearch(model, batches, stats, dims, config=config, convention=convention, family=family,
                        log=log).fit(budgets, seeds)


def _combined_reduction(c: Candidate) -> float:
    """Reduction measured on both splits together: ``1 - Σ pruned / Σ unpruned`` over every sample."""
    return 1.0 - (c.search.flops_pruned + c.heldout.flops_pruned) / (c.search.flops_full + c.heldout.flops_full)


def _walk_seeds(model, batches, stats: CalibrationStats, budgets, dims, config: SearchConfig, family):
    """α-walk recipes per budget: statistical (with each first-layer / cap constraint), refined, progressive."""
    out: dict[float, list[tuple[Recipe, str]]] = {b: [] for b in budgets}
    prepared = Prepared(stats)
    statistical = None
    for start in config.walk_starts:
        for cap in config.walk_caps:
            if start >= dims.num_layers:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unreachable constrained budget is just not a seed
                fitted = fit(stats, budgets, dims, family=family, start=start, cap=cap, prepared=prepared)
            for b, r in zip(budgets, fitted):
                if r.feasible:
                    name = "α-walk" + (f" start {start}" if start else "") + (f" cap {cap:g}" if cap else "")
                    out[b].append((r.recipe, name))
            if start == 0 and cap is None:
                statistical = fitted
    if statistical is None:
        statistical = fit(stats, budgets, dims, family=family, prepared=prepared)
    if config.refine:
        from .progressive import refine

        for b, r in zip(budgets, statistical):
            if r.feasible:
                out[b].append((refine(model, batches, r, dims).after.recipe, "α-walk refined"))
    if config.progressive:
        from .progressive import fit_progressive

        for b, r in zip(budgets, fit_progressive(model, batches, stats, budgets, dims, family=family)):
            if r.feasible:
                out[b].append((r.recipe, "α-walk progressive"))
    return out


def _local_search(starts: list[Candidate], budget, counts, config: SearchConfig, evaluate: _Evaluator, passes0: int):
    """Greedy best-improvement from each start on the search split; returns the end points."""
    ends = []
    for c in starts:
        best, step = c, 0.5
        for _ in range(config.rounds):
            if evaluate.passes - passes0 >= config.max_evals:
                break
            tried = []
            for shape, scoring, move in neighbours(best, step):
                if evaluate.passes - passes0 >= config.max_evals:
                    break
                p = project(shape, counts, budget)
                if p is None:
                    continue
                n = Candidate(p[0], scoring, f"{best.origin} · {move}", predicted=p[1], seed=False)
                evaluate(n, "search")
                tried.append(n)
            better = [n for n in tried if _rank(n, "search") < _rank(best, "search")]
            if better:
                best = min(better, key=lambda n: _rank(n, "search"))
            elif step > 0.2:
                step /= 2
            else:
                break
        if best is not c:
            ends.append(best)
    return ends


def _decide(cands: list[Candidate], budget: float, tolerance: float) -> Candidate | None:
    ok = []
    for c in cands:
        if c.search is None or c.heldout is None or not (c.search.finite and c.heldout.finite):
            continue
        m = _combined_reduction(c)
        if budget - 1e-9 <= m <= budget + tolerance + 1e-9:
            ok.append(c)
    return min(ok, key=lambda c: (c.heldout.kl, c.search.kl)) if ok else None


def _infeasible(budget, L, counts: TokenCounts, family, stats, convention) -> SearchResult:
    everything = (1.0,) + (0.0,) * (L - 1)
    red = counts.reduction(everything)
    warnings.warn(f"budget {budget:g}: no candidate meets it (dropping every visual token after layer 0 removes "
                  f"{red:.4f} of the prefill); returning that recipe with feasible=False", stacklevel=3)
    recipe = Recipe(everything, method="fitprune", family=family, checkpoint=stats.checkpoint, budget=budget,
                    flops_convention=convention, metadata={"fit": "divergence-search", "feasible": False,
                                                           "predicted_reduction": red})
    return SearchResult(recipe=recipe, budget=budget, feasible=False, divergence=math.nan,
                        divergence_search=math.nan, measured_reduction=math.nan, origin="infeasible", evaluations=0,
                        seconds=0.0, best_seed={}, candidates=())
