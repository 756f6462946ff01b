import pytest

from fitprune.flops import recipe_reduction
from fitprune.presets import list_presets, model_info, preset, published_counts, reference_dims
from fitprune.recipe import Recipe, RecipeError

MODELS = ("llava-1.5-7b", "llava-hr-7b", "llava-next-7b")


def _ref_count(info):
    return info.get("visual_tokens", info.get("visual_tokens_reference"))


def test_list_presets_is_complete_and_sorted_numerically():
    names = list_presets()
    for model in MODELS:
        for key in model_info(model)["recipes"]:
            assert f"{model}/{key}" in names
    assert len(names) == sum(len(model_info(m)["recipes"]) for m in MODELS)
    ones = [n for n in names if n.startswith("llava-1.5-7b/")]
    assert [int(n.split("/")[1]) for n in ones] == sorted(int(n.split("/")[1]) for n in ones)
    assert ones.index("llava-1.5-7b/55") < ones.index("llava-1.5-7b/60")


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name, tmp_path):
    model, key = name.split("/")
    info = model_info(model)
    r = preset(name)
    assert r.num_layers == info["num_layers"]
    assert r.method == "published" and r.scoring == "fitprune"
    assert r.family == ("llava_next" if model == "llava-next-7b" else "llava")
    assert r.budget == int(key) / 100
    assert r.flops_convention == "fitprune-paper"
    assert r.metadata["model"] == model and "ywh187/FitPrune" in r.metadata["source"]
    assert r.metadata["reference_visual_tokens"] == _ref_count(info)
    # the reference count gives back exactly the published counts
    assert r.drop_counts(_ref_count(info)) == published_counts(model, key)
    r.save(tmp_path / "p.json")
    assert Recipe.load(tmp_path / "p.json") == r


def test_llava_15_presets_reproduce_counts_at_576():
    for name in list_presets():
        if name.startswith("llava-1.5-7b/"):
            key = name.split("/")[1]
            assert preset(name).drop_counts(576) == published_counts("llava-1.5-7b", key)


@pytest.mark.parametrize("key", ["40", "60"])
@pytest.mark.parametrize("n", [2880, 2144, 1176, 576, 2928, 1, 0, *range(2000, 3000, 37)])
def test_next_presets_follow_the_authors_scaling_rule(key, n):
    counts = published_counts("llava-next-7b", key)
    assert preset(f"llava-next-7b/{key}").drop_counts(n) == [int(c * n / 2880) for c in counts]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(RecipeError, match=r"unknown preset 'llava-1.5-7b/65'.*llava-1.5-7b/60"):
        preset("llava-1.5-7b/65")
    with pytest.raises(RecipeError, match="llava-next-7b/40"):
        preset("llava-1.5-7b")
    with pytest.raises(RecipeError, match="llava-hr-7b"):
        published_counts("llava-2", "60")
    with pytest.raises(RecipeError, match="known: .*90"):
        published_counts("llava-1.5-7b", "65")


def test_reference_dims_match_the_data():
    for model in MODELS:
        info, dims = model_info(model), reference_dims(model)
        assert dims.hidden_size == info["hidden_size"]
        assert dims.intermediate_size == info["intermediate_size"]
        assert dims.num_layers == info["num_layers"]
        assert dims.num_heads * dims.head_dim == dims.hidden_size


def test_model_info_is_a_copy():
    model_info("llava-1.5-7b")["recipes"]["60"][0] = 999
    assert published_counts("llava-1.5-7b", "60")[0] != 999


def test_budgets_grow_with_the_nominal_percentage():
    dims = reference_dims("llava-1.5-7b")
    keys = sorted(model_info("llava-1.5-7b")["recipes"], key=int)
    reductions = [recipe_reduction(preset(f"llava-1.5-7b/{k}"), dims, 576, 0, "fitprune-paper") for k in keys]
    assert reductions == sorted(reductions) and reductions[0] == 0.0
