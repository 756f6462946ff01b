import math

import pytest

from fitprune.baselines import fastv, for_budget, pyramid, random_recipe, uniform
from fitprune.flops import ModelDims, recipe_reduction, recipe_token_schedule
from fitprune.recipe import RecipeError

DIMS = ModelDims(hidden_size=256, num_layers=16, num_heads=4, num_kv_heads=2, head_dim=64,
                 intermediate_size=640, vocab_size=1000)
N_VIS, N_OTHER = 576, 48


def test_fastv_drops_at_layer_k():
    r = fastv(16, layer=2, ratio=0.5, family="llava")
    assert (r.scoring, r.method, r.family, dict(r.metadata)) == ("fastv", "fastv", "llava", {"K": 2, "R": 0.5})
    assert [i for i, f in enumerate(r.drop_fractions) if f] == [1] and r.drop_fractions[1] == 0.5
    attn, _ = recipe_token_schedule(r, N_VIS)
    # layers 0..K-1 attend over all visual tokens, layer K onward over half of them
    assert attn[:2] == [N_VIS, N_VIS] and set(attn[2:]) == {N_VIS // 2}


@pytest.mark.parametrize("kw, match", [({"layer": 0}, r"\[1, 16\]"), ({"layer": 17}, r"\[1, 16\]"),
                                       ({"ratio": 1.2}, r"\[0, 1\]"), ({"ratio": math.nan}, "ratio")])
def test_fastv_validation(kw, match):
    with pytest.raises(RecipeError, match=match):
        fastv(16, **kw)


def test_uniform_spreads_the_ratio():
    r = uniform(16, ratio=0.6, start=2, end=10)
    nonzero = [i for i, f in enumerate(r.drop_fractions) if f]
    assert nonzero == list(range(2, 10))
    assert math.fsum(r.drop_fractions) == pytest.approx(0.6)
    assert len(set(r.drop_fractions[2:10])) == 1
    assert r.method == "uniform" and r.scoring == "fitprune"
    assert sum(r.drop_counts(N_VIS)) <= round(0.6 * N_VIS)
    assert sum(uniform(16, ratio=0.5).drop_fractions) == pytest.approx(0.5)
    assert uniform(16, ratio=0.5).drop_fractions[0] == 0.0  # default start=1


@pytest.mark.parametrize("kw", [{"start": 5, "end": 5}, {"start": -1}, {"end": 17}, {"start": 1.0}])
def test_uniform_validation(kw):
    with pytest.raises(RecipeError, match="start"):
        uniform(16, ratio=0.5, **kw)


def test_pyramid_keeps_a_fraction_of_the_survivors_at_each_stage():
    r = pyramid(32, keep=0.5)
    assert r.metadata["stages"] == [8, 16, 24]
    assert [i for i, f in enumerate(r.drop_fractions) if f] == [7, 15, 23]
    _, mlp = recipe_token_schedule(r, N_VIS)
    assert [mlp[7], mlp[15], mlp[23]] == [288, 144, 72]
    r = pyramid(12, keep=0.6, stages=[2, 5, 9, 11])
    alive = 1.0
    for k in (2, 5, 9, 11):
        alive -= r.drop_fractions[k - 1]
        assert alive == pytest.approx(0.6 ** ((2, 5, 9, 11).index(k) + 1))
    assert r.scoring == "fastv" and r.method == "pyramid"


@pytest.mark.parametrize("stages", [[], [4, 4], [8, 3], [0, 5], [5, 17]])
def test_pyramid_validation(stages):
    with pytest.raises(RecipeError, match="stages"):
        pyramid(16, stages=stages)


def test_random_recipe_keeps_the_schedule():
    base = pyramid(16)
    r = random_recipe(base, seed=3)
    assert r.drop_fractions == base.drop_fractions
    assert (r.scoring, r.method, r.seed) == ("random", "random", 3)
    assert r.metadata["schedule_method"] == "pyramid"
    assert base.scoring == "fastv"  # the input is untouched


BUILDERS = {
    "fastv": lambda p: fastv(16, layer=2, ratio=p),
    "pyramid": lambda p: pyramid(16, keep=1 - p),
    "uniform": lambda p: uniform(16, ratio=p),
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("budget", [0.2, 0.45])
def test_for_budget_finds_the_smallest_feasible_parameter(name, budget):
    builder = BUILDERS[name]
    r = for_budget(builder, DIMS, budget, N_VIS, N_OTHER, tol=1e-4)
    red = recipe_reduction(r, DIMS, N_VIS, N_OTHER)
    assert red >= budget
    assert r.metadata["predicted_reduction"] == red
    assert r.budget == budget and r.flops_convention == "full"
    p = r.metadata["parameter"]
    assert recipe_reduction(builder(max(p - 2e-4, 0.0)), DIMS, N_VIS, N_OTHER) < budget
    assert r.drop_fractions == builder(p).drop_fractions


def test_for_budget_zero_is_the_noop():
    r = for_budget(BUILDERS["fastv"], DIMS, 0.0, N_VIS, N_OTHER)
    assert r.is_noop and r.metadata["parameter"] == 0.0


def test_for_budget_out_of_reach_says_how_far_it_gets():
    best = recipe_reduction(fastv(16, layer=12, ratio=1.0), DIMS, N_VIS, N_OTHER)
    with pytest.raises(RecipeError, match=f"removes only {best:.4f}"):
        for_budget(lambda p: fastv(16, layer=12, ratio=p), DIMS, best + 0.01, N_VIS, N_OTHER)


def test_for_budget_validation():
    with pytest.raises(RecipeError, match="budget"):
        for_budget(BUILDERS["fastv"], DIMS, 1.0, N_VIS)
    with pytest.raises(RecipeError, match="expected a Recipe"):
        for_budget(lambda p: [p], DIMS, 0.3, N_VIS)
