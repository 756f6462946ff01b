"""Output divergence of a recipe (fitprune/divergence.py): KL(unpruned ‖ pruned) of the next-token
distribution and the FLOPs reduction measured from executed token counts.

Uses the toy model (8 layers, 144 visual tokens, 16 samples in 4 batches) and, for a cross-family
check with left padding, the tiny LLaVA and Qwen2-VL models of ``tiny_models``."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fitprune
import fitprune.baselines
from fitprune.divergence import Divergence, NonFiniteDivergence, Reference, divergence, reference
from fitprune.flops import ModelDims
from fitprune.demo.toy import toy_batches, toy_model
from reference import measured_reduction
from tiny_models import FACTORIES, IMAGES, PAD_ID

L = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy():
    model = toy_model(0)
    batches = toy_batches(16, 4, 0, "cal")
    dims = ModelDims.from_config(model.config.text_config)
    return model, batches, dims


@pytest.fixture(scope="module")
def ref1(toy):
    model, batches, _ = toy
    return reference(model, batches, tokens=1)


@pytest.fixture(scope="module")
def ref3(toy):
    model, batches, _ = toy
    return reference(model, batches, tokens=3)


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "sample_ids"}


def independent_kl(model, inputs, recipe) -> np.ndarray:
    """KL(p_unpruned ‖ p_pruned) at the last position (left-padded or unpadded inputs), via F.kl_div."""
    with torch.no_grad():
        p = model(**inputs).logits[:, -1].float()
        with fitprune.apply(model, recipe):
            q = model(**inputs).logits[:, -1].float()
    kl = F.kl_div(F.log_softmax(q, dim=-1), F.log_softmax(p, dim=-1), log_target=True, reduction="none").sum(-1)
    return kl.double().numpy()


# -- 1. the no-op recipe -----------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 3])
def test_noop_recipe_has_exactly_zero_divergence(toy, ref1, ref3, tokens):
    model, batches, _ = toy
    ref = ref1 if tokens == 1 else ref3
    assert isinstance(ref, Reference) and ref.tokens == tokens and ref.num_samples == 16
    d = divergence(model, batches, fitprune.Recipe((0.0,) * L), ref)
    assert isinstance(d, Divergence)
    assert d.n_samples == 16 and d.tokens == tokens and d.per_sample.shape == (16,)
    assert d.kl == 0.0
    assert np.all(d.per_sample == 0.0)
    assert d.flops_reduction == 0.0
    assert d.finite


def test_reference_sample_ids_and_shapes(toy, ref3):
    _, batches, _ = toy
    assert ref3.sample_ids == tuple(n for b in batches for n in b["sample_ids"])
    for lp, valid, forced in zip(ref3.log_probs, ref3.valid, ref3.forced):
        assert lp.shape[:2] == (4, 3) and valid.shape == (4, 3) and forced.shape == (4, 3)
        # log-probabilities: each row's probabilities sum to 1
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, 3), rtol=0, atol=1e-4)
        # the forced tokens are the greedy ones of the unpruned model
        assert torch.equal(forced, lp.argmax(-1))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cross_family_noop_zero_and_pruning_matches_independent_kl(family):
    """Left-padded batches with different prompt lengths: no-op KL exactly 0 (tokens 1 and 2); the
    pruned KL at the last real position equals F.kl_div's."""
    model, make = FACTORIES[family](0)
    a, b = IMAGES[family]
    batches = [make([(3, a, 5, 0), (2, b, 8, 1)]), make([(4, b, 3, 2), (2, a, 6, 3)])]
    assert any((bt["attention_mask"] == 0).any() for bt in batches)  # padding is really there
    n_layers = len(fitprune.get_adapter(model).language_model(model).layers)
    noop = fitprune.Recipe((0.0,) * n_layers)
    prune = fitprune.baselines.fastv(n_layers, layer=2, ratio=0.7)
    for tokens in (1, 2):
        ref = reference(model, batches, tokens=tokens)
        d0 = divergence(model, batches, noop, ref)
        assert np.all(d0.per_sample == 0.0) and d0.kl == 0.0 and d0.flops_reduction == 0.0
    ref = reference(model, batches, tokens=1)
    d = divergence(model, batches, prune, ref)
    assert d.finite and d.kl > 0.0 and d.flops_reduction > 0.0
    expected = np.concatenate([independent_kl(model, _inputs(bt), prune) for bt in batches])
    assert np.all(expected > 1e-5)
    np.testing.assert_allclose(d.per_sample, expected, rtol=1e-3, atol=1e-6)


def _right_padded(batch):
    """The same samples, right-padded instead of left-padded."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = dict(batch)
    out["input_ids"], out["attention_mask"] = torch.full_like(ids, PAD_ID), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        out["input_ids"][i, :n] = ids[i, mask[i].bool()]
        out["attention_mask"][i, :n] = 1
    return out


@pytest.fixture(scope="module")
def llava_padded():
    model, make = FACTORIES["llava"](0)
    specs = [(3, "img", 5, 0), (2, "img", 9, 1)]  # sample 0 is 3 tokens shorter: padded
    left = make(specs)
    assert (left["attention_mask"] == 0).any()
    return model, left, _right_padded(left), [make([s]) for s in specs]


def test_right_padded_batch_equals_per_sample_tokens_1(llava_padded):
    """tokens=1 on a right-padded batch compares the last *real* position: same per-sample KL as each
    sample alone, unpadded (fitprune scoring)."""
    model, _, right, singles = llava_padded
    recipe = fitprune.Recipe((0.0, 0.5, 0.0, 0.0))
    d_right = divergence(model, [right], recipe, reference(model, [right]))
    d_single = divergence(model, singles, recipe, reference(model, singles))
    assert np.all(d_single.per_sample > 1e-5)
    np.testing.assert_allclose(d_right.per_sample, d_single.per_sample, rtol=1e-3, atol=1e-7)
    assert d_right.flops_reduction == pytest.approx(d_single.flops_reduction, rel=1e-12)


def test_right_padded_batch_is_refused_for_tokens_2(llava_padded):
    """Generating after a right-padded prompt would continue from a pad position: refused with a clear error."""
    model, left, right, _ = llava_padded
    assert reference(model, [left], tokens=2).forced[0].shape[1] == 2
    with pytest.raises(ValueError, match="left-padded"):
        reference(model, [right], tokens=2)


def test_right_padded_batch_equals_per_sample_fastv_scoring(llava_padded):
    """FastV scores from each sample's last real token, so a right-padded batch drops what each sample
    alone does (it used to score from the last row, a padding row on the shorter sample)."""
    model, _, right, singles = llava_padded
    recipe = fitprune.baselines.fastv(4, layer=2, ratio=0.7)
    d_right = divergence(model, [right], recipe, reference(model, [right]))
    d_single = divergence(model, singles, recipe, reference(model, singles))
    np.testing.assert_allclose(d_right.per_sample, d_single.per_sample, rtol=1e-3, atol=1e-7)


# -- 2. a pruning recipe: KL > 0 and the measured reduction --------------------------------------------


def test_pruning_recipe_positive_kl_and_measured_reduction(toy, ref1):
    model, batches, dims = toy
    recipe = fitprune.baselines.fastv(L, layer=2, ratio=0.6)
    d = divergence(model, batches, recipe, ref1)
    assert d.finite
    assert math.isfinite(d.kl) and d.kl > 0.0
    assert np.all(d.per_sample >= 0.0)
    assert d.kl == pytest.approx(float(np.mean(d.per_sample)), rel=1e-12)
    expected = measured_reduction(model, batches, recipe, dims)
    assert 0.0 < expected < 1.0
    assert d.flops_reduction == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert d.flops_reduction == pytest.approx(1.0 - d.flops_pruned / d.flops_full, rel=1e-12)
    assert fitprune.last_report(model) is None and not hasattr(model, "_fitprune")  # recipe was removed


def test_kl_over_three_tokens_includes_the_first_position(toy, ref1, ref3):
    """With tokens=3 the per-sample KL sums the first answer position (the tokens=1 KL) and two more
    non-negative terms, so it is at least the tokens=1 KL; the measured reduction is the same."""
    model, batches, _ = toy
    recipe = fitprune.baselines.fastv(L, layer=2, ratio=0.6)
    d1 = divergence(model, batches, recipe, ref1)
    d3 = divergence(model, batches, recipe, ref3)
    assert d3.finite and d3.tokens == 3
    assert np.all(d3.per_sample >= d1.per_sample - 1e-5)
    assert d3.kl > d1.kl
    assert d3.flops_reduction == pytest.approx(d1.flops_reduction, rel=1e-12)


# -- 3. KL equals an independent computation -------------------------------------------------------


@pytest.mark.parametrize("recipe", [
    fitprune.baselines.fastv(L, layer=2, ratio=0.9),
    fitprune.baselines.pyramid(L, keep=0.5),
    fitprune.Recipe((0.3, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0, 0.0)),
], ids=["fastv", "pyramid", "fitprune-scoring"])
def test_kl_equals_independent_kl_div(toy, recipe):
    model, batches, _ = toy
    batch = batches[1]
    d = divergence(model, [batch], recipe, reference(model, [batch]))
    expected = independent_kl(model, _inputs(batch), recipe)
    assert np.all(expected > 1e-4)  # not a vacuous comparison of near-zero numbers
    np.testing.assert_allclose(d.per_sample, expected, rtol=0, atol=1e-5)
    assert d.kl == pytest.approx(float(expected.mean()), abs=1e-5)


# -- 4. more pruning, more divergence -----------------------------------------------------------------


def test_more_pruning_at_the_same_layer_diverges_more(toy, ref1):
    model, batches, _ = toy
    light = divergence(model, batches, fitprune.baselines.fastv(L, layer=2, ratio=0.2), ref1)
    heavy = divergence(model, batches, fitprune.baselines.fastv(L, layer=2, ratio=0.9), ref1)
    assert heavy.flops_reduction > light.flops_reduction
    assert heavy.kl > light.kl


# -- 5. errors -----------------------------------------------------------------------------------------


def test_batch_count_mismatch_raises(toy, ref1):
    model, batches, _ = toy
    recipe = fitprune.baselines.fastv(L, layer=2, ratio=0.5)
    with pytest.raises(ValueError, match="reference was computed on 4"):
        divergence(model, batches[:3], recipe, ref1)
    with pytest.raises(ValueError, match="reference was computed on 4"):
        divergence(model, batches + batches[:1], recipe, ref1)


def test_batch_size_mismatch_raises(toy, ref1):
    model, batches, _ = toy
    short = dict(batches[0])
    for k in ("input_ids", "attention_mask", "pixel_values"):
        short[k] = short[k][:3]
    short["sample_ids"] = short["sample_ids"][:3]
    with pytest.raises(ValueError, match="3 samples"):
        divergence(model, [short] + batches[1:], fitprune.Recipe((0.0,) * L), ref1)
    assert not hasattr(model, "_fitprune")  # the error left no recipe applied


@pytest.mark.parametrize("tokens", [0, -1, True, 1.0])
def test_bad_tokens_raise(toy, tokens):
    model, batches, _ = toy
    with pytest.raises(ValueError, match="tokens"):
        reference(model, batches[:1], tokens=tokens)


def test_bad_arguments_raise(toy, ref1):
    model, batches, _ = toy
    with pytest.raises(ValueError, match="no calibration batches"):
        reference(model, [])
    with pytest.raises(ValueError, match="input_ids"):
        reference(model, [{"pixel_values": batches[0]["pixel_values"]}])
    with pytest.raises(TypeError, match="Recipe"):
        divergence(model, batches, (0.0,) * L, ref1)
    with pytest.raises(TypeError, match="Reference"):
        divergence(model, batches, fitprune.Recipe((0.0,) * L), ref1.log_probs)


def test_nan_logits_raise_nonfinite_divergence(toy):
    model, batches, _ = toy
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteDivergence, match="not finite"):
        reference(broken, batches[:2])
    with pytest.raises(NonFiniteDivergence):
        reference(broken, batches[:1], tokens=2)
    assert issubclass(NonFiniteDivergence, ValueError)
    assert torch.isfinite(model.lm_head.weight).all()  # the copy, not the shared toy model, was broken
