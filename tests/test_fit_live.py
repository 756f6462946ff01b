"""Fitting on a live model: fitted recipes meet their budget when applied; statistical vs
progressive fit; refine. Uses the toy model (8 layers, 144 visual tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fitprune
from fitprune.fit import fit, walk
from fitprune.flops import ModelDims, prefill_flops
from fitprune.progressive import fit_progressive, progressive_walk, refine
from fitprune.stats import collect_stats
from fitprune.demo.toy import toy_batches, toy_model

N_VISUAL = 144


@pytest.fixture(scope="module")
def setup():
    model = toy_model(0)
    batches = toy_batches(8, 8, 0, "cal")
    stats = collect_stats(model, batches)
    return model, batches, stats, ModelDims.from_config(model.config.text_config)


def measured_reduction(model, batches, recipe, dims) -> float:
    pruned, full = 0.0, 0.0
    with fitprune.apply(model, recipe):
        for batch in batches:
            with torch.no_grad():
                model(**{k: v for k, v in batch.items() if k != "sample_ids"})
            report = fitprune.last_report(model)
            pruned += report.flops(dims).sum()
            full += sum(prefill_flops(dims, [int(n)] * dims.num_layers) for n in report.input_tokens)
    return 1.0 - pruned / full


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_fitted_recipe_meets_budget_when_applied(setup, budget):
    model, batches, stats, dims = setup
    result = fit(stats, [budget], dims)[0]
    measured = measured_reduction(model, batches, result.recipe, dims)
    assert budget - 1e-6 <= measured <= budget + 0.01  # feasible side, within a point


def test_live_alpha_rule_equals_replay_before_any_pruning(setup):
    """At the first layer nothing was pruned yet: the live α-rule and the replay must agree exactly."""
    model, batches, stats, dims = setup
    for alpha in (0.1, 0.4, 0.8):
        live = progressive_walk(model, batches, stats, alpha)
        replay = walk(stats, alpha, dims, budget=0.999)  # unreachable: the check never stops the walk
        assert live[:, 0].tolist() == replay[:, 0].tolist()
        assert live.sum() >= replay.sum()  # renormalised attention lets the live walk keep pruning


def test_progressive_vs_statistical_fit(setup):
    """Measured on this model (closing note of the calibration issue): both meet the budget within a
    point; the statistical fit puts its drops at layer 0 (the replay ignores renormalisation), the
    progressive one spreads them over layers 0–2; per-layer L1 difference ≈ 0.49 of the visual count."""
    model, batches, stats, dims = setup
    budget = 0.5
    statistical = fit(stats, [budget], dims)[0].recipe
    progressive = fit_progressive(model, batches, stats, [budget], dims)[0].recipe
    for recipe in (statistical, progressive):
        assert budget - 1e-6 <= measured_reduction(model, batches, recipe, dims) <= budget + 0.01
    a = np.array(statistical.drop_counts(N_VISUAL))
    b = np.array(progressive.drop_counts(N_VISUAL))
    assert np.abs(a - b).sum() <= 0.6 * N_VISUAL
    assert (b > 0).sum() >= (a > 0).sum()
    assert progressive.metadata["fit"] == "progressive"


def test_refine_refits_on_pruned_statistics(setup):
    model, batches, stats, dims = setup
    first = fit(stats, [0.5], dims)[0]
    refined = refine(model, batches, first, dims)
    assert refined.after.recipe.metadata["fit"] == "refined"
    assert refined.after.feasible
    assert 0.0 <= refined.moved_fraction <= 1.0
    moved = np.abs(np.array(first.recipe.drop_counts(N_VISUAL)) - np.array(refined.after.recipe.drop_counts(N_VISUAL))).sum()
    assert refined.moved_tokens == moved
    assert 0.5 - 1e-6 <= measured_reduction(model, batches, refined.after.recipe, dims) <= 0.51


def test_statistics_of_another_checkpoint_need_an_override(setup):
    _, _, stats, dims = setup
    stats = stats.subset(range(stats.num_samples))
    stats.checkpoint = "fp-aaaa"
    with pytest.raises(ValueError, match="re-collect"):
        fit(stats, [0.5], dims, checkpoint="fp-bbbb")
    with pytest.warns(UserWarning, match="override"):
        assert fit(stats, [0.5], dims, checkpoint="fp-bbbb", allow_other_checkpoint=True)[0].feasible
    assert fit(stats, [0.5], dims, checkpoint="fp-aaaa")[0].feasible
