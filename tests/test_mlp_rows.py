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


class _NormOfAnotherTensorLayer(nn.Module):  # the norm's input is not the residual
    def forward(self, hidden_states, other):
        residual = hidden_states
        other = self.post_norm(other)
        other = self.mlp(other)
        hidden_states = residual + other
        return hidden_states


class _WorkBetweenNormAndMlpLayer(nn.Module):
    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.post_norm(hidden_states)
        hidden_states = hidden_states * 2
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class _NormCalledTwiceLayer(nn.Module):
    def forward(self, hidden_states):
        hidden_states = self.post_norm(hidden_states)
        residual = hidden_states
        hidden_states = self.post_norm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


@pytest.mark.parametrize("layer_type", [LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer])
def test_the_norm_before_the_mlp_is_found(layer_type):
    assert mlp_rows._norm_feeding_mlp(layer_type, "mlp") == "post_attention_layernorm"


@pytest.mark.parametrize("layer_type", [Gemma2DecoderLayer, _NormedMlpLayer, _NormOfAnotherTensorLayer,
                                        _WorkBetweenNormAndMlpLayer, _NormCalledTwiceLayer])
def test_no_norm_is_taken_where_the_source_does_not_say_so(layer_type):
    assert mlp_rows._norm_feeding_mlp(layer_type, "mlp") is None


def test_the_norm_found_must_be_a_module_of_the_layer():
    layer = LlamaDecoderLayer.__new__(LlamaDecoderLayer)  # a LLaMA layer's forward, none of its modules
    nn.Module.__init__(layer)
    assert mlp_rows.norm_before_mlp(layer) is None
    layer.post_attention_layernorm = nn.LayerNorm(4)
    assert mlp_rows.norm_before_mlp(layer) is layer.post_attention_layernorm


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


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_folded_mlp_is_bit_identical_to_the_scatter_path_on_cuda_in_bf16(family):
    # the norm and the MLP run on fewer rows there: the GPU's reductions and GEMMs must still give the same bits
    model, make = FACTORIES[family]()
    model = model.cuda().to(torch.bfloat16)
    a, b = IMAGES[family]
    batch = {k: v.cuda() for k, v in make([(5, a, 7), (3, b, 4), (4, None, 6)]).items()}
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), scoring="fitprune")
    folded, out, report, gen, _ = _run(model, batch, recipe, fold=True)
    _, ref, ref_report, ref_gen, _ = _run(model, batch, recipe, fold=False)
    assert folded == {1, 2}
    assert (report.kept == ref_report.kept).all()
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(gen.sequences, ref_gen.sequences)


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


def test_the_stand_in_reuses_rows_gathered_from_that_very_residual_only():
    gen = torch.Generator().manual_seed(1)
    residual = torch.randn(2, 6, 8, generator=gen)
    rows = torch.randn(2, 4, 8, generator=gen)
    sel = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    marked = torch.full((2, 4, 8), 7.0)  # stands for residual's rows at sel, told apart by its values
    out = residual + mlp_rows.survivors(rows, sel, 6, gathered=(residual, marked))
    assert torch.equal(out, marked + rows)  # taken from the norm's gather, not gathered again
    other = residual.clone()  # equal values, another tensor: gathered from it
    out = other + mlp_rows.survivors(rows, sel, 6, gathered=(residual, marked))
    assert torch.equal(out, torch.gather(other, 1, sel[..., None].expand(-1, -1, 8)) + rows)


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


@pytest.mark.parametrize("family", FAMILIES)
def test_the_norm_and_mlp_run_on_the_survivors_gathered_once(family, monkeypatch):
    model, make = FACTORIES[family]()
    a, _ = IMAGES[family]
    batch = make([(5, a, 7), (3, a, 4)])
    layers = get_adapter(model).language_model(model).layers
    rows_seen = {}  # layer -> rows its post-attention norm and MLP received (after fitprune's hooks)
    gathers = []
    real = fitprune.rows.take_rows

    def counting(x, sel):
        gathers.append(tuple(x.shape))
        return real(x, sel)

    monkeypatch.setattr(fitprune.prune, "take_rows", counting)
    monkeypatch.setattr(mlp_rows, "take_rows", counting)
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), scoring="fitprune")
    with fitprune.apply(model, recipe) as m, torch.no_grad():
        for i, layer in enumerate(layers):
            for name in ("post_attention_layernorm", "mlp"):
                getattr(layer, name).register_forward_pre_hook(
                    lambda mod, args, i=i, name=name: rows_seen.setdefault(i, {}).__setitem__(name, args[0].shape[1]))
        m(**batch)
        report = fitprune.last_report(m)
    assert all(mlp_rows.norm_before_mlp(layers[i]) is layers[i].post_attention_layernorm for i in (1, 2))
    width = batch["input_ids"].shape[1]
    # slots after each layer: the input width less the fewest drops of a sample so far
    kept = [width - min(sum(len(d) for d in report.dropped[b][: i + 1]) for b in range(2)) for i in range(4)]
    assert rows_seen[1] == {"post_attention_layernorm": kept[1], "mlp": kept[1]} and kept[1] < kept[0]
    assert rows_seen[2] == {"post_attention_layernorm": kept[2], "mlp": kept[2]} and kept[2] < kept[1]
    assert rows_seen[0] == {"post_attention_layernorm": width, "mlp": width}
    assert len(gathers) == 2  # one gather per pruning layer: the residual's, at the norm


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pruned_forward_is_differentiable_through_its_gathers(family):
    """Autograd through the pruned forward (the norm's gather, the compacting residual sum, the final
    scatter): the gradient of the logits with respect to layer 0's post-attention norm weight matches a
    central finite difference. Row moves in integer words would cut the graph off (the weight then gets no
    gradient at all). The model runs in float64, but its RMSNorm computes in float32, hence the wide step."""
    model, make = FACTORIES[family]()
    model = model.double()
    a, _ = IMAGES[family]
    batch = make([(5, a, 7), (3, a, 4)])
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    recipe = Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), scoring="fitprune")
    weight = get_adapter(model).language_model(model).layers[0].post_attention_layernorm.weight
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with fitprune.apply(model, recipe) as m:
        m.zero_grad()
        m(**batch).logits.sum().backward()
        assert weight.grad is not None
        analytic = float((weight.grad * direction).sum())
        kept = fitprune.last_report(m).kept
        eps = 1e-2
        with torch.no_grad():
            sides = []
            for sign in (1, -1):
                weight.add_(sign * eps * direction)
                sides.append(float(m(**batch).logits.sum()))
                assert (fitprune.last_report(m).kept == kept).all()  # the same drops on both sides
                weight.sub_(sign * eps * direction)
    numeric = (sides[0] - sides[1]) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-3)
