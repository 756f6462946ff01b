"""DivPrune, DART and VisionZip (and random input pruning) on tiny models of all four families (CPU).

The selections are checked against small references written here from the methods' descriptions
(plain Python loops in float64 on features captured from an *unpruned* stock forward; nothing from
``fitprune.selection``), and the pruned forward against ``tests/reference.py``, which physically
removes the tokens one unpadded sample at a time (``input_drops``, ``embeds`` for VisionZip's
merged tokens). Batches are left-padded, with two images of different size and a text-only sample.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from reference import capture_lm_inputs, reference_forward
from tiny_models import FACTORIES, FAMILIES, IMAGE_ID, IMAGES, VIDEO_ID

import fitprune
from fitprune import Recipe, RecipeError
from fitprune.flops import ModelDims, prefill_flops, recipe_reduction, recipe_token_schedule
from fitprune.prune import cache_of

VISUAL_IDS = (IMAGE_ID, VIDEO_ID)
TOL = 1e-5
MARGIN = 1e-5  # a reference decision closer than this cannot be compared across float32/float64
DART_LAYER = 2  # K: DART drops after layer K-1's attention
N_PIVOTS = 4


def _tiny(family):
    """A tiny model whose RMSNorm weights are not all ones (as initialised): DART's hidden states are
    the residual stream under the *final* norm, which a test on unit weights could not tell from the
    MLP input under the layer's own norm. LLaVA's CLIP q/k are scaled up a little so that VisionZip's
    dominant set depends on the softmax scale and on summing (not maxing) over heads."""
    model, make_inputs = FACTORIES[family]()
    gen = torch.Generator().manual_seed(7)
    lm = model.model.language_model
    with torch.no_grad():
        for norm in [lm.norm, *(m for layer in lm.layers for m in (layer.input_layernorm,
                                                                  layer.post_attention_layernorm))]:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) * 1.5 + 0.25)
        tower = getattr(model.model, "vision_tower", None)
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        for layer in getattr(encoder, "layers", []):  # CLIP (LLaVA): CLS attention far enough from uniform that
            # the softmax scale and the head sum (not max) change which patches are dominant
            layer.self_attn.q_proj.weight.mul_(1.5)
            layer.self_attn.k_proj.weight.mul_(1.5)
    return model, make_inputs


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, one_thread):
    model, make_inputs = _tiny(request.param)
    return request.param, model, make_inputs


@pytest.fixture(scope="module")
def llava(one_thread):
    return _tiny("llava")


def _specs(family):
    a, b = IMAGES[family]
    return [(5, a, 7), (3, b, 4), (4, None, 6)]


def _divprune(family, fraction=0.5):
    return Recipe(drop_fractions=(0.0,) * 4, scoring="divprune", input_fraction=fraction, family=family)


def _dart(family, fraction=0.5):
    fractions = [0.0] * 4
    fractions[DART_LAYER - 1] = fraction
    return Recipe(drop_fractions=tuple(fractions), scoring="dart", family=family)


def _visionzip(input_fraction=0.5, merge_fraction=0.125):
    return Recipe(drop_fractions=(0.0,) * 4, scoring="visionzip", input_fraction=input_fraction,
                  merge_fraction=merge_fraction, family="llava")


def _pruned(model, batch, recipe):
    with fitprune.apply(model, recipe) as m:
        with torch.no_grad():
            logits = m(**batch).logits
        return logits, fitprune.last_report(m)


def _samples(make_inputs, specs, batch):
    """(b, its unpadded single-sample inputs, left padding of b in the batch)."""
    width = batch["input_ids"].shape[1]
    for b, spec in enumerate(specs):
        single = make_inputs([(*spec, b)])
        yield b, single, width - single["input_ids"].shape[1]


def _dart_batch(family, batch):
    """DART's pivots rank the layer's *post-RoPE* keys by L1 norm, which RoPE rotations change: the
    selection depends on absolute positions. A plain LLaVA forward numbers a left-padded row from the
    padding (``generate`` and Qwen's M-RoPE count from the first real token), so for the LLaVA families
    the batch gets the position ids ``generate`` would give it, to match the unpadded reference."""
    if family in ("llava", "llava_next"):
        return dict(batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    return batch


def _visual_positions(single) -> list[int]:
    ids = single["input_ids"][0]
    return torch.where(torch.isin(ids, torch.tensor(VISUAL_IDS)))[0].tolist()


def _best(items, score, same=lambda a, b: False):
    """The item of largest score (ties: the earliest) and its margin over the runner-up; items that
    ``same(best, item)`` says tie with the best by construction (not by rounding) are not runners-up."""
    ranked = sorted(items, key=lambda i: (-score(i), i))
    others = [i for i in ranked[1:] if not same(ranked[0], i)]
    return ranked[0], (score(ranked[0]) - score(others[0]) if others else math.inf)


# -- references, from the methods' descriptions ------------------------------------------------------


def ref_divprune(emb: torch.Tensor, positions: list[int], keep: int) -> tuple[list[int], float]:
    """DivPrune's max-min greedy on the embeddings at ``positions``; (kept positions, smallest margin).

    Exact ties by construction are not near ties: two tokens that are each other's nearest neighbour
    share that distance (the first pick), and identical embeddings (LLaVA-NeXT's newline tokens) share
    every distance; DivPrune resolves both to the earliest position.
    """
    if keep <= 0:
        return [], math.inf
    x = [emb[p].double() for p in positions]
    n = len(x)
    dist = [[1.0 - float(torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())) for j in range(n)] for i in range(n)]
    nearest = [min((dist[i][j] for j in range(n) if j != i), default=math.inf) for i in range(n)]

    def duplicate(a, b):
        return torch.equal(x[a], x[b])

    def partner(a, b):
        return duplicate(a, b) or (nearest[a] == nearest[b] == dist[a][b])

    first, margin = _best(range(n), lambda i: nearest[i], partner)
    kept, to_kept = [first], list(dist[first])
    while len(kept) < keep:
        pick, m = _best([i for i in range(n) if i not in kept], lambda i: to_kept[i], duplicate)
        margin = min(margin, m)
        kept.append(pick)
        to_kept = [min(a, b) for a, b in zip(to_kept, dist[pick])]
    return sorted(positions[i] for i in kept), margin


def ref_dart(hidden: torch.Tensor, key_norm: torch.Tensor, visual: list[int], text: list[int], drop: int):
    """DART's dropped positions from hidden states (L, D) and key L1 norms (L,); (dropped, smallest margin)."""
    keep = len(visual) - drop
    norm = {p: float(key_norm[p]) for p in range(len(key_norm))}
    by_norm = sorted(visual, key=lambda p: (-norm[p], p))
    image_pivots = by_norm[: min(N_PIVOTS, keep)]
    text_pivots = sorted(text, key=lambda p: (-norm[p], p))[:N_PIVOTS]
    margin = min((norm[by_norm[i]] - norm[by_norm[i + 1]] for i in range(min(N_PIVOTS, keep, len(visual) - 1))),
                 default=math.inf)
    pivots = image_pivots + text_pivots
    rest = keep - len(image_pivots)
    quotas = [rest // len(pivots) + (j < rest % len(pivots)) for j in range(len(pivots))]
    h = F.normalize(hidden.double(), dim=-1)
    pool = [p for p in visual if p not in image_pivots]
    kept = set(image_pivots)
    for pivot, quota in zip(pivots, quotas):
        sim = {p: float(h[pivot] @ h[p]) for p in pool}
        ranked = sorted(pool, key=lambda p: (sim[p], p))
        if 0 < quota < len(ranked):
            margin = min(margin, sim[ranked[quota]] - sim[ranked[quota - 1]])
        kept |= set(ranked[:quota])
        pool = [p for p in pool if p not in kept]
    return sorted(set(visual) - kept), margin


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def capture_dart_features(model, single, layer_index: int):
    """From an unpruned stock forward of one sample: the final-normed residual stream after layer
    ``layer_index``'s attention (L, D) and the L1 norm (L,) of that layer's post-RoPE keys."""
    lm = model.model.language_model
    layer = lm.layers[layer_index]
    seen = {}

    def pre(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["rope"] = kwargs["position_embeddings"]

    hooks = [
        layer.register_forward_pre_hook(pre, with_kwargs=True),
        layer.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0])),
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out)),
    ]
    try:
        with torch.no_grad():
            model(**single, use_cache=False)
            hidden = lm.norm(seen["x"] + seen["attn"])[0]
    finally:
        for h in hooks:
            h.remove()
    cfg = lm.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k = seen["k"][0].double().view(-1, cfg.num_key_value_heads, hd).transpose(0, 1)  # (Hkv, L, hd)
    cos, sin = (t[0].double() for t in seen["rope"])  # (L, hd)
    k = k * cos + _rotate_half(k) * sin
    return hidden.double(), k.abs().sum(dim=(0, 2))


def ref_visionzip(model, pixel_values: torch.Tensor, keep: int, contextual: int):
    """VisionZip per image, from the vision tower's hidden states (float64 q/k recomputed from the
    feature layer's input). Returns (kept patch indices per image, merged features (N, P, Dv), margin)."""
    tower = model.model.vision_tower
    vfl = model.config.vision_feature_layer
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True)
    layers = getattr(tower, "vision_model", tower).encoder.layers
    j = len(layers) + vfl if vfl < 0 else vfl - 1  # the layer whose output is hidden_states[vfl]
    attn = layers[j].self_attn
    with torch.no_grad():
        x = layers[j].layer_norm1(out.hidden_states[j]).double()
        q = F.linear(x, attn.q_proj.weight.double(), attn.q_proj.bias.double())
        k = F.linear(x, attn.k_proj.weight.double(), attn.k_proj.bias.double())
    features = out.hidden_states[vfl][:, 1:].double()
    n_img, tokens, width = q.shape
    heads = model.config.vision_config.num_attention_heads
    hd = width // heads
    kept_all, merged, margin = [], features.clone(), math.inf
    for i in range(n_img):
        qh, kh = q[i].view(tokens, heads, hd), k[i].view(tokens, heads, hd)
        probs = torch.softmax(torch.einsum("hd,khd->hk", qh[0], kh) * hd ** -0.5, dim=-1)  # (H, 1 + P)
        score = probs.sum(0)[1:].tolist()
        n_patch = len(score)
        ranked = sorted(range(n_patch), key=lambda p: (-score[p], p))
        n_dom = keep - contextual
        if 0 < n_dom < n_patch:
            margin = min(margin, score[ranked[n_dom - 1]] - score[ranked[n_dom]])
        dominant = ranked[:n_dom]
        rest = [p for p in range(n_patch) if p not in dominant]
        targets = []
        if contextual:
            step = max(1, len(rest) // contextual)
            targets = [rest[r] for r in range(0, len(rest), step)][:contextual]
        metric = F.normalize(kh.mean(1)[1:], dim=-1)  # (P, hd) head-mean keys of the patches
        assigned = {t: [] for t in targets}
        for p in rest if targets else []:
            if p in assigned:
                continue
            t, m = _best(targets, lambda t: float(metric[p] @ metric[t]))
            margin = min(margin, m)
            assigned[t].append(p)
        for t, group in assigned.items():
            if group:
                merged[i, t] = features[i, t] + features[i, group].mean(0)
        kept_all.append(sorted(dominant + targets))
    return kept_all, merged, margin


def visionzip_embeds(model, single, merged: torch.Tensor) -> torch.Tensor:
    """The language model's input embeddings with the image tokens' replaced by the projector's output
    on the (reference-)merged features."""
    embeds = capture_lm_inputs(model, single)["inputs_embeds"].clone()
    with torch.no_grad():
        projected = model.model.multi_modal_projector(merged.to(embeds.dtype))
    image = single["input_ids"][0] == IMAGE_ID
    embeds[0, image] = projected.reshape(-1, projected.shape[-1])
    return embeds


def _divprune_removed(model, single, recipe) -> tuple[list[int], list[int], float]:
    """(visual positions, those DivPrune removes per the reference, its margin) for one unpadded sample."""
    visual = _visual_positions(single)
    emb = capture_lm_inputs(model, single)["inputs_embeds"][0]
    kept, margin = ref_divprune(emb, visual, len(visual) - recipe.input_count(len(visual)))
    return visual, sorted(set(visual) - set(kept)), margin


# -- a. selection equals the reference ------------------------------------------------------------------


def test_divprune_selection_equals_reference(family_model):
    family, model, make_inputs = family_model
    specs, recipe = _specs(family), _divprune(family)
    batch = make_inputs(specs)
    _, report = _pruned(model, batch, recipe)
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual, expected, margin = _divprune_removed(model, single, recipe)
        assert margin > MARGIN, f"sample {b}: a near tie ({margin:.2g}) makes the comparison ill-posed"
        assert len(expected) == recipe.input_count(len(visual))
        assert [p - pad for p in report.dropped_input[b]] == expected
        assert all(d == [] for d in report.dropped[b])  # nothing dropped inside the language model
        assert int(report.n_visual[b]) == len(visual)
    assert sum(map(len, report.dropped_input)) > 0


def test_dart_selection_equals_reference(family_model):
    family, model, make_inputs = family_model
    specs, recipe = _specs(family), _dart(family)
    batch = make_inputs(specs)
    _, report = _pruned(model, _dart_batch(family, batch), recipe)
    assert report.dropped_input == [[] for _ in specs]
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual = _visual_positions(single)
        counts = recipe.drop_counts(len(visual)) if visual else [0] * 4
        got = [[p - pad for p in layer] for layer in report.dropped[b]]
        if not visual:
            assert got == [[]] * 4
            continue
        hidden, key_norm = capture_dart_features(model, single, DART_LAYER - 1)
        text = list(range(max(visual) + 1, single["input_ids"].shape[1]))
        expected, margin = ref_dart(hidden, key_norm, visual, text, counts[DART_LAYER - 1])
        assert margin > MARGIN, f"sample {b}: a near tie ({margin:.2g}) makes the comparison ill-posed"
        assert len(expected) == counts[DART_LAYER - 1] > 0
        assert got[DART_LAYER - 1] == expected
        assert all(got[layer] == [] for layer in range(4) if layer != DART_LAYER - 1)


def test_visionzip_selection_equals_reference(llava):
    model, make_inputs = llava
    specs, recipe = _specs("llava"), _visionzip()
    batch = make_inputs(specs)
    _, report = _pruned(model, batch, recipe)
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual = _visual_positions(single)
        if not visual:
            assert report.dropped_input[b] == []
            continue
        n_patch = len(visual)
        keep, contextual = n_patch - recipe.input_count(n_patch), recipe.merge_count(n_patch)
        assert 0 < contextual < keep < n_patch
        (kept,), _, margin = ref_visionzip(model, single["pixel_values"], keep, contextual)
        assert margin > MARGIN, f"sample {b}: a near tie ({margin:.2g}) makes the comparison ill-posed"
        expected = sorted(visual[p] for p in range(n_patch) if p not in kept)
        assert [p - pad for p in report.dropped_input[b]] == expected
        assert report.kept[b, pad:].nonzero()[0].tolist() == [
            p for p in range(single["input_ids"].shape[1]) if p not in set(expected)]


def test_visionzip_reference_cls_attention_matches_eager_tower(llava):
    """The reference's hand-computed CLS attention is the tower's own (eager) attention map, at the
    layer whose output is the feature layer: guards the reference's layer indexing."""
    model, make_inputs = llava
    pixels = make_inputs(_specs("llava"))["pixel_values"]
    tower = model.model.vision_tower
    before = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixels, output_hidden_states=True, output_attentions=True)
    finally:
        tower.set_attn_implementation(before)
    vfl = model.config.vision_feature_layer
    layers = getattr(tower, "vision_model", tower).encoder.layers
    j = len(layers) + vfl if vfl < 0 else vfl - 1
    cls = out.attentions[j][:, :, 0].sum(1)[:, 1:].double()  # (N, P)
    n_patch = cls.shape[1]
    for keep in (9, 18):
        kept, _, _ = ref_visionzip(model, pixels, keep, 0)  # no contextual tokens: the top-`keep` by CLS attention
        for i in range(pixels.shape[0]):
            top = sorted(range(n_patch), key=lambda p: (-float(cls[i, p]), p))[:keep]
            assert kept[i] == sorted(top)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_visionzip_on_other_families_is_a_clear_error(family):
    model, _ = FACTORIES[family]()
    impl = model.model.language_model.config._attn_implementation
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RecipeError, match=family):
        fitprune.apply(model, _visionzip().with_updates(family=None))
    assert not hasattr(model, "_fitprune")
    assert model.model.language_model.config._attn_implementation == impl
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


# -- b. pruned forward equals physical removal ----------------------------------------------------------


def _check_logits(logits, b, pad, ref_logits, kept):
    ours = logits[b, [p + pad for p in kept]]
    assert ours.shape == ref_logits.shape
    err = (ours - ref_logits).abs().max().item()
    assert err <= TOL, f"sample {b}: max |Δlogits| = {err:.3g}"


def test_divprune_forward_equals_physical_removal(family_model):
    family, model, make_inputs = family_model
    specs, recipe = _specs(family), _divprune(family)
    batch = make_inputs(specs)
    logits, report = _pruned(model, batch, recipe)
    for b, single, pad in _samples(make_inputs, specs, batch):
        _, removed, _ = _divprune_removed(model, single, recipe)
        ref_logits, kept, dropped = reference_forward(model, single, None, VISUAL_IDS, input_drops=removed)
        assert dropped == [[]] * 4
        assert report.kept[b, pad:].nonzero()[0].tolist() == kept
        _check_logits(logits, b, pad, ref_logits, kept)


def test_dart_selection_in_left_padded_generate_equals_reference(family_model):
    """The prefill of ``generate`` (position ids counted from each row's first real token) picks as the
    unpadded sample does, with no position ids passed by the caller."""
    family, model, make_inputs = family_model
    specs, recipe = _specs(family), _dart(family)
    batch = make_inputs(specs)
    with fitprune.apply(model, recipe) as m:
        _generate(m, batch)
        report = fitprune.last_report(m)
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual = _visual_positions(single)
        if visual:
            hidden, key_norm = capture_dart_features(model, single, DART_LAYER - 1)
            text = list(range(max(visual) + 1, single["input_ids"].shape[1]))
            expected, _ = ref_dart(hidden, key_norm, visual, text, recipe.drop_counts(len(visual))[DART_LAYER - 1])
            assert [p - pad for p in report.dropped[b][DART_LAYER - 1]] == expected


def test_dart_forward_equals_physical_removal(family_model):
    family, model, make_inputs = family_model
    specs, recipe = _specs(family), _dart(family)
    batch = make_inputs(specs)
    logits, report = _pruned(model, _dart_batch(family, batch), recipe)
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual = _visual_positions(single)
        fixed = [[] for _ in range(4)]
        if visual:
            hidden, key_norm = capture_dart_features(model, single, DART_LAYER - 1)
            text = list(range(max(visual) + 1, single["input_ids"].shape[1]))
            fixed[DART_LAYER - 1], _ = ref_dart(hidden, key_norm, visual, text,
                                                recipe.drop_counts(len(visual))[DART_LAYER - 1])
        ref_logits, kept, dropped = reference_forward(model, single, None, VISUAL_IDS, fixed_drops=fixed)
        assert dropped == fixed
        assert report.kept[b, pad:].nonzero()[0].tolist() == kept
        _check_logits(logits, b, pad, ref_logits, kept)


def test_visionzip_forward_equals_merged_physical_removal(llava):
    model, make_inputs = llava
    specs, recipe = _specs("llava"), _visionzip()
    batch = make_inputs(specs)
    logits, report = _pruned(model, batch, recipe)
    with torch.no_grad():
        stock = model(**batch).logits
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual = _visual_positions(single)
        embeds, removed = None, []
        if visual:
            n_patch = len(visual)
            keep, contextual = n_patch - recipe.input_count(n_patch), recipe.merge_count(n_patch)
            (kept_patches,), merged, _ = ref_visionzip(model, single["pixel_values"], keep, contextual)
            embeds = visionzip_embeds(model, single, merged)
            removed = [visual[p] for p in range(n_patch) if p not in kept_patches]
        ref_logits, kept, _ = reference_forward(model, single, None, VISUAL_IDS, input_drops=removed, embeds=embeds)
        _check_logits(logits, b, pad, ref_logits, kept)
        if visual:  # the merge matters: without it the kept tokens' logits differ
            plain, _, _ = reference_forward(model, single, None, VISUAL_IDS, input_drops=removed)
            assert (plain - ref_logits).abs().max().item() > 100 * TOL
    # the visionzip recipe is taken off with the model: the stock forward is back
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock)


@pytest.mark.parametrize("fractions", [(0.0,) * 4, (0.0, 0.25, 0.0, 0.0)])
def test_random_input_pruning_equals_physical_removal(family_model, fractions):
    """Random input pruning (alone, and followed by an in-LLM drop) replayed from the report."""
    family, model, make_inputs = family_model
    specs = _specs(family)
    recipe = Recipe(drop_fractions=fractions, scoring="random", input_fraction=0.25, family=family)
    batch = make_inputs(specs)
    logits, report = _pruned(model, batch, recipe)
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual = _visual_positions(single)
        removed = [p - pad for p in report.dropped_input[b]]
        fixed = [[p - pad for p in layer] for layer in report.dropped[b]]
        assert len(removed) == recipe.input_count(len(visual))
        assert set(removed) <= set(visual)
        assert [len(d) for d in fixed] == (recipe.drop_counts(len(visual)) if visual else [0] * 4)
        assert not set(removed) & set(sum(fixed, []))
        ref_logits, kept, _ = reference_forward(model, single, None, VISUAL_IDS, fixed_drops=fixed,
                                                input_drops=removed)
        assert report.kept[b, pad:].nonzero()[0].tolist() == kept
        _check_logits(logits, b, pad, ref_logits, kept)
    _, again = _pruned(model, batch, recipe)
    assert again.dropped_input == report.dropped_input  # seeded
    _, other = _pruned(model, batch, recipe.with_updates(seed=1))
    assert other.dropped_input != report.dropped_input


# -- c. cached generate equals uncached recompute; KV cache lengths -------------------------------------


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


def _with_new_tokens(single, new):
    ids = torch.cat([single["input_ids"][0], new])[None]
    inputs = dict(single, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = (ids == IMAGE_ID).long()
    return inputs


def test_divprune_cached_generate_equals_uncached_recompute(family_model):
    family, model, make_inputs = family_model
    specs = _specs(family)
    batch = make_inputs(specs)
    with fitprune.apply(model, _divprune(family)) as m:
        out = _generate(m, batch)
        report = fitprune.last_report(m)  # the prefill's
    width = batch["input_ids"].shape[1]
    assert len(out.logits) == 4
    for b, single, pad in _samples(make_inputs, specs, batch):
        removed = [p - pad for p in report.dropped_input[b]]
        for step in range(len(out.logits)):
            inputs = _with_new_tokens(single, out.sequences[b, width: width + step])
            ref_logits, _, _ = reference_forward(model, inputs, None, VISUAL_IDS, input_drops=removed)
            err = (out.logits[step][b] - ref_logits[-1]).abs().max().item()
            assert err <= 1e-4, f"sample {b}, step {step}: {err:.3g}"


def test_visionzip_cached_generate_equals_uncached_recompute(llava):
    model, make_inputs = llava
    specs, recipe = _specs("llava"), _visionzip()
    batch = make_inputs(specs)
    with fitprune.apply(model, recipe) as m:
        out = _generate(m, batch)
        report = fitprune.last_report(m)
    width = batch["input_ids"].shape[1]
    for b, single, pad in _samples(make_inputs, specs, batch):
        visual = _visual_positions(single)
        removed = [p - pad for p in report.dropped_input[b]]
        merged = None
        if visual:
            n_patch = len(visual)
            _, merged, _ = ref_visionzip(model, single["pixel_values"], n_patch - recipe.input_count(n_patch),
                                         recipe.merge_count(n_patch))
        for step in range(len(out.logits)):
            inputs = _with_new_tokens(single, out.sequences[b, width: width + step])
            embeds = visionzip_embeds(model, inputs, merged) if visual else None
            ref_logits, _, _ = reference_forward(model, inputs, None, VISUAL_IDS, input_drops=removed, embeds=embeds)
            err = (out.logits[step][b] - ref_logits[-1]).abs().max().item()
            assert err <= 1e-4, f"sample {b}, step {step}: {err:.3g}"


def test_input_stage_kv_cache_lengths(family_model):
    family, model, make_inputs = family_model
    a, _ = IMAGES[family]
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.0, 0.0), scoring="random", input_fraction=0.25, family=family)
    for specs in ([(4, a, 5), (4, a, 5)], _specs(family)):  # no padding; then left padding + text only
        batch = make_inputs(specs)
        with fitprune.apply(model, recipe) as m:
            out = _generate(m, batch)
            report = fitprune.last_report(m)
        length = batch["input_ids"].shape[1]
        generated = out.sequences.shape[1] - length
        assert generated == 4
        cache = cache_of(out)
        # layer 0 ran on the survivors of the input stage, but its cache is laid out at full length
        assert report.attn_tokens[:, 0].max() < length
        assert cache.layers[0].keys.shape[-2] == cache.layers[0].values.shape[-2] == length + generated - 1
        n_vis = [int(n) for n in report.n_visual]
        for layer in range(1, recipe.num_layers):
            # later layers hold the compressed prefill (the widest sample's survivors) + the new tokens
            alive = [length - recipe.input_count(n) - sum((recipe.drop_counts(n) if n else [0] * 4)[:layer])
                     for n in n_vis]
            assert cache.layers[layer].keys.shape[-2] == max(alive) + generated - 1


# -- d. FLOPs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["divprune", "random+layer", "visionzip", "dart"])
def test_flops_prediction_equals_executed_counts(family_model, kind):
    family, model, make_inputs = family_model
    if kind == "visionzip" and family != "llava":
        pytest.skip("visionzip runs on llava only (the other families: test_visionzip_on_other_families_...)")
    recipe = {
        "divprune": lambda: _divprune(family),
        "random+layer": lambda: Recipe(drop_fractions=(0.0, 0.25, 0.0, 0.0), scoring="random",
                                       input_fraction=0.25, family=family),
        "visionzip": lambda: _visionzip(),
        "dart": lambda: _dart(family),
    }[kind]()
    specs = _specs(family)
    batch = make_inputs(specs)
    _, report = _pruned(model, batch, recipe)
    dims = ModelDims.from_config(model.model.language_model.config)
    for b, single, _ in _samples(make_inputs, specs, batch):
        n_real = single["input_ids"].shape[1]
        n_vis = len(_visual_positions(single))
        n_other = n_real - n_vis
        attn, mlp = recipe_token_schedule(recipe, n_vis, n_other)
        assert report.attn_tokens[b].tolist() == attn
        assert report.mlp_tokens[b].tolist() == mlp
        # tokens removed before layer 0 never enter its attention
        assert report.attn_tokens[b, 0] == n_real - recipe.input_count(n_vis)
        assert report.attn_visual[b, 0] == n_vis - recipe.input_count(n_vis)
        full = prefill_flops(dims, [n_real] * dims.num_layers)
        measured = 1.0 - float(report.flops(dims)[b]) / full
        assert recipe_reduction(recipe, dims, n_vis, n_other) == pytest.approx(measured, rel=1e-12, abs=1e-15)
        assert (measured > 0) == (n_vis > 0)
        if n_vis:
            paper_full = prefill_flops(dims, [n_vis] * dims.num_layers, convention="fitprune-paper")
            paper = 1.0 - float(report.flops(dims, "fitprune-paper")[b]) / paper_full
            assert recipe_reduction(recipe, dims, n_vis, 0, "fitprune-paper") == pytest.approx(paper, rel=1e-12)


# -- e. recipe validation ---------------------------------------------------------------------------------


def test_input_plus_layer_fractions_over_one_rejected():
    Recipe(drop_fractions=(0.0, 0.5, 0.0, 0.0), scoring="random", input_fraction=0.5)  # exactly all: allowed
    with pytest.raises(RecipeError, match="input_fraction"):
        Recipe(drop_fractions=(0.0, 0.5, 0.0, 0.0), scoring="random", input_fraction=0.51)
    with pytest.raises(RecipeError, match="input_fraction"):
        Recipe(drop_fractions=(0.3, 0.3, 0.0, 0.0), scoring="random", input_fraction=0.45)
    with pytest.raises(RecipeError, match="input_fraction"):
        Recipe(drop_fractions=(0.0,) * 4, scoring="divprune", input_fraction=1.2)


@pytest.mark.parametrize("scoring, fields", [
    ("divprune", dict(input_fraction=0.5)),
    ("random", dict(input_fraction=0.5)),
    ("fitprune", dict()),
    ("dart", dict(drop_fractions=(0.0, 0.5, 0.0, 0.0))),
])
def test_merge_fraction_without_visionzip_rejected(scoring, fields):
    fields = {"drop_fractions": (0.0,) * 4, **fields}
    Recipe(scoring=scoring, **fields)  # valid without the merge
    with pytest.raises(RecipeError, match="merge_fraction"):
        Recipe(scoring=scoring, merge_fraction=0.1, **fields)


def test_merge_fraction_must_fit_in_the_kept_tokens():
    _visionzip(input_fraction=0.5, merge_fraction=0.5)  # every kept token merged: allowed
    with pytest.raises(RecipeError, match="merge_fraction"):
        _visionzip(input_fraction=0.5, merge_fraction=0.55)
    with pytest.raises(RecipeError, match="merge_fraction"):
        _visionzip(input_fraction=0.9, merge_fraction=0.2)
    r = _visionzip(input_fraction=0.5, merge_fraction=0.125)
    assert r.changes_values and not _visionzip(merge_fraction=0.0).changes_values
    assert (r.input_count(36), r.merge_count(36)) == (18, 4)
    assert r.merge_count(1) <= 1 - r.input_count(1)


@pytest.mark.parametrize("scoring, fields", [
    ("visionzip", dict(drop_fractions=(0.0, 0.2, 0.0, 0.0), input_fraction=0.5)),  # visionzip: input only
    ("divprune", dict(drop_fractions=(0.0, 0.2, 0.0, 0.0))),
    ("dart", dict(drop_fractions=(0.0,) * 4, input_fraction=0.5)),  # dart: in-LLM only
    ("fastv", dict(drop_fractions=(0.0,) * 4, input_fraction=0.5)),
])
def test_scorings_outside_their_stage_rejected(scoring, fields):
    with pytest.raises(RecipeError):
        Recipe(scoring=scoring, **fields)


def test_json_round_trip_keeps_input_and_merge_fractions(tmp_path):
    for recipe in (_visionzip(input_fraction=0.625, merge_fraction=0.1), _divprune("qwen2_vl", 0.3),
                   Recipe(drop_fractions=(0.0, 0.25, 0.0, 0.0), scoring="random", input_fraction=0.25, seed=4)):
        data = json.loads(recipe.to_json())
        assert data["input_fraction"] == recipe.input_fraction > 0
        assert ("merge_fraction" in data) == (recipe.merge_fraction > 0)
        back = Recipe.from_dict(data)
        assert back == recipe
        assert (back.input_fraction, back.merge_fraction) == (recipe.input_fraction, recipe.merge_fraction)
        path = tmp_path / f"{recipe.scoring}.json"
        recipe.save(path)
        assert Recipe.load(path) == recipe
        assert Recipe.load(path).to_json() == recipe.to_json()


def test_recipe_without_input_stage_keeps_its_old_json():
    old = {"budget": 0.5, "checkpoint": None, "drop_fractions": [0.0, 0.25, 0.25, 0.0], "family": "llava",
           "flops_convention": None, "format_version": 1, "metadata": {}, "method": "fitprune", "scoring": "fitprune",
           "seed": 0}
    text = json.dumps(old, sort_keys=True, indent=2)
    recipe = Recipe.from_dict(json.loads(text))
    assert recipe.to_json() == text
    d = Recipe(drop_fractions=(0.0, 0.25, 0.0, 0.0), input_fraction=0.0, merge_fraction=0.0).to_dict()
    assert "input_fraction" not in d and "merge_fraction" not in d
    assert "input_fraction" in _divprune(None).to_dict()
    preset = fitprune.preset("llava-1.5-7b/60").to_dict()
    assert "input_fraction" not in preset and "merge_fraction" not in preset
