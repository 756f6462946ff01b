"""Attention statistics from the live model against eager attention maps (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_forward
from tiny_models import FACTORIES, FAMILIES, IMAGE_ID, IMAGES, VIDEO_ID

from fitprune import Recipe
from fitprune.stats import collect_stats

VISUAL_IDS = (IMAGE_ID, VIDEO_ID)


def _check_against_reference(model, make_inputs, specs, stats, recipe=None):
    for b, spec in enumerate(specs):
        single = make_inputs([(*spec, b)])
        ids = single["input_ids"][0]
        visual_positions = torch.where(torch.isin(ids, torch.tensor(VISUAL_IDS)))[0].tolist()
        counts = recipe.drop_counts(len(visual_positions)) if recipe else [0] * stats.num_layers
        record = []
        reference_forward(model, single, counts, VISUAL_IDS, record=record)
        for layer, scores in enumerate(record):
            for v, pos in enumerate(visual_positions):
                if pos in scores:
                    c, s = scores[pos]
                    assert abs(stats.cross[b, layer, v] - c) <= 1e-5
                    assert abs(stats.self_[b, layer, v] - s) <= 1e-5
                else:  # dropped before this layer
                    assert np.isnan(stats.cross[b, layer, v]) and np.isnan(stats.self_[b, layer, v])
            assert abs(stats.cross_mass[b, layer] - sum(c for c, _ in scores.values())) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_equal_eager_reference(family):
    model, make_inputs = FACTORIES[family]()
    a, b = IMAGES[family]
    specs = [(5, a, 7), (3, b, 4), (2, b, 3)]
    batches = [dict(make_inputs(specs[:2]), sample_ids=["s0", "s1"]), dict(make_inputs([(*specs[2], 2)]), sample_ids=["s2"])]
    stats = collect_stats(model, batches, checkpoint="ck", calib_id="cal")
    assert stats.sample_ids == ["s0", "s1", "s2"]
    marker = 1 if family.startswith("qwen") else 0  # Qwen wraps the image in vision start/end tokens
    assert stats.n_system.tolist() == [5 + marker, 3 + marker, 2 + marker]
    assert stats.n_text.tolist() == [7 + marker, 4 + marker, 3 + marker]
    assert not hasattr(model, "_fitprune")  # collection leaves the model stock
    _check_against_reference(model, make_inputs, specs, stats)
    tokens, layers = stats.to_arrow()
    assert tokens.num_rows == int(stats.n_visual.sum()) * stats.num_layers
    assert set(tokens.column("checkpoint").to_pylist()) == {"ck"}


def test_stats_under_a_recipe_follow_the_pruned_model():
    model, make_inputs = FACTORIES["llava"]()
    specs = [(5, "img", 7), (3, "img", 4)]
    recipe = Recipe(drop_fractions=(0.2, 0.3, 0.0, 0.0), family="llava")
    stats = collect_stats(model, [make_inputs(specs)], recipe=recipe)
    counts = recipe.drop_counts(36)
    alive = 36 - np.cumsum([0] + counts[:-1])
    assert stats.n_alive.tolist() == [alive.tolist()] * 2
    _check_against_reference(model, make_inputs, specs, stats, recipe=recipe)


def test_samples_without_images_are_refused():
    model, make_inputs = FACTORIES["llava"]()
    with pytest.raises(ValueError, match="without visual tokens"):
        collect_stats(model, [make_inputs([(3, "img", 4), (3, None, 4)])])
    assert not hasattr(model, "_fitprune")


def test_empty_calibration_set_is_refused():
    model, _ = FACTORIES["llava"]()
    with pytest.raises(ValueError, match="empty"):
        collect_stats(model, [])
