"""The scoring-rule registry (fitprune.rules): one source for the names, the engine dispatches through it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FACTORIES, IMAGES

import fitprune
from fitprune import Recipe, RecipeError, rules
from fitprune import recipe as recipe_mod


def test_unknown_name_is_refused_with_the_known_names():
    with pytest.raises(RecipeError) as err:
        rules.get("fastvv")
    message = str(err.value)
    assert "'fastvv'" in message
    for name in ("fitprune", "fastv", "dart", "random", "divprune", "visionzip"):
        assert name in message
    with pytest.raises(RecipeError, match="known scorings: fitprune"):
        Recipe(drop_fractions=(0.1, 0.0), scoring="nope")
    with pytest.raises(RecipeError):
        rules.get(["fitprune"])  # not a name at all


def test_recipe_name_lists_come_from_the_registry():
    assert recipe_mod.SCORINGS == tuple(rules.RULES) == rules.names()
    assert set(recipe_mod.LAYER_SCORINGS) == {n for n, r in rules.RULES.items() if r.at_attention or r.at_mlp}
    assert set(recipe_mod.INPUT_SCORINGS) == {n for n, r in rules.RULES.items() if r.before_llm}
    assert set(recipe_mod.MERGE_SCORINGS) == {n for n, r in rules.RULES.items() if r.merges}
    assert set(recipe_mod.LAYER_SCORINGS) == {"fitprune", "fastv", "random", "dart"}
    assert set(recipe_mod.INPUT_SCORINGS) == {"divprune", "visionzip", "random"}
    with pytest.raises(ValueError, match="where must be"):
        rules.names("everywhere")


def test_rules_are_well_formed():
    for name, rule in rules.RULES.items():
        assert rule.name == name and rule.summary
        assert not (rule.at_attention and rule.at_mlp)
    with pytest.raises(ValueError, match="acts nowhere"):
        rules.ScoringRule("idle", "does nothing")
    with pytest.raises(ValueError, match="not both"):
        rules.ScoringRule("both", "x", at_attention=lambda c: None, at_mlp=lambda c: None)
    with pytest.raises(ValueError, match="already registered"):
        rules.register(rules.ScoringRule("fastv", "again", at_attention=lambda c: None))


def test_the_engine_dispatches_through_the_registry(monkeypatch):
    """A rule's at_attention really decides the drops: replace FastV's with one that scores by position."""
    model, make_inputs = FACTORIES["llava"]()
    batch = make_inputs([(5, IMAGES["llava"][0], 7)])
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.0, 0.0), family="llava", scoring="fastv")
    calls = []

    def last_first(ctx):  # lowest score = latest slot: the last visual tokens go
        calls.append(ctx.layer)
        return -ctx.state.idx.float()

    patched = rules.ScoringRule("fastv", "test", at_attention=last_first)
    monkeypatch.setitem(rules.RULES, "fastv", patched)
    with fitprune.apply(model, recipe) as m, torch.no_grad():
        m(**batch)
        report = fitprune.last_report(m)
    visual = [p for p, t in enumerate(batch["input_ids"][0].tolist()) if t == model.config.image_token_id]
    k = recipe.drop_counts(len(visual))[1]
    assert calls == [1] and k > 0
    assert report.dropped[0][1] == visual[-k:]


@pytest.mark.parametrize("mask_kind", ["none", "flash2d", "bool4d", "float4d"])
def test_fastv_scores_from_each_samples_own_last_row(mask_kind):
    """``last_rows`` at the batch's last row reproduces the old last-row scores bit for bit (left padding,
    every mask form); an earlier row per sample (right padding) scores as that sample's prefix alone."""
    from fitprune import scoring

    gen = torch.Generator().manual_seed(0)
    bsz, heads, kv_heads, q_len, hd = 2, 4, 2, 9, 8
    query, key = torch.randn(bsz, heads, q_len, hd, generator=gen), torch.randn(bsz, kv_heads, q_len, hd, generator=gen)
    real = torch.ones(bsz, q_len, dtype=torch.bool)
    real[1, 6:] = False  # sample 1: 6 real tokens, then right padding
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    allowed = causal[None] & real[:, None, :]
    mask = {"none": None, "flash2d": real.long(), "bool4d": allowed[:, None],
            "float4d": torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]}[mask_kind]
    old = scoring.fastv_scores(query, key, mask, 0.3)
    last = torch.full((bsz,), q_len - 1)
    assert torch.equal(scoring.fastv_scores(query, key, mask, 0.3, last), old)
    own = scoring.fastv_scores(query, key, mask, 0.3, torch.tensor([q_len - 1, 5]))
    assert torch.equal(own[0], old[0])
    alone = scoring.fastv_scores(query[1:, :, :6], key[1:, :, :6], None, 0.3)[0]  # sample 1 unpadded
    torch.testing.assert_close(own[1, :6], alone, rtol=1e-6, atol=1e-7)
    assert torch.all(own[1, 6:] == 0) and not torch.allclose(own[1], old[1])
