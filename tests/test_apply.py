"""The pruned forward on tiny random-weight models of all four families (CPU, seconds).

Correctness is checked against ``tests/reference.py``, an independent implementation that reads
eager attention maps and physically removes tokens one sample at a time.
"""

from __future__ import annotations

import pytest
import torch
from reference import reference_forward
from tiny_models import FACTORIES, FAMILIES, IMAGE_ID, IMAGES, VIDEO_ID

import fitprune
from fitprune import Recipe, RecipeError
from fitprune.prune import cache_of

VISUAL_IDS = (IMAGE_ID, VIDEO_ID)
TOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, make_inputs = FACTORIES[request.param]()
    return request.param, model, make_inputs


def _specs(family):
    a, b = IMAGES[family]
    # left padding (different lengths), two images of different size, and a text-only sample
    return [(5, a, 7), (3, b, 4), (4, None, 6)]


def _recipe(family, scoring="fitprune", fractions=(0.0, 0.25, 0.3, 0.0)):
    return Recipe(drop_fractions=fractions, family=family, scoring=scoring)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_noop_recipe_gives_stock_logits(family_model):
    family, model, make_inputs = family_model
    inputs = make_inputs(_specs(family))
    stock = _logits(model, inputs)
    with fitprune.apply(model, _recipe(family, fractions=(0.0,) * 4)):
        pruned = _logits(model, inputs)
    assert torch.equal(stock, pruned)


@pytest.mark.parametrize("scoring", ["fitprune", "fastv"])
def test_pruned_prefill_matches_physical_removal_reference(family_model, scoring):
    family, model, make_inputs = family_model
    specs = _specs(family)
    batch = make_inputs(specs)
    recipe = _recipe(family, scoring)
    with fitprune.apply(model, recipe) as m:
        logits = _logits(m, batch)
        report = fitprune.last_report(m)
    width = batch["input_ids"].shape[1]
    for b, spec in enumerate(specs):
        single = make_inputs([(*spec, b)])
        n_visual = int(torch.isin(single["input_ids"], torch.tensor(VISUAL_IDS)).sum())
        counts = recipe.drop_counts(n_visual) if n_visual else [0] * recipe.num_layers
        ref_logits, kept, ref_dropped = reference_forward(model, single, counts, VISUAL_IDS, scoring=scoring)
        pad = width - single["input_ids"].shape[1]
        assert [[p - pad for p in layer] for layer in report.dropped[b]] == ref_dropped
        assert [len(d) for d in ref_dropped] == counts
        ours = logits[b, [p + pad for p in kept]]
        assert (ours - ref_logits).abs().max().item() <= TOL
        assert report.kept[b, pad:].nonzero()[0].tolist() == kept


def test_batched_equals_per_sample(family_model):
    family, model, make_inputs = family_model
    specs = _specs(family)
    batch = make_inputs(specs)
    with fitprune.apply(model, _recipe(family)) as m:
        logits = _logits(m, batch)
        report = fitprune.last_report(m)
        for b, spec in enumerate(specs):
            single = make_inputs([(*spec, b)])
            alone = _logits(m, single)
            alone_report = fitprune.last_report(m)
            pad = batch["input_ids"].shape[1] - single["input_ids"].shape[1]
            kept = torch.from_numpy(alone_report.kept[0]).nonzero().flatten()
            assert (logits[b, kept + pad] - alone[0, kept]).abs().max().item() <= TOL
            assert alone_report.attn_tokens[0].tolist() == report.attn_tokens[b].tolist()


def test_report_counts_follow_recipe(family_model):
    family, model, make_inputs = family_model
    specs = _specs(family)
    batch = make_inputs(specs)
    recipe = _recipe(family)
    with fitprune.apply(model, recipe) as m:
        _logits(m, batch)
        report = fitprune.last_report(m)
    for b in range(len(specs)):
        n_visual = int(report.n_visual[b])
        counts = recipe.drop_counts(n_visual) if n_visual else [0] * 4
        real = int(batch["attention_mask"][b].sum())
        expected_in = real
        for layer, k in enumerate(counts):
            assert report.attn_tokens[b, layer] == expected_in
            assert report.mlp_tokens[b, layer] == expected_in - k
            assert report.attn_visual[b, layer] - report.mlp_visual[b, layer] == k
            expected_in -= k


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, **kw
        )


def test_cached_generate_equals_uncached_recompute(family_model):
    family, model, make_inputs = family_model
    specs = _specs(family)
    batch = make_inputs(specs)
    with fitprune.apply(model, _recipe(family)) as m:
        out = _generate(m, batch)
        dropped = fitprune.last_report(m).dropped  # the prefill's report
    width = batch["input_ids"].shape[1]
    for b, spec in enumerate(specs):
        single = make_inputs([(*spec, b)])
        pad = width - single["input_ids"].shape[1]
        fixed = [[p - pad for p in layer] for layer in dropped[b]]
        for step in range(1, len(out.logits)):
            new = out.sequences[b, width : width + step]
            ids = torch.cat([single["input_ids"][0], new])[None]
            inputs = dict(single, input_ids=ids, attention_mask=torch.ones_like(ids))
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = (ids == IMAGE_ID).long()
            ref_logits, _, _ = reference_forward(model, inputs, None, VISUAL_IDS, fixed_drops=fixed)
            assert (out.logits[step][b] - ref_logits[-1]).abs().max().item() <= 1e-4


def test_kv_cache_lengths_follow_recipe(family_model):
    family, model, make_inputs = family_model
    a, _ = IMAGES[family]
    batch = make_inputs([(4, a, 5), (4, a, 5)])  # same geometry: no padding anywhere
    recipe = _recipe(family)
    n_visual = int((batch["input_ids"][0] == IMAGE_ID).sum())
    counts = recipe.drop_counts(n_visual)
    with fitprune.apply(model, recipe) as m:
        out = _generate(m, batch)
    length = batch["input_ids"].shape[1]
    generated = out.sequences.shape[1] - length
    cache = cache_of(out)
    for layer in range(recipe.num_layers):
        expected = length - sum(counts[:layer]) + generated - 1
        assert cache.layers[layer].keys.shape[-2] == expected


@pytest.mark.parametrize("mode", [dict(num_beams=2), dict(do_sample=True, top_k=5)])
def test_beam_search_and_sampling_run(family_model, mode):
    family, model, make_inputs = family_model
    batch = make_inputs(_specs(family))
    torch.manual_seed(0)
    with fitprune.apply(model, _recipe(family)) as m:
        with torch.no_grad():
            seqs = m.generate(**batch, max_new_tokens=3, pad_token_id=0, **{k: v for k, v in mode.items() if k != "do_sample"},
                              do_sample=mode.get("do_sample", False))
    assert seqs.shape == (3, batch["input_ids"].shape[1] + 3)


def _hook_count(model):
    return sum(
        len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules()
    )


def test_remove_restores_stock_model(family_model):
    family, model, make_inputs = family_model
    batch = make_inputs(_specs(family))
    stock = _logits(model, batch)
    hooks_before = _hook_count(model)
    impl = model.model.language_model.config._attn_implementation
    handle = fitprune.apply(model, _recipe(family))
    assert _hook_count(model) > hooks_before
    assert not torch.equal(_logits(model, batch), stock)
    fitprune.remove(model)
    assert _hook_count(model) == hooks_before
    assert not hasattr(model, "_fitprune")
    assert model.model.language_model.config._attn_implementation == impl
    assert torch.equal(_logits(model, batch), stock)
    with pytest.raises(RuntimeError, match="no fitprune recipe"):
        handle.remove()


def test_second_apply_is_refused(family_model):
    family, model, _ = family_model
    with fitprune.apply(model, _recipe(family)):
        with pytest.raises(RuntimeError, match="already applied"):
            fitprune.apply(model, _recipe(family))
    assert not hasattr(model, "_fitprune")


def test_mismatched_recipe_fails_before_compute(family_model):
    family, model, _ = family_model
    with pytest.raises(RecipeError, match="layers"):
        fitprune.apply(model, Recipe(drop_fractions=(0.1,) * 7))
    other = "llava" if family != "llava" else "qwen2_vl"
    with pytest.raises(RecipeError, match="famil"):
        fitprune.apply(model, Recipe(drop_fractions=(0.1,) * 4, family=other))
    assert not hasattr(model, "_fitprune")


def test_inputs_embeds_without_ids_is_a_clear_error():
    model, make_inputs = FACTORIES["llava"]()
    batch = make_inputs([(3, "img", 4)])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with fitprune.apply(model, _recipe("llava")):
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_unsupported_model_names_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(fitprune.UnsupportedModelError) as err:
        fitprune.apply(model, Recipe(drop_fractions=(0.1,)))
    for family in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"):
        assert family in str(err.value)


def test_eager_base_attention_gives_same_result_as_sdpa():
    sdpa_model, make_inputs = FACTORIES["llava"](attn="sdpa")
    eager_model, _ = FACTORIES["llava"](attn="eager")
    batch = make_inputs(_specs("llava"))
    recipe = _recipe("llava")
    with fitprune.apply(sdpa_model, recipe):
        a = _logits(sdpa_model, batch)
        dropped_a = fitprune.last_report(sdpa_model).dropped
    with fitprune.apply(eager_model, recipe):
        b = _logits(eager_model, batch)
        report = fitprune.last_report(eager_model)
        dropped_b = report.dropped
    assert eager_model.model.language_model.config._attn_implementation == "eager"
    assert dropped_a == dropped_b
    mask = batch["attention_mask"].bool() & torch.from_numpy(report.kept)
    assert (a[mask] - b[mask]).abs().max().item() <= TOL


def test_random_scoring_drops_recipe_counts_and_is_seeded():
    model, make_inputs = FACTORIES["llava"]()
    batch = make_inputs([(3, "img", 4), (3, "img", 4)])
    recipe = _recipe("llava", scoring="random")
    with fitprune.apply(model, recipe) as m:
        _logits(m, batch)
        first = fitprune.last_report(m).dropped
        _logits(m, batch)
        second = fitprune.last_report(m).dropped
    assert first == second
    counts = recipe.drop_counts(36)
    assert [len(d) for d in first[0]] == counts
    with fitprune.apply(model, recipe.with_updates(seed=1)) as m:
        _logits(m, batch)
        assert fitprune.last_report(m).dropped != first


@pytest.mark.parametrize("builder", ["fastv", "pyramid", "uniform", "random"])
def test_baseline_recipes_run_through_the_same_apply_path(builder):
    from fitprune import baselines

    model, make_inputs = FACTORIES["llava"]()
    recipe = {
        "fastv": lambda: baselines.fastv(4, layer=2, ratio=0.5),
        "pyramid": lambda: baselines.pyramid(4, keep=0.5),
        "uniform": lambda: baselines.uniform(4, ratio=0.5),
        "random": lambda: baselines.random_recipe(baselines.uniform(4, ratio=0.5), seed=3),
    }[builder]()
    batch = make_inputs([(3, "img", 4), (5, "img", 2)])
    with fitprune.apply(model, recipe) as m:
        logits = _logits(m, batch)
        report = fitprune.last_report(m)
    counts = recipe.drop_counts(36)
    assert sum(counts) > 0
    for b in range(2):
        assert [len(d) for d in report.dropped[b]] == counts
    assert torch.isfinite(logits[torch.from_numpy(report.kept)]).all()
