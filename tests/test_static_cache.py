"""Pruned prefill into a static cache, decoded compiled by stock ``generate`` (fitprune.static_cache).

The reference is always the same recipe with the default ``DynamicCache``: greedy tokens must be
identical and the step logits equal to float noise. On the CPU the compiled decode is checked with
``torch.compile(fullgraph=True, backend="eager")`` through transformers' own ``compile_config``: one
graph, no graph break, no recompilation from one step to the next. Behind the ``gpu`` marker the
same runs with generate's default compile (inductor, CUDA graphs).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FACTORIES, FAMILIES, IMAGES
from transformers import CompileConfig, StaticCache

import fitprune
from fitprune import Recipe
from fitprune.static_cache import PrunedStaticLayer

RECIPE = Recipe(drop_fractions=(0.0, 0.3, 0.4, 0.0), scoring="fitprune")
N_NEW = 6


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def _generate(model, batch, recipe, **kw):
    with fitprune.apply(model, recipe) as m, torch.no_grad():
        return m.generate(**batch, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kw)


def _same(ref, out, tol=1e-4):
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _ragged_batch(family, make):
    a, b = IMAGES[family]
    return make([(4, a, 5, 1), (3, b, 7, 2)])  # different text (and, but for LLaVA, image) sizes: padded


def _eager_compile() -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return config


def test_static_matches_dynamic_and_is_laid_out_at_pruned_lengths(family):
    model, make = FACTORIES[family]()
    batch = _ragged_batch(family, make)
    ref = _generate(model, batch, RECIPE)
    out = _generate(model, batch, RECIPE, cache_implementation="static")
    _same(ref, out)
    dynamic, static = ref.past_key_values, out.past_key_values
    assert all(isinstance(layer, PrunedStaticLayer) and layer.mode == "decode" for layer in static.layers)
    room = static.layers[0].max_cache_len - batch["input_ids"].shape[1]
    n_new_in_cache = N_NEW - 1  # the last token is not fed back
    lengths = []
    for d, s in zip(dynamic.layers, static.layers):
        prompt_slots = d.keys.shape[-2] - n_new_in_cache
        assert s.keys.shape[-2] == prompt_slots + room  # each layer's own pruned length, plus the decode room
        torch.testing.assert_close(s.keys[:, :, :d.keys.shape[-2]], d.keys)
        assert int(s.get_seq_length()) == d.keys.shape[-2]
        lengths.append(s.keys.shape[-2])
    assert lengths[-1] < lengths[0]  # the recipe's late layers hold fewer slots


def test_selection_before_layer0_into_a_static_cache(family):
    # a pre-LLM recipe keeps layer 0's cache at full length with the removed slots masked in decode
    model, make = FACTORIES[family]()
    batch = _ragged_batch(family, make)
    recipe = Recipe(drop_fractions=(0.0, 0.0, 0.0, 0.0), scoring="divprune", input_fraction=0.4)
    ref = _generate(model, batch, recipe)
    out = _generate(model, batch, recipe, cache_implementation="static")
    _same(ref, out)
    assert all(layer.mode == "decode" for layer in out.past_key_values.layers)


def test_buffers_are_reused_across_calls_and_stock_use_after_removal():
    model, make = FACTORIES["llava"]()
    batch = _ragged_batch("llava", make)
    cache = StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + N_NEW)
    first = _generate(model, batch, RECIPE, past_key_values=cache)
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    cache.reset()
    second = _generate(model, batch, RECIPE, past_key_values=cache)
    _same(first, second, tol=0)
    assert [layer.keys.data_ptr() for layer in cache.layers] == pointers  # same lengths: the buffers are reused
    _same(_generate(model, batch, RECIPE), first)
    # the recipe removed, the same cache object serves the stock model as a stock static cache does
    cache.reset()
    with torch.no_grad():
        kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
        stock = model.generate(**batch, **kw, cache_implementation="static")
        again = model.generate(**batch, **kw, past_key_values=cache)
    _same(stock, again)
    assert all(layer.keys.shape[-2] == layer.max_cache_len for layer in cache.layers)


def test_compiled_decode_is_one_graph_without_recompiles(family):
    model, make = FACTORIES[family]()
    batch = _ragged_batch(family, make)
    ref = _generate(model, batch, RECIPE)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = _generate(model, batch, RECIPE, cache_implementation="static", compile_config=_eager_compile())
        again = _generate(model, batch, RECIPE, cache_implementation="static", compile_config=_eager_compile())
    assert getattr(model, "_compiled_call", None) is not None
    _same(ref, out)
    _same(ref, again)
    torch._dynamo.reset()


def test_graphed_prefill_hands_over_into_the_static_cache(family):
    model, make = FACTORIES[family]()
    a, _ = IMAGES[family]
    batch = make([(4, a, 5, 1), (4, a, 5, 2)])  # one geometry, no padding: the graph can replay
    ref = _generate(model, batch, RECIPE)
    torch._dynamo.reset()
    with fitprune.apply(model, RECIPE) as m, fitprune.graph_prefill(m, backend="emulate"), torch.no_grad():
        graphs = fitprune.prefill_graphs(m)
        outs = [m.generate(**batch, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                           return_dict_in_generate=True, output_logits=True, cache_implementation="static",
                           compile_config=_eager_compile()) for _ in range(2)]
        assert graphs.replays == 2 and not graphs.eager, graphs
    for out in outs:
        _same(ref, out)
    torch._dynamo.reset()


def test_static_cache_too_short_for_the_prompt_is_refused():
    model, make = FACTORIES["llava"]()
    batch = _ragged_batch("llava", make)
    cache = StaticCache(config=model.config, max_cache_len=8)
    with fitprune.apply(model, RECIPE) as m, torch.no_grad(), pytest.raises(ValueError, match="static cache holds 8"):
        m(**batch, past_key_values=cache, use_cache=True)


@pytest.mark.gpu
def test_inductor_compiled_decode_on_the_gpu(family):
    model, make = FACTORIES[family]()
    model = model.to("cuda")
    batch = {k: v.to("cuda") for k, v in _ragged_batch(family, make).items()}
    ref = _generate(model, batch, RECIPE)
    torch._dynamo.reset()
    outs = [_generate(model, batch, RECIPE, cache_implementation="static") for _ in range(2)]
    assert getattr(model, "_compiled_call", None) is not None  # generate compiled the decode step
    for out in outs:
        assert torch.equal(ref.sequences, out.sequences)
    torch._dynamo.reset()
