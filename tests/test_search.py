"""The divergence search (fitprune/search.py) and the constrained α-walk it seeds from
(``Prepared.run(..., start=, cap=)``, ``fit(..., start=, cap=)``).

Uses the toy model (8 layers, 144 visual tokens), 16 calibration samples in 4 batches."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import fitprune
import fitprune.baselines
from fitprune.alpha_walk import Prepared
from fitprune.cost import TokenCounts, predicted_reduction
from fitprune.divergence import Divergence, divergence, reference
from fitprune.fit import fit
from fitprune.flops import ModelDims
from fitprune.search import Candidate, SearchConfig, SearchResult, _decide, project, search, split_batches
from fitprune.stats import collect_stats
from fitprune.demo.toy import toy_batches, toy_model
from reference import measured_reduction

L, N_VISUAL = 8, 144
BUDGETS = (0.3, 0.6)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup():
    model = toy_model(0)
    batches = toy_batches(16, 4, 0, "cal")
    stats = collect_stats(model, batches)
    return model, batches, stats, ModelDims.from_config(model.config.text_config)


@pytest.fixture(scope="module")
def config():
    return SearchConfig.small()


@pytest.fixture(scope="module")
def searched(setup, config):
    model, batches, stats, dims = setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = search(model, batches, stats, list(BUDGETS), dims, config=config)
    infeasible = [w for w in caught if "no candidate meets it" in str(w.message)]
    assert not infeasible  # both budgets are reachable
    return results


@pytest.fixture(scope="module")
def prepared(setup):
    return Prepared(setup[2])


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "sample_ids"}


# -- 6. split_batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 10])
@pytest.mark.parametrize("heldout", [0.05, 0.25, 0.3, 0.5, 0.9])
def test_split_batches_disjoint_cover_nonempty(n, heldout):
    search_idx, held_idx = split_batches([{}] * n, heldout)
    assert search_idx and held_idx
    assert not set(search_idx) & set(held_idx)
    assert sorted(search_idx + held_idx) == list(range(n))
    assert len(set(search_idx)) == len(search_idx) and len(set(held_idx)) == len(held_idx)


def test_split_batches_holds_out_about_the_fraction():
    search_idx, held_idx = split_batches([{}] * 8, 0.25)
    assert len(held_idx) == 2 and len(search_idx) == 6
    search_idx, held_idx = split_batches([{}] * 4, 0.5)
    assert len(held_idx) == 2 and len(search_idx) == 2


@pytest.mark.parametrize("n", [0, 1])
def test_split_batches_needs_two_batches(n):
    with pytest.raises(ValueError, match=r"at least 2"):
        split_batches([{}] * n, 0.5)


# -- 7. project ---------------------------------------------------------------------------------------


def _shapes():
    return {
        "fastv K=2": fitprune.baselines.fastv(L, layer=2, ratio=1.0).drop_fractions,
        "layer 0": (1.0,) + (0.0,) * (L - 1),
        "pyramid": fitprune.baselines.pyramid(L, keep=0.5).drop_fractions,
        "uniform": fitprune.baselines.uniform(L, ratio=0.9).drop_fractions,
        "two-stage": (0.0, 0.7, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0),
        "unnormalised": (0.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    }


@pytest.mark.parametrize("name", list(_shapes()))
@pytest.mark.parametrize("budget", [0.2, 0.45, 0.6])
def test_project_meets_budget_just(setup, name, budget):
    _, _, stats, dims = setup
    counts = TokenCounts(stats, dims)
    shape = _shapes()[name]
    out = project(shape, counts, budget)
    assert out is not None
    fractions, predicted = out
    assert len(fractions) == L
    recipe = fitprune.Recipe(fractions)  # a valid recipe (entries in [0, 1], sum <= 1)
    achieved = counts.reduction(fractions)
    assert predicted == pytest.approx(achieved, abs=1e-12)
    assert budget - 1e-12 <= achieved <= budget + 0.01
    # the same reduction predicted from the recipe through the public helper
    assert predicted_reduction(recipe, stats, dims) == pytest.approx(achieved, abs=1e-12)
    # the shape is kept: no layer outside the shape's support prunes
    support = {i for i, x in enumerate(shape) if x > 0}
    assert {i for i, x in enumerate(fractions) if x > 0} <= support


def test_project_unreachable_budget_gives_none(setup):
    _, _, stats, dims = setup
    counts = TokenCounts(stats, dims)
    last_only = (0.0,) * (L - 1) + (1.0,)
    assert counts.reduction(last_only) < 0.8  # pruning only after the last layer cannot remove 80 %
    assert project(last_only, counts, 0.8) is None
    assert project((0.0,) * L, counts, 0.3) is None  # a shape that prunes nothing
    assert project(fitprune.baselines.fastv(L, layer=2, ratio=1.0).drop_fractions, counts, 0.99) is None


def test_project_larger_budget_drops_at_least_as_many(setup):
    _, _, stats, dims = setup
    counts = TokenCounts(stats, dims)
    shape = fitprune.baselines.pyramid(L, keep=0.5).drop_fractions
    totals = [sum(fitprune.Recipe(project(shape, counts, b)[0]).drop_counts(N_VISUAL)) for b in (0.2, 0.4, 0.6)]
    assert totals[0] < totals[1] < totals[2]


# -- 8. the search --------------------------------------------------------------------------------------


def test_search_results_feasible_and_in_budget(setup, searched, config):
    model, batches, _, dims = setup
    assert [r.budget for r in searched] == list(BUDGETS)
    for b, r in zip(BUDGETS, searched):
        assert isinstance(r, SearchResult)
        assert r.feasible
        assert r.recipe.budget == b
        assert b - 1e-9 <= r.measured_reduction <= b + config.tolerance
        remeasured = measured_reduction(model, batches, r.recipe, dims)
        assert b - 1e-9 <= remeasured <= b + config.tolerance
        assert remeasured == pytest.approx(r.measured_reduction, abs=1e-9)
        assert math.isfinite(r.divergence) and r.divergence > 0.0
        assert math.isfinite(r.divergence_search)
        assert r.evaluations > 0


def test_search_beats_every_seed_on_heldout(searched):
    for r in searched:
        seeds = [c for c in r.candidates if c["seed"]]
        assert seeds
        for c in seeds:
            assert c["kl_heldout"] is not None
            assert r.divergence <= c["kl_heldout"] + 1e-12, c["origin"]
        for prefix in ("FastV K=2", "PDrop pyramid", "divprune (pre-LLM)"):
            base = [c for c in seeds if c["origin"].startswith(prefix)]
            assert base, f"no {prefix} seed at budget {r.budget}"
            assert r.divergence <= min(c["kl_heldout"] for c in base) + 1e-12
        (pre,) = [c for c in seeds if c["origin"].startswith("divprune")]
        assert pre["input_drops"] > 0 and not any(pre["drops"])  # it selects before layer 0 only
        assert pre["measured_reduction_search"] >= r.budget - 1e-9
        assert r.divergence <= r.best_seed["divergence"] + 1e-12


def test_search_decides_the_least_heldout_kl_within_tolerance(searched, config):
    """Every candidate (seed or local-search end point) whose predicted reduction on the calibration
    counts (= the measured one, cost.py) lies in [budget, budget + tolerance] is at least as divergent
    on the held-out split as the decided recipe."""
    for r in searched:
        inside = [c for c in r.candidates
                  if r.budget - 1e-9 <= c["predicted_reduction"] <= r.budget + config.tolerance]
        assert inside
        assert r.divergence == pytest.approx(min(c["kl_heldout"] for c in inside), abs=1e-12)
        decided = [c for c in inside if c["origin"] == r.origin]
        assert decided and r.measured_reduction == pytest.approx(decided[0]["predicted_reduction"], abs=1e-9)


def _div(kl: float, reduction: float, full: float = 100.0) -> Divergence:
    return Divergence(kl=kl, per_sample=np.array([kl]), flops_reduction=reduction, n_samples=1, tokens=1,
                      flops_pruned=(1.0 - reduction) * full, flops_full=full)


def test_decide_picks_least_heldout_kl_among_candidates_in_budget():
    """The decision rule on hand-made candidates: held-out KL decides (not the search split's), and
    only finite candidates whose reduction over both splits lies in [budget, budget + tolerance] count."""
    def cand(name, kl_search, kl_held, red_search, red_held=None):
        return Candidate((0.5,) + (0.0,) * (L - 1), "fitprune", name,
                         search=_div(kl_search, red_search), heldout=_div(kl_held, red_search if red_held is None else red_held))

    best_on_search = cand("best on search", 0.01, 0.50, 0.501)
    best_on_heldout = cand("best on held-out", 0.30, 0.20, 0.505)
    over = cand("over budget + tolerance", 0.0, 0.0, 0.52)
    under = cand("under budget", 0.0, 0.0, 0.499)
    nan = cand("not finite", 0.0, float("nan"), 0.50)
    split = cand("meets only over both splits", 0.0, 0.10, 0.49, 0.52)  # combined 0.505
    assert _decide([best_on_search, best_on_heldout, over, under, nan], 0.5, 0.01) is best_on_heldout
    assert _decide([best_on_search, best_on_heldout, split], 0.5, 0.01) is split
    assert _decide([over, under, nan], 0.5, 0.01) is None
    assert _decide([over], 0.5, 0.05) is over


@pytest.mark.parametrize("part, attribute", [("heldout", "divergence"), ("search", "divergence_search")])
def test_search_divergences_are_the_kl_of_the_recipe_on_each_part(setup, searched, config, part, attribute):
    model, batches, _, _ = setup
    search_idx, held_idx = split_batches(batches, config.heldout)
    idx = held_idx if part == "heldout" else search_idx
    chosen = [batches[i] for i in idx]
    ref = reference(model, chosen, tokens=config.tokens)
    for r in searched:
        d = divergence(model, chosen, r.recipe, ref)
        assert d.n_samples == sum(int(batches[i]["input_ids"].shape[0]) for i in idx)
        assert d.kl == pytest.approx(getattr(r, attribute), abs=1e-6)
        assert r.recipe.metadata[f"n_{part}"] == d.n_samples


def test_search_unreachable_budget_warns_and_is_infeasible(setup, config):
    model, batches, stats, dims = setup
    with pytest.warns(UserWarning, match="no candidate meets it"):
        (r,) = search(model, batches, stats, [0.999], dims, config=config)
    assert r.feasible is False
    assert r.budget == 0.999
    assert math.isnan(r.measured_reduction)  # nothing was run: no measurement is claimed
    assert r.recipe.metadata["predicted_reduction"] < 0.999
    assert math.isnan(r.divergence)


def test_search_needs_two_batches(setup, config):
    model, _, stats, dims = setup
    one = toy_batches(16, 16, 0, "cal")  # the same 16 samples in a single batch
    assert len(one) == 1 and one[0]["input_ids"].shape[0] == stats.num_samples
    with pytest.raises(ValueError, match="at least 2"):
        search(model, one, stats, [0.5], dims, config=config)


def test_search_rejects_bad_inputs(setup, config):
    model, batches, stats, dims = setup
    with pytest.raises(ValueError, match="samples"):
        search(model, batches[:3], stats, [0.5], dims, config=config)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="budgets"):
            search(model, batches, stats, [bad], dims, config=config)
    with pytest.raises(ValueError, match="full"):
        search(model, batches, stats, [0.5], dims, config=config, convention="fitprune-paper")
    with pytest.raises(ValueError, match="heldout"):
        SearchConfig.small(heldout=1.0)
    with pytest.raises(ValueError, match="scorings"):
        SearchConfig.small(scorings=("random",))


# -- 11. the constrained α-walk ---------------------------------------------------------------------------


def _first_layer_rule(stats, layer: int, alpha: float) -> np.ndarray:
    """Per sample, how many tokens the α-rule drops at ``layer`` when every token is still alive:
    the intersection of the longest ascending-score prefixes (cross and self) whose removal keeps
    the surviving mass >= (1 - α) of the layer's reference mass. Written out per sample."""
    out = []
    for s in range(stats.num_samples):
        n = int(stats.n_visual[s])
        sets = []
        for scores, mass in ((stats.cross[s, layer, :n], stats.cross_mass[s, layer]),
                             (stats.self_[s, layer, :n], stats.self_mass[s, layer])):
            order = np.argsort(scores, kind="stable")
            vals = scores[order].astype(np.float64)
            prefix = np.cumsum(vals)
            surviving = prefix[-1] - prefix  # after dropping the first i + 1 tokens
            k = 0
            while k < n and surviving[k] >= (1.0 - alpha) * mass:
                k += 1
            sets.append(set(order[:k].tolist()))
        out.append(len(sets[0] & sets[1]))
    return np.array(out)


def test_walk_start_drops_nothing_before_it(setup, prepared):
    stats = setup[2]
    counts = prepared.run(0.5, start=3)
    assert counts.shape == (stats.num_samples, L)
    assert np.all(counts[:, :3] == 0)
    assert counts[:, 3:].sum() > 0
    # at the first allowed layer every token is alive, so it drops what the α-rule alone says
    assert counts[:, 3].tolist() == _first_layer_rule(stats, 3, 0.5).tolist()
    # and the unconstrained walk's first layer is the α-rule there too (checks the helper itself)
    assert prepared.run(0.5)[:, 0].tolist() == _first_layer_rule(stats, 0, 0.5).tolist()


def test_walk_cap_bounds_every_layer(setup, prepared):
    stats = setup[2]
    limit = math.floor(0.1 * N_VISUAL)
    uncapped = prepared.run(0.5)
    assert uncapped.max() > limit  # the cap really binds on this walk
    capped = prepared.run(0.5, cap=0.1)
    assert capped.max() <= limit
    assert capped.sum() > 0
    # at the first layer, the cap takes min(α-rule count, limit)
    assert capped[:, 0].tolist() == np.minimum(_first_layer_rule(stats, 0, 0.5), limit).tolist()
    # no sample ever drops more tokens than it has
    assert np.all(capped.sum(axis=1) <= stats.n_visual)


def test_walk_cap_one_equals_uncapped(prepared):
    for alpha in (0.3, 0.5, 0.9, 1.0):
        assert np.array_equal(prepared.run(alpha, cap=1.0), prepared.run(alpha))
    assert np.array_equal(prepared.run(0.5, start=2, cap=1.0), prepared.run(0.5, start=2))


def test_walk_start_and_cap_together(setup, prepared):
    stats = setup[2]
    counts = prepared.run(0.9, start=2, cap=0.2)
    limit = math.floor(0.2 * N_VISUAL)
    assert np.all(counts[:, :2] == 0)
    assert counts.max() <= limit
    assert counts[:, 2].tolist() == np.minimum(_first_layer_rule(stats, 2, 0.9), limit).tolist()


# -- 12. fit with start / cap --------------------------------------------------------------------------


def test_fit_with_start(setup):
    model, batches, stats, dims = setup
    (r,) = fit(stats, [0.5], dims, start=2)
    assert r.feasible
    assert all(f == 0.0 for f in r.recipe.drop_fractions[:2])
    assert any(f > 0.0 for f in r.recipe.drop_fractions[2:])
    assert r.predicted_reduction >= 0.5
    assert predicted_reduction(r.recipe, stats, dims) >= 0.5 - 1e-12
    assert r.recipe.metadata["start"] == 2
    assert 0.5 - 1e-9 <= measured_reduction(model, batches, r.recipe, dims) <= 0.51


def test_fit_with_cap(setup):
    _, _, stats, dims = setup
    (r,) = fit(stats, [0.5], dims, cap=0.2)
    assert r.feasible and r.predicted_reduction >= 0.5
    assert max(r.recipe.drop_counts(N_VISUAL)) <= math.floor(0.2 * N_VISUAL)
    assert r.recipe.metadata["cap"] == 0.2


def test_fit_start_that_cannot_reach_the_budget_warns(setup):
    _, _, stats, dims = setup
    with pytest.warns(UserWarning, match="after layer 6"):
        (r,) = fit(stats, [0.8], dims, start=6)
    assert not r.feasible
    assert r.predicted_reduction < 0.8
    assert all(f == 0.0 for f in r.recipe.drop_fractions[:6])


@pytest.mark.parametrize("start", [L, L + 3, -1, 2.0, True, None])
def test_fit_start_out_of_range_raises(setup, start):
    _, _, stats, dims = setup
    with pytest.raises(ValueError, match="start"):
        fit(stats, [0.5], dims, start=start)


@pytest.mark.parametrize("cap", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_fit_bad_cap_raises(setup, cap):
    _, _, stats, dims = setup
    with pytest.raises(ValueError, match="cap"):
        fit(stats, [0.5], dims, cap=cap)


def test_fit_cap_rejects_bool(setup):
    _, _, stats, dims = setup
    with pytest.raises(ValueError, match="cap"):
        fit(stats, [0.5], dims, cap=True)


def test_fit_start_and_cap_refuse_a_walker(setup):
    _, _, stats, dims = setup
    with pytest.raises(ValueError, match="walker"):
        fit(stats, [0.5], dims, start=1, walker=lambda a: np.zeros((stats.num_samples, L), dtype=np.int64))


def test_local_moves_stay_on_budget_and_never_lose_to_a_seed(setup):
    """With local moves on, the moved candidates are projected back onto the budget (equal FLOPs) and
    the decision still never picks something more divergent on the held-out part than a seed."""
    model, batches, stats, dims = setup
    config = SearchConfig.small(rounds=2, max_evals=40, finalists=2, scorings=("fitprune", "fastv"))
    counts = TokenCounts(stats, dims)
    (r,) = search(model, batches, stats, [0.5], dims, config=config)
    moved = [c for c in r.candidates if not c["seed"]]
    assert moved, "local moves produced no candidate"
    for c in moved:
        fractions = [d / 144 for d in c["drops"]]
        assert 0.5 - 1e-9 <= counts.reduction(fractions) <= 0.5 + config.tolerance
    seeds = [c["kl_heldout"] for c in r.candidates if c["seed"]]
    assert r.divergence <= min(seeds) + 1e-12
    assert r.evaluations <= config.max_evals + 2 * len(seeds)  # seeds on both splits, moves within the bound
