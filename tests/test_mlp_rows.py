"""The MLP of a pruning layer folded in after the layer (fitprune.mlp_rows) equals the generic path.

The folded path must give bit-identical logits, reports and decode to the generic
scatter path it replaces, on every family, and must only be taken for decoder layers whose forward
ends with ``residual + mlp(...)``.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FACTORIES, FAMILIES, IMAGES
from torch import nn
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

import fitprune
from fitprune import Recipe, mlp_rows
from fitprune.adapters import get_adapter


class _NormedMlpLayer(nn.Module):  # an MLP output that is normalised before the residual add
    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_norm(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class _ScaledResidualLayer(nn.Module):  # the residual add is followed by more work
    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states * 0.5


@pytest.mark.parametrize("layer_type", [LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer])
def test_plain_residual_layers_are_folded(layer_type):
    assert mlp_rows._ends_with_residual_add(layer_type, "mlp")


@pytest.mark.parametrize("layer_type", [Gemma2DecoderLayer, _NormedMlpLayer, _ScaledResidualLayer])
def test_layers_with_work_after_the_mlp_are_not(layer_type):
    assert not mlp_rows._ends_with_residual_add(layer_type, "mlp")


def test_an_mlp_under_another_name_is_not():
    assert not mlp_rows._ends_with_residual_add(LlamaDecoderLayer, "feed_forward")


def _run(model, batch, recipe, fold: bool):
    with fitprune.apply(model, recipe) as m, torch.no_grad():
        pruner = m._fitprune.pruner
        if not fold:
            pruner._fold_mlp.clear()
        folded = set(pruner._fold_mlp)
        logits = m(**batch)
        report = fitprune.last_report(m)
        states = m(**batch, output_hidden_states=True)  # a call that records hidden states: generic path
        gen = m.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    return folded, logits, report, gen, states


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_mlp_is_bit_identical_to_the_scatter_path(family):
    model, make = FACTORIES[family]()
    a, b = IMAGES[family]
    batch = make([(5, a, 7), (3, b, 4), (4, None, 6)])  # padded, two image sizes, one text-only sample
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), scoring="fitprune")
    folded, out, report, gen, states = _run(model, batch, recipe, fold=True)
    assert folded == {1, 2}  # the pruning layers of this recipe, all plain residual layers
    layers = get_adapter(model).language_model(model).layers
    assert all(mlp_rows.feeds_residual(layers[i]) for i in folded)
    none, ref, ref_report, ref_gen, _ = _run(model, batch, recipe, fold=False)
    assert none == set()
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(states.logits, ref.logits)
    assert (report.kept == ref_report.kept).all()
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for x, y in zip(gen.logits, ref_gen.logits):
        assert torch.equal(x, y)


def test_the_stand_in_compacts_the_residual_sum_and_is_a_zero_elsewhere():
    gen = torch.Generator().manual_seed(0)
    residual = torch.randn(2, 6, 8, generator=gen).to(torch.bfloat16)
    rows = torch.randn(2, 4, 8, generator=gen).to(torch.bfloat16)
    sel = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    s = mlp_rows.survivors(rows, sel, 6)
    assert s.shape == (2, 6, 8) and not s.taken
    doubled = s * 2  # anything but the residual sum: the broadcast zero, as a plain tensor
    assert type(doubled) is torch.Tensor and doubled.shape == (2, 6, 8) and not doubled.any() and not s.taken
    out = residual + s  # the layer's last step
    assert s.taken and type(out) is torch.Tensor and out.shape == (2, 4, 8)
    want = torch.gather(residual, 1, sel[..., None].expand(-1, -1, 8)) + rows
    assert torch.equal(out, want)
    assert torch.equal(mlp_rows.survivors(rows, sel, 6) + residual, want)  # either order
    wrong = mlp_rows.survivors(rows, sel, 6)
    plain = residual.float() + wrong  # not the layer's residual (another dtype): the plain zero's sum
    assert plain.shape == (2, 6, 8) and torch.equal(plain, residual.float()) and not wrong.taken


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_layers_return_the_survivors_rows_themselves(family, monkeypatch):
    made = []
    real = mlp_rows.survivors

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(mlp_rows, "survivors", spy)
    model, make = FACTORIES[family]()
    a, _ = IMAGES[family]
    batch = make([(5, a, 7), (3, a, 4)])
    with fitprune.apply(model, Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), scoring="fitprune")) as m, torch.no_grad():
        m(**batch)
    assert len(made) == 2 and all(s.taken for s in made)  # both pruning layers' sums took the survivors
