"""Graph replay of the pruned prefill (``fitprune.graph_prefill``).

Every check runs twice: with the CPU emulation of a CUDA graph (a replay reruns the captured call
and writes into the captured tensors in place, so aliasing is as on the GPU) and, behind the
``gpu`` marker, with real CUDA graphs on the device machine. The reference is always the same
model run eagerly.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FACTORIES, FAMILIES, IMAGES

import fitprune
from fitprune import Recipe
from fitprune.prune import cache_of

RECIPE = (0.0, 0.25, 0.3, 0.0)

BACKENDS = [
    pytest.param("emulate", id="emulate"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _setup(family, backend):
    model, make_inputs = FACTORIES[family]()
    device = "cuda" if backend == "cuda" else "cpu"
    model = model.to(device)

    def inputs(specs, seed=1):
        return {k: v.to(device) for k, v in make_inputs(specs, seed=seed).items()}

    return model, inputs


def _same_geometry(family, seed):
    a, _ = IMAGES[family]
    return [(4, a, 5, seed), (4, a, 5, seed + 1)]  # two samples, no padding


def _eager(model, batch, recipe):
    with fitprune.apply(model, recipe) as m, torch.no_grad():
        out = m(**batch, use_cache=True)
        return out, fitprune.last_report(m)


def _close(a, b, backend):
    tol = 1e-5 if backend == "emulate" else 1e-4
    assert (a - b).abs().max().item() <= tol


def test_replay_matches_eager_and_keeps_earlier_outputs(family, backend):
    model, inputs = _setup(family, backend)
    recipe = Recipe(drop_fractions=RECIPE, family=family)
    first, second = inputs(_same_geometry(family, 0)), inputs(_same_geometry(family, 7))
    ref1, rep1 = _eager(model, first, recipe)
    ref2, rep2 = _eager(model, second, recipe)
    assert rep1.dropped != rep2.dropped  # the two inputs prune differently: replays must follow the data
    with fitprune.apply(model, recipe) as m, fitprune.graph_prefill(m, backend=backend), torch.no_grad():
        out1 = m(**first, use_cache=True)
        got1 = fitprune.last_report(m)
        out2 = m(**second, use_cache=True)
        got2 = fitprune.last_report(m)
        g = fitprune.prefill_graphs(m)
        assert (g.captures, g.replays) == (1, 2)
        assert not g.eager
    assert fitprune.prefill_graphs(model) is None and "forward" not in g.lm.__dict__
    # read after the second replay: the first call's outputs, cache and report are its own
    for out, ref in ((out1, ref1), (out2, ref2)):
        _close(out.logits, ref.logits, backend)
        for mine, theirs in zip(cache_of(out).layers, cache_of(ref).layers):
            assert mine.keys.shape == theirs.keys.shape
            _close(mine.keys, theirs.keys, backend)
            _close(mine.values, theirs.values, backend)
    for got, rep in ((got1, rep1), (got2, rep2)):
        assert got.dropped == rep.dropped
        assert (got.kept == rep.kept).all()
        assert (got.attn_tokens == rep.attn_tokens).all() and (got.mlp_visual == rep.mlp_visual).all()


def test_generate_with_graphed_prefill_equals_eager(family, backend):
    model, inputs = _setup(family, backend)
    recipe = Recipe(drop_fractions=RECIPE, family=family)
    batch = inputs(_same_geometry(family, 3))
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        with fitprune.apply(model, recipe) as m:
            ref = m.generate(**batch, **kw)
        with fitprune.apply(model, recipe) as m, fitprune.graph_prefill(m, backend=backend):
            g = fitprune.prefill_graphs(m)
            m.generate(**batch, **kw)  # first call captures
            out = m.generate(**batch, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        _close(a, b, backend)
    assert g.captures == 1 and g.replays == 2
    assert g.eager["decode step"] == 2 * 3  # decode steps run eagerly on the pruned cache


def test_unsupported_calls_run_eagerly_with_a_reason(backend):
    model, inputs = _setup("llava", backend)
    recipe = Recipe(drop_fractions=RECIPE, family="llava")
    padded = inputs([(5, "img", 7), (3, "img", 4)])
    ref, _ = _eager(model, padded, recipe)
    with fitprune.apply(model, recipe) as m, fitprune.graph_prefill(m, backend=backend):
        g = fitprune.prefill_graphs(m)
        with torch.no_grad():
            out = m(**padded, use_cache=True)
        m(**inputs(_same_geometry("llava", 0)))  # gradients on
    _close(out.logits, ref.logits, backend)
    assert g.captures == 0 and g.replays == 0
    assert g.eager["padded batch"] == 1
    assert g.eager["gradients enabled (use torch.no_grad() or inference_mode)"] == 1


def test_geometries_recipes_and_eviction(backend):
    model, inputs = _setup("llava", backend)
    one = inputs([(4, "img", 5, 0)])
    longer = inputs([(4, "img", 9, 0)])
    stock = model(**one).logits.detach()
    recipe = Recipe(drop_fractions=RECIPE, family="llava")
    other = Recipe(drop_fractions=(0.0, 0.5, 0.0, 0.0), family="llava")
    g = fitprune.graph_prefill(model, max_graphs=1, backend=backend)
    with torch.no_grad(), g:
        _close(model(**one).logits, stock, backend)  # no recipe: the stock prefill, graphed
        assert g.captures == 1
        with fitprune.apply(model, recipe):
            a = model(**one).logits
            model(**one)
            assert g.captures == 2  # the stock graph is not reused under a recipe
            model(**longer)  # a new geometry: its capture evicts the first (max_graphs=1) ...
            model(**one)  # ... which is captured again
            assert g.captures == 4 and len(g.graphs) == 1 and g.replays == 5
        with fitprune.apply(model, other):  # another recipe: graphs of the old hooks are dropped
            b = model(**one).logits
            assert g.captures == 5
    ref_a, _ = _eager(model, one, recipe)
    ref_b, _ = _eager(model, one, other)
    _close(a, ref_a.logits, backend)
    _close(b, ref_b.logits, backend)


def test_statistics_collection_is_never_graphed(backend):
    model, inputs = _setup("llava", backend)
    batch = inputs(_same_geometry("llava", 0))
    g = fitprune.graph_prefill(model, backend=backend)
    with g:
        stats = fitprune.collect_stats(model, [batch])
    assert stats.num_layers == 4
    assert g.captures == 0 and g.eager["statistics probe"] >= 1


def test_cuda_backend_refuses_a_cpu_model():
    model, _ = FACTORIES["llava"]()
    with pytest.raises(ValueError, match="CUDA device"):
        fitprune.graph_prefill(model)
    assert fitprune.prefill_graphs(model) is None


def test_second_graph_prefill_is_refused():
    model, _ = FACTORIES["llava"]()
    with fitprune.graph_prefill(model, backend="emulate"):
        with pytest.raises(RuntimeError, match="already on"):
            fitprune.graph_prefill(model, backend="emulate")


def test_causal_skip_decides_as_eager_transformers():
    import inspect

    from transformers import masking_utils

    from fitprune.graphs import _causal_skip_while_capturing

    stock = masking_utils._ignore_causal_mask_sdpa
    names = list(inspect.signature(stock).parameters)
    q_name = "query_length" if "query_length" in names else "q_length"
    full = torch.ones(2, 9, dtype=torch.bool)
    holes = full.clone()
    holes[0, :3] = False
    cases = [dict(padding_mask=None, q=7, kv=7), dict(padding_mask=None, q=1, kv=9),
             dict(padding_mask=holes, q=9, kv=9), dict(padding_mask=None, q=7, kv=7, local=4)]
    with _causal_skip_while_capturing():
        patched = masking_utils._ignore_causal_mask_sdpa
    assert masking_utils._ignore_causal_mask_sdpa is stock  # restored on exit
    assert patched is not stock
    for case in cases:
        kw = {"padding_mask": case["padding_mask"], q_name: case["q"], "kv_length": case["kv"], "kv_offset": 0}
        if "q_offset" in names:
            kw["q_offset"] = 0
        if "local" in case:
            kw["local_attention_size"] = case["local"]
        assert patched(**kw) == stock(**kw), case


def test_capture_runs_attention_without_a_materialised_mask(backend):
    model, inputs = _setup("llava", backend)
    batch = inputs(_same_geometry("llava", 0))
    seen = []
    attn = model.model.language_model.layers[0].self_attn
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask") is None),
                                          with_kwargs=True)
    try:
        with torch.no_grad(), fitprune.apply(model, Recipe(drop_fractions=RECIPE, family="llava")):
            g = fitprune.graph_prefill(model, backend=backend)
            with g:
                model(**batch, use_cache=True)
    finally:
        hook.remove()
    assert g.captures == 1 and seen and all(seen)  # warm-up and capture: SDPA keeps is_causal
