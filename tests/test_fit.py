"""The statistical fit (fitprune.fit) and its statistics container (fitprune.calibration).

The walk is checked against ``_brute_walk``: an independent per-sample implementation with Python
loops, explicit token sets and the budget check evaluated *inside* the layer loop with
``flops.layer_macs`` (the library instead walks every sample at once without a stop and truncates).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyarrow as pa
import pytest

from fitprune.calibration import LAYER_SCHEMA, TOKEN_SCHEMA, CalibrationStats, synthetic_stats
from fitprune.alpha_walk import Prepared as _Prepared
from fitprune.fit import fit, predicted_reduction, walk
from fitprune.flops import ModelDims, layer_macs, prefill_macs, recipe_reduction, recipe_token_schedule
from fitprune.recipe import Recipe

L = 6


def _dims(num_layers):
    return ModelDims(
        hidden_size=64, num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=160, vocab_size=100
    )


DIMS = _dims(L)
CONVS = ("full", "fitprune-paper")


@pytest.fixture(scope="module")
def ragged():
    nv = [40, 33, 40, 25, 38, 40, 12, 29]
    return synthetic_stats(8, L, nv, n_system=[5, 3, 5, 0, 7, 5, 4, 6], n_text=[8, 12, 3, 9, 8, 1, 20, 6], seed=3)


@pytest.fixture(scope="module")
def uniform():
    return synthetic_stats(8, L, 40, n_system=5, n_text=8, seed=1)


@pytest.fixture(scope="module")
def wide():  # enough layers and tokens that one token is a small step of the budget
    return synthetic_stats(16, 16, 240, n_system=10, n_text=14, seed=2)


# -- an independent reference of the walk --------------------------------------------------------


def _prefix(alive, scores, threshold):
    """Longest ascending-score prefix of ``alive`` whose removal keeps ``total - removed >= threshold``."""
    order = sorted(alive, key=lambda v: (float(scores[v]), v))
    total = 0.0
    for v in order:
        total += float(scores[v])
    removed, best = 0.0, 0
    for k, v in enumerate(order, start=1):
        removed += float(scores[v])
        if total - removed >= threshold:
            best = k
        else:
            break
    return set(order[:best])


def _brute_walk(stats, alpha, dims, budget, convention, stop):
    S = stats.num_samples
    other = [0 if convention == "fitprune-paper" else int(stats.n_system[s] + stats.n_text[s]) for s in range(S)]
    alive = [list(range(int(stats.n_visual[s]))) for s in range(S)]
    full = [dims.num_layers * layer_macs(dims, len(alive[s]) + other[s], len(alive[s]) + other[s], convention) for s in range(S)]
    spent = [0.0] * S
    stopped = [False] * S
    counts = np.zeros((S, dims.num_layers), dtype=np.int64)
    for l in range(dims.num_layers):
        forecast = [
            spent[s] + (dims.num_layers - l) * layer_macs(dims, len(alive[s]) + other[s], len(alive[s]) + other[s], convention)
            for s in range(S)
        ]
        if stop == "mean":
            if math.fsum(forecast) <= (1 - budget) * math.fsum(full):
                stopped = [True] * S
        else:
            stopped = [stopped[s] or forecast[s] <= (1 - budget) * full[s] for s in range(S)]
        for s in range(S):
            n_in = len(alive[s])
            if not stopped[s] and alpha > 0:
                by_cross = _prefix(alive[s], stats.cross[s, l], (1 - alpha) * stats.cross_mass[s, l])
                by_self = _prefix(alive[s], stats.self_[s, l], (1 - alpha) * stats.self_mass[s, l])
                gone = by_cross & by_self
                alive[s] = [v for v in alive[s] if v not in gone]
                counts[s, l] = len(gone)
            spent[s] += layer_macs(dims, n_in + other[s], len(alive[s]) + other[s], convention)
    return counts


# -- the walk -------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVS)
@pytest.mark.parametrize("stop", ["mean", "sample"])
def test_walk_matches_brute_force(ragged, uniform, convention, stop):
    for stats in (ragged, uniform):
        for alpha in (0.03, 0.15, 0.4, 0.75, 1.0):
            for budget in (0.0, 0.15, 0.4, 0.7, 0.95):
                got = walk(stats, alpha, DIMS, budget, convention, stop=stop)
                want = _brute_walk(stats, alpha, DIMS, budget, convention, stop)
                np.testing.assert_array_equal(got, want, err_msg=f"alpha={alpha} budget={budget}")


def test_alpha_zero_drops_nothing(ragged):
    for budget in (0.1, 0.9):
        assert not walk(ragged, 0.0, DIMS, budget, "full").any()


def test_alpha_one_drops_everything_at_layer_zero(ragged):
    counts = walk(ragged, 1.0, DIMS, 0.5, "fitprune-paper")
    np.testing.assert_array_equal(counts[:, 0], ragged.n_visual)
    assert not counts[:, 1:].any()
    assert not walk(ragged, 1.0, DIMS, 0.0, "fitprune-paper").any()  # budget 0: already met


def test_walk_keeps_alpha_of_the_mass_where_it_prunes(uniform):
    prep = _Prepared(uniform)
    for alpha in (0.1, 0.3, 0.6):
        counts, (cross_left, self_left) = prep.run(alpha, track=True)
        pruned = counts > 0
        assert pruned.any()
        assert np.all(cross_left[pruned] >= (1 - alpha) * uniform.cross_mass[pruned] - 1e-12)
        assert np.all(self_left[pruned] >= (1 - alpha) * uniform.self_mass[pruned] - 1e-12)


# -- the fit --------------------------------------------------------------------------------------

GRID = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


@pytest.mark.parametrize("convention", CONVS)
@pytest.mark.parametrize("stop", ["mean", "sample"])
def test_fitted_recipes_meet_their_budget(wide, convention, stop):
    dims = _dims(16)
    results = fit(wide, GRID, dims, convention=convention, stop=stop)
    n_other = 0 if convention == "fitprune-paper" else 24
    for b, r in zip(GRID, results):
        assert r.feasible
        assert r.recipe.budget == b and r.recipe.flops_convention == convention
        # every sample has the same counts, so the calibration-set reduction is flops.recipe_reduction
        reduction = recipe_reduction(r.recipe, dims, 240, n_other, convention)
        assert r.predicted_reduction == pytest.approx(reduction, abs=1e-12)
        assert b <= reduction <= b + 0.01, (b, reduction)


@pytest.mark.parametrize("stop", ["mean", "sample"])
def test_untrimmed_recipe_is_the_floored_mean_of_the_walk(ragged, uniform, stop):
    for stats in (uniform, ragged):
        for r in fit(stats, [0.2, 0.5, 0.8], DIMS, convention="fitprune-paper", stop=stop, trim=False, monotone=False):
            counts = walk(stats, r.alpha, DIMS, r.budget, "fitprune-paper", stop=stop)  # (S, L)
            mean = (counts * (40 / stats.n_visual)[:, None]).mean(axis=0)
            assert r.recipe.drop_counts(40) == [int(math.floor(x + 1e-9)) for x in mean]
            assert r.predicted_reduction >= r.budget and r.recipe.metadata["trimmed"] == 0


@pytest.mark.parametrize("convention", CONVS)
def test_fit_is_monotone_in_the_budget(ragged, convention):
    grid = [0.02 * i for i in range(1, 40)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the top of the grid is infeasible under "full"
        results = fit(ragged, grid, DIMS, convention=convention)
    cums = np.array([np.cumsum(r.recipe.drop_fractions) for r in results])  # (budgets, L)
    assert np.all(np.diff(cums, axis=0) >= -1e-12)  # never keeps more tokens at any depth
    totals = [sum(r.recipe.drop_counts(40)) for r in results]
    assert totals == sorted(totals)
    reductions = [r.predicted_reduction for r in results]
    assert reductions == sorted(reductions)


def test_budget_zero_gives_the_empty_recipe(uniform):
    (r,) = fit(uniform, [0.0], DIMS)
    assert r.recipe.is_noop and r.feasible and r.alpha == 0.0 and r.predicted_reduction == 0.0
    (tiny,) = fit(uniform, [1e-4], DIMS)
    assert 0 < sum(tiny.recipe.drop_counts(40)) <= 2


def test_infeasible_budget_is_flagged(uniform):
    with pytest.warns(UserWarning, match="cannot be met"):
        (r,) = fit(uniform, [0.97], DIMS, convention="full")
    assert not r.feasible and r.predicted_reduction < 0.97
    assert r.recipe.drop_counts(40) == [40] + [0] * (L - 1)  # drops everything it can
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ok,) = fit(uniform, [0.9], DIMS, convention="fitprune-paper")
    assert ok.feasible


def test_fit_result_fields_and_determinism(ragged):
    a = fit(ragged, [0.3, 0.6, 0.3], DIMS, family="llava")
    b = fit(ragged, [0.3, 0.6, 0.3], DIMS, family="llava")
    assert a == b and a[0] == a[2]
    r = a[1]
    assert r.recipe.method == "fitprune" and r.recipe.scoring == "fitprune" and r.recipe.family == "llava"
    assert r.recipe.checkpoint == ragged.checkpoint
    meta = r.recipe.metadata
    assert meta["alpha"] == r.alpha and meta["fit"] == "statistical"
    assert meta["calibration"] == ragged.calib_id and meta["n_samples"] == ragged.num_samples
    assert meta["n_visual_ref"] == 40 and 0 < r.alpha <= 1 and r.iterations == 8
    assert len(r.per_layer_mass_loss) == L and all(0 <= x <= 1 for x in r.per_layer_mass_loss)
    assert r.predicted_reduction == pytest.approx(predicted_reduction(r.recipe, ragged, DIMS, "full"), abs=0)
    # tol: a finer bracket never lands on a larger alpha
    (fine,) = fit(ragged, [0.6], DIMS, tol=1e-4)
    assert fine.alpha <= r.alpha and fine.predicted_reduction >= 0.6 and fine.iterations > r.iterations


@pytest.mark.parametrize("convention", CONVS)
def test_predicted_reduction_is_the_calibration_total(ragged, convention):
    recipe = Recipe.from_counts([3, 5, 0, 7, 2, 1], 40)
    pruned = full = 0.0
    for s in range(ragged.num_samples):
        other = 0 if convention == "fitprune-paper" else int(ragged.n_system[s] + ragged.n_text[s])
        nv = int(ragged.n_visual[s])
        attn, mlp = recipe_token_schedule(recipe, nv, other)
        pruned += prefill_macs(DIMS, attn, mlp, convention)
        full += prefill_macs(DIMS, [nv + other] * L, None, convention)
    assert predicted_reduction(recipe, ragged, DIMS, convention) == pytest.approx(1 - pruned / full, rel=1e-12)


def test_a_custom_walker_replaces_the_replay(ragged):
    prep = _Prepared(ragged)
    calls = []

    def walker(alpha):
        calls.append(alpha)
        return prep.run(alpha)

    mine = fit(ragged, [0.3, 0.6], DIMS, walker=walker)
    ref = fit(ragged, [0.3, 0.6], DIMS)
    assert [r.recipe for r in mine] == [r.recipe for r in ref] and len(calls) == len(set(calls))
    assert all(math.isnan(x) for x in mine[0].per_layer_mass_loss)
    with pytest.raises(ValueError, match="walker"):
        fit(ragged, [0.3], DIMS, walker=lambda a: np.zeros((2, 2), dtype=int))


def test_progress_is_called_once_per_budget(uniform):
    seen = []
    fit(uniform, [0.5, 0.2, 0.5], DIMS, progress=lambda done, total, r: seen.append((done, total, r.budget)))
    assert seen == [(1, 3, 0.2), (2, 3, 0.5), (3, 3, 0.5)]


@pytest.mark.parametrize(
    "budgets, match", [([1.0], r"\[0, 1\)"), ([-0.1], r"\[0, 1\)"), ([float("nan")], "number"), (["0.5"], "number")]
)
def test_bad_budgets_raise(uniform, budgets, match):
    with pytest.raises(ValueError, match=match):
        fit(uniform, budgets, DIMS)


def test_bad_inputs_raise(uniform):
    other = ModelDims(hidden_size=64, num_layers=L + 1, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=160, vocab_size=0)
    with pytest.raises(ValueError, match="re-collect"):
        fit(uniform, [0.5], other)
    with pytest.raises(ValueError, match="convention"):
        fit(uniform, [0.5], DIMS, convention="nope")
    with pytest.raises(ValueError, match="stop rule"):
        fit(uniform, [0.5], DIMS, stop="nope")
    with pytest.raises(ValueError, match="tol"):
        fit(uniform, [0.5], DIMS, tol=0)
    with pytest.raises(ValueError, match="alpha"):
        walk(uniform, 1.5, DIMS, 0.5)
    with pytest.raises(TypeError, match="CalibrationStats"):
        fit({"cross": 1}, [0.5], DIMS)
    assert fit(uniform, [], DIMS) == []


# -- the statistics container ---------------------------------------------------------------------


def _fields(stats):
    return dict(
        cross=stats.cross, self_=stats.self_, n_visual=stats.n_visual, n_system=stats.n_system, n_text=stats.n_text,
        cross_mass=stats.cross_mass, self_mass=stats.self_mass,
    )


def test_stats_validation(ragged):
    f = _fields(ragged)
    with pytest.raises(ValueError, match="empty"):
        CalibrationStats(**{**f, "cross": f["cross"][:0], "self_": f["self_"][:0]})
    with pytest.raises(ValueError, match="must agree"):
        CalibrationStats(**{**f, "self_": f["self_"][:, :-1]})
    with pytest.raises(ValueError, match="cross_mass"):
        CalibrationStats(**{**f, "cross_mass": f["cross_mass"][:, :-1]})
    with pytest.raises(ValueError, match="NaN beyond"):
        bad = f["cross"].copy()
        bad[1, 0, 35] = 0.01  # sample 1 has 33 visual tokens
        CalibrationStats(**{**f, "cross": bad})
    with pytest.raises(ValueError, match="disagrees"):
        CalibrationStats(**{**f, "cross_mass": f["self_mass"]})
    with pytest.raises(ValueError, match="unique"):
        CalibrationStats(**f, sample_ids=["a"] * 8)
    with pytest.raises(ValueError, match="n_visual"):
        CalibrationStats(**{**f, "n_visual": np.full(8, 41)})


def _same(a, b):
    assert a.sample_ids == b.sample_ids and (a.checkpoint, a.calib_id) == (b.checkpoint, b.calib_id)
    for name in ("cross", "self_", "n_visual", "n_system", "n_text", "cross_mass", "self_mass"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("which", ["uniform", "ragged"])
def test_arrow_round_trip(request, which):
    stats = request.getfixturevalue(which)
    tokens, layers = stats.to_arrow()
    assert tokens.schema == TOKEN_SCHEMA and layers.schema == LAYER_SCHEMA
    assert tokens.num_rows == int(stats.n_visual.sum()) * L and layers.num_rows == stats.num_samples * L
    tokens.validate(full=True)
    _same(CalibrationStats.from_arrow(tokens, layers), stats)
    # any row order (a DuckDB read), chunked columns
    rng = np.random.default_rng(0)
    shuffled = pa.concat_tables([tokens.take(rng.permutation(tokens.num_rows))] * 1).combine_chunks()
    shuffled = pa.concat_tables([shuffled.slice(0, 100), shuffled.slice(100)])
    _same(CalibrationStats.from_arrow(shuffled, layers.take(np.arange(layers.num_rows)[::-1].copy())), stats.subset(np.arange(stats.num_samples)[::-1]))


def test_from_arrow_refuses_mixed_or_broken_tables(uniform, ragged):
    t1, l1 = uniform.to_arrow()
    other = synthetic_stats(2, L, 10, seed=9)
    other.checkpoint = "other"
    t2, l2 = other.to_arrow()
    tokens, layers = pa.concat_tables([t1, t2]), pa.concat_tables([l1, l2])
    with pytest.raises(ValueError, match="checkpoint="):
        CalibrationStats.from_arrow(tokens, layers)
    _same(CalibrationStats.from_arrow(tokens, layers, checkpoint="synthetic"), uniform)
    with pytest.raises(ValueError, match="duplicate"):
        CalibrationStats.from_arrow(pa.concat_tables([t1, t1.slice(0, 1)]), l1)
    with pytest.raises(ValueError, match="lacks column"):
        CalibrationStats.from_arrow(t1.drop_columns(["self"]), l1)


def test_subset(ragged):
    sub = ragged.subset([6, 3])
    assert sub.sample_ids == [ragged.sample_ids[6], ragged.sample_ids[3]]
    assert sub.max_visual == 25  # trimmed to the subset's longest sample
    np.testing.assert_array_equal(sub.cross[1], ragged.cross[3, :, :25])
    with pytest.raises(ValueError, match="repeats"):
        ragged.subset([1, 1])


def test_pruned_pass_statistics_round_trip_but_do_not_fit(uniform):
    cross, self_ = uniform.cross.copy(), uniform.self_.copy()
    cross[:, 3:, :5] = np.nan  # five tokens pruned after layer 2
    self_[:, 3:, :5] = np.nan
    n_alive = np.where(np.arange(L) >= 3, 35, 40)[None, :].repeat(8, axis=0)
    stats = CalibrationStats(**{**_fields(uniform), "cross": cross, "self_": self_}, n_alive=n_alive)
    back = CalibrationStats.from_arrow(*stats.to_arrow())
    np.testing.assert_array_equal(back.n_alive, n_alive)
    np.testing.assert_array_equal(back.cross, cross)
    with pytest.raises(ValueError, match="unpruned"):
        fit(stats, [0.5], DIMS)
