from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fitprune.flops import (
    CONVENTIONS,
    ModelDims,
    layer_macs,
    prefill_flops,
    prefill_macs,
    projector_macs,
    recipe_reduction,
    recipe_token_schedule,
    vit_macs,
)
from fitprune.presets import model_info, preset, reference_dims
from fitprune.recipe import Recipe

LLAVA = model_info("llava-1.5-7b")
N_VIS = LLAVA["visual_tokens"]


def _paper_reduction(key):
    return recipe_reduction(preset(f"llava-1.5-7b/{key}"), reference_dims("llava-1.5-7b"), N_VIS, 0, "fitprune-paper")


# -- the authors' convention reproduces DESIGN.md's numbers ------------------------------------------


@pytest.mark.parametrize("key, expected", [("60", 59.70), ("90", 89.68)])
def test_published_recipes_under_the_paper_convention(key, expected):
    assert 100 * _paper_reduction(key) == pytest.approx(expected, abs=0.2)


def _whole_layer_reduction(counts, at_input):
    """DESIGN's sanity check: charge the whole layer 4nd² + 2n²d + 3ndm at n (input) or n' (output)."""
    d, m = LLAVA["hidden_size"], LLAVA["intermediate_size"]

    def cost(n):
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    total, n = 0, N_VIS
    for k in counts:
        total += cost(n if at_input else n - k)
        n -= k
    return 1 - total / (len(counts) * cost(N_VIS))


def test_design_sanity_numbers_for_the_60_recipe():
    counts = LLAVA["recipes"]["60"]
    assert 100 * _whole_layer_reduction(counts, at_input=True) == pytest.approx(57.9, abs=0.1)
    assert 100 * _whole_layer_reduction(counts, at_input=False) == pytest.approx(60.4, abs=0.1)
    # the split convention lies strictly between the two
    assert _whole_layer_reduction(counts, True) < _paper_reduction("60") < _whole_layer_reduction(counts, False)


def test_paper_convention_unpruned_total():
    d, m, L = LLAVA["hidden_size"], LLAVA["intermediate_size"], LLAVA["num_layers"]
    dims = reference_dims("llava-1.5-7b")
    expected = L * (4 * N_VIS * d * d + 2 * N_VIS**2 * d + 3 * N_VIS * d * m)
    assert prefill_macs(dims, [N_VIS] * L, convention="fitprune-paper") == expected


# -- the "full" convention against a real transformers model ------------------------------------------


def _count_linear_macs(model, *args, **kwargs):
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        total += inp[0].shape[:-1].numel() * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("head_dim", [None, 32])
def test_full_convention_matches_a_llama_forward(head_dim):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, head_dim=head_dim,
    )
    model = LlamaForCausalLM(cfg).eval()
    n = 7
    linear = _count_linear_macs(model, torch.arange(n)[None])
    dims = ModelDims.from_config(cfg)
    assert dims.head_dim == (head_dim or 16) and dims.num_kv_heads == 2 and dims.gated_mlp
    attention_matmuls = dims.num_layers * 2 * n * n * dims.num_heads * dims.head_dim  # QKᵀ and AV, full n×n
    assert prefill_macs(dims, [n, n], lm_head_tokens=n) == linear + attention_matmuls


def test_from_config_defaults_and_overrides():
    cfg = SimpleNamespace(
        model_type="opt", hidden_size=64, num_attention_heads=8, num_hidden_layers=3,
        intermediate_size=256, vocab_size=10, head_dim=None, num_key_value_heads=None,
    )
    dims = ModelDims.from_config(cfg)
    assert (dims.head_dim, dims.num_kv_heads, dims.gated_mlp) == (8, 8, False)
    assert ModelDims.from_config(cfg, gated_mlp=True).gated_mlp
    with pytest.raises(ValueError, match="intermediate_size.*text"):
        ModelDims.from_config(SimpleNamespace(hidden_size=8, num_attention_heads=2, num_hidden_layers=1))


def test_from_config_qwen2():
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
                      intermediate_size=200, vocab_size=50)
    dims = ModelDims.from_config(cfg)
    assert (dims.head_dim, dims.num_kv_heads, dims.gated_mlp, dims.vocab_size) == (32, 1, True, 50)


def test_ungated_mlp_costs_two_matrices():
    gated = ModelDims(64, 1, 4, 4, 16, 100, 0, gated_mlp=True)
    plain = ModelDims(64, 1, 4, 4, 16, 100, 0, gated_mlp=False)
    assert layer_macs(gated, 10, 6) - layer_macs(plain, 10, 6) == 6 * 64 * 100


def test_pruning_inside_a_layer_only_saves_mlp():
    dims = ModelDims(64, 1, 4, 2, 16, 100, 0)
    assert layer_macs(dims, 10, 10) - layer_macs(dims, 10, 4) == 3 * 6 * 64 * 100


# -- schedules and reductions -----------------------------------------------------------------------


def test_token_schedule():
    r = Recipe.from_counts([0, 100, 0, 50], 300)
    attn, mlp = recipe_token_schedule(r, 300, n_other=40)
    assert attn == [340, 340, 240, 240] and mlp == [340, 240, 240, 190]
    assert all(a == b for a, b in zip(attn[1:], mlp))  # tokens left after layer l enter layer l+1
    # fractions scale with the sample's visual count; the other tokens never shrink
    attn, mlp = recipe_token_schedule(r, 600, n_other=0)
    assert mlp[-1] == 600 - 200 - 100


def test_reduction_is_zero_for_noop_and_grows_with_drops():
    dims = ModelDims(256, 4, 4, 2, 64, 512, 1000)
    assert recipe_reduction(Recipe((0.0,) * 4), dims, 500, 50) == 0.0
    prev = 0.0
    for frac in (0.1, 0.3, 0.6, 1.0):
        red = recipe_reduction(Recipe((0.0, frac, 0.0, 0.0)), dims, 500, 50)
        assert red > prev
        prev = red
    # earlier drops save more
    early = recipe_reduction(Recipe((0.5, 0, 0, 0)), dims, 500, 50)
    assert early > recipe_reduction(Recipe((0, 0, 0.5, 0)), dims, 500, 50)


def test_flops_are_twice_macs_and_lm_head_is_counted():
    dims = ModelDims(64, 2, 4, 4, 16, 100, 1000)
    assert prefill_flops(dims, [10, 8], [8, 8]) == 2 * prefill_macs(dims, [10, 8], [8, 8])
    assert prefill_macs(dims, [10, 8], lm_head_tokens=3) - prefill_macs(dims, [10, 8]) == 3 * 64 * 1000


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: prefill_macs(d, [10]), "1 entries, the model has 2 layers"),
        (lambda d: prefill_macs(d, [10, 10], [10]), "mlp_tokens has 1"),
        (lambda d: prefill_macs(d, [10, -1]), "n_in must be a non-negative"),
        (lambda d: layer_macs(d, 5, 6), "n_out=6 > n_in=5"),
        (lambda d: layer_macs(d, 5, 4, "flash"), "known: fitprune-paper, full"),
        (lambda d: prefill_macs(ModelDims(64, 2, 4, 4, 16, 100, 0), [1, 1], lm_head_tokens=1), "vocab_size"),
        (lambda d: recipe_reduction(Recipe((0.1,) * 3), d, 10), "recipe has 3 layers, model has 2"),
        (lambda d: recipe_token_schedule(Recipe((0.1,) * 2), 10, -1), "n_other"),
        (lambda d: ModelDims(64, 2, 4, 3, 16, 100, 0), "multiple of num_kv_heads"),
        (lambda d: ModelDims(0, 2, 4, 4, 16, 100, 0), "hidden_size must be a positive"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(ModelDims(64, 2, 4, 4, 16, 100, 10))


def test_conventions_registry():
    assert {"full", "fitprune-paper"} <= set(CONVENTIONS)


# -- outside the language model ------------------------------------------------------------------------


def test_vit_macs_matches_a_clip_forward():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7)
    model = CLIPVisionModel(cfg).eval()
    patches = (28 // 7) ** 2
    conv = patches * 3 * 7 * 7 * 32
    linear = _count_linear_macs(model, pixel_values=torch.zeros(1, 3, 28, 28))
    n = patches + 1
    attention_matmuls = 2 * 2 * n * n * 32
    assert vit_macs(cfg, patches) == linear + conv + attention_matmuls


def test_projector_macs_matches_a_two_layer_mlp():
    mlp = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40))
    assert projector_macs(9, 24, 40) == _count_linear_macs(mlp, torch.zeros(9, 24))
