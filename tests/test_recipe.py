import json
import math
import os
import random

import pytest

from fitprune.recipe import FORMAT_VERSION, SCORINGS, Recipe, RecipeError, validate_for


def _recipe(**kw):
    base = dict(
        drop_fractions=(0.0, 1 / 3, 0.1, 1e-17, 0.2),
        scoring="fastv",
        method="fastv",
        family="llava",
        checkpoint="abc123",
        budget=0.45,
        flops_convention="full",
        seed=7,
        metadata={"alpha": 0.125, "source": "test", "nested": {"k": [1, 2]}},
    )
    base.update(kw)
    return Recipe(**base)


# -- construction and validation ---------------------------------------------------------------


def test_lists_become_tuples_and_metadata_is_a_detached_copy():
    meta = {"a": [1, 2]}
    r = Recipe([0.1, 0.2], metadata=meta)
    assert r.drop_fractions == (0.1, 0.2) and isinstance(r.drop_fractions, tuple)
    meta["a"].append(3)
    meta["b"] = 1
    assert r.metadata == {"a": [1, 2]}
    assert type(r.metadata) is dict
    hash(r)  # frozen recipes are usable as dict keys despite the metadata dict


@pytest.mark.parametrize(
    "fractions, match",
    [
        ((), "empty"),
        ((0.1, -0.01), r"drop_fractions\[1\] = -0.01"),
        ((1.5,), r"\[0, 1\]"),
        ((math.nan,), "finite"),
        ((math.inf,), "finite"),
        (("0.1",), "finite number"),
        ((True,), "finite number"),
        ((0.6, 0.5), "sum to 1.1"),
        ("0.1", "sequence"),
    ],
)
def test_bad_fractions_are_rejected(fractions, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(fractions)


def test_fractions_summing_to_one_up_to_rounding_are_allowed():
    r = Recipe((1 / 3,) * 3)
    assert math.fsum(r.drop_fractions) == pytest.approx(1.0)
    assert sum(r.drop_counts(9)) == 9


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"scoring": "l2"}, "fitprune, fastv, random"),
        ({"budget": 1.0}, r"\[0, 1\)"),
        ({"budget": -0.1}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"family": 3}, "family must be a string"),
        ({"checkpoint": b"x"}, "checkpoint"),
        ({"method": ""}, "method"),
        ({"seed": 1.5}, "seed"),
        ({"flops_convention": "mine"}, "fitprune-paper"),
        ({"metadata": {"x": object()}}, "JSON"),
        ({"metadata": {"x": math.nan}}, "JSON"),
        ({"metadata": [1]}, "mapping"),
    ],
)
def test_bad_fields_are_rejected(changes, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(**changes)


def test_scorings_are_the_engine_rules():
    from fitprune.recipe import INPUT_SCORINGS, LAYER_SCORINGS

    assert set(SCORINGS) == set(LAYER_SCORINGS) | set(INPUT_SCORINGS)
    for s in SCORINGS:
        if s in LAYER_SCORINGS:
            assert Recipe((0.5,), scoring=s).scoring == s
        else:
            with pytest.raises(RecipeError, match="before the language model only"):
                Recipe((0.5,), scoring=s)
        if s in INPUT_SCORINGS:
            assert Recipe((0.0,), scoring=s, input_fraction=0.5).input_count(10) == 5
        else:
            with pytest.raises(RecipeError, match="select before the language model"):
                Recipe((0.0,), scoring=s, input_fraction=0.5)


def test_num_layers_and_is_noop():
    assert Recipe((0.0,) * 4).is_noop and Recipe((0.0,) * 4).num_layers == 4
    assert not Recipe((0.0, 0.0, 1e-9)).is_noop


# -- counts --------------------------------------------------------------------------------------


def test_drop_counts_floor_each_layer():
    r = Recipe((0.25, 0.1, 0.05))
    assert r.drop_counts(10) == [2, 1, 0]
    assert r.drop_counts(0) == [0, 0, 0]


def test_drop_counts_never_exceed_the_visual_tokens():
    # within the sum tolerance, but floor(f * n) adds up past n for a huge n: the running total is clipped
    r = Recipe((0.5 + 2.5e-10, 0.5 + 2.5e-10))
    n = 10**10
    counts = r.drop_counts(n)
    assert sum(counts) == n and counts[0] > n // 2


@pytest.mark.parametrize("n", [-1, 2.0, True, "5"])
def test_drop_counts_rejects_bad_n(n):
    with pytest.raises(RecipeError, match="n_visual"):
        Recipe((0.1,)).drop_counts(n)


def test_from_counts_round_trips_counts():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 5000)
        layers = rng.randint(1, 40)
        counts, left = [], n
        for _ in range(layers):
            k = rng.randint(0, left // 3)
            counts.append(k)
            left -= k
        r = Recipe.from_counts(counts, n, method="published")
        assert r.drop_counts(n) == counts
        assert r.method == "published"


def test_from_counts_dropping_everything():
    r = Recipe.from_counts([1, 1, 1], 3)
    assert r.drop_counts(3) == [1, 1, 1]


@pytest.mark.parametrize(
    "counts, n, match",
    [([3, 4], 6, "sum to 7"), ([1, -1], 6, r"counts\[1\]"), ([1.5], 6, "integers"), ([1], 0, "positive")],
)
def test_from_counts_errors(counts, n, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_counts(counts, n)


# -- serialisation ------------------------------------------------------------------------------


def test_dict_round_trip_is_exact():
    r = _recipe()
    d = r.to_dict()
    assert d["format_version"] == FORMAT_VERSION
    json.dumps(d)  # JSON-able
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(Recipe((0.5,)).to_dict()) == Recipe((0.5,))


def test_to_json_sorts_keys():
    data = json.loads(_recipe().to_json())
    assert list(data) == sorted(data)
    assert data["format_version"] == FORMAT_VERSION


def test_save_load_is_exact_and_atomic(tmp_path):
    r = _recipe(drop_fractions=tuple(random.Random(1).random() / 40 for _ in range(32)))
    path = tmp_path / "r.json"
    r.save(path)
    back = Recipe.load(path)
    assert back == r
    assert all(a == b for a, b in zip(back.drop_fractions, r.drop_fractions))  # bit-exact floats
    r2 = r.with_updates(seed=8)
    r2.save(str(path))  # overwrite in place, str path
    assert Recipe.load(path) == r2
    assert os.listdir(tmp_path) == ["r.json"]  # no temp files left behind


def _write(tmp_path, content):
    p = tmp_path / "bad.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def test_load_malformed_json_names_the_file(tmp_path):
    p = _write(tmp_path, "{not json")
    with pytest.raises(RecipeError, match="bad.json.*not valid JSON"):
        Recipe.load(p)


def test_load_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe file.*nope.json"):
        Recipe.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content, match",
    [
        ([0.1, 0.2], "JSON object"),
        ({"drop_fractions": [0.1]}, "missing 'format_version'"),
        ({"format_version": "1", "drop_fractions": [0.1]}, "format_version = '1'"),
        ({"format_version": FORMAT_VERSION + 1, "drop_fractions": [0.1]}, "upgrade fitprune"),
        ({"format_version": FORMAT_VERSION, "scoring": "fastv"}, "missing required key 'drop_fractions'"),
        ({"format_version": FORMAT_VERSION, "drop_fractions": [0.7, 0.7]}, r"bad.json.*sum to 1.4"),
    ],
)
def test_load_errors_name_file_and_problem(tmp_path, content, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.load(_write(tmp_path, content))
    with pytest.raises(RecipeError, match="bad.json"):
        Recipe.load(_write(tmp_path, content))


def test_unknown_keys_are_dropped_with_a_warning(tmp_path):
    d = _recipe().to_dict()
    d["colour"] = "blue"
    with pytest.warns(UserWarning, match="colour"):
        back = Recipe.load(_write(tmp_path, d))
    assert back == _recipe()


# -- updates and model checks ----------------------------------------------------------------------


def test_with_updates_revalidates():
    r = _recipe()
    assert r.with_updates(budget=0.5).budget == 0.5 and r.budget == 0.45
    with pytest.raises(RecipeError, match="unknown recipe field.*'colour'"):
        r.with_updates(colour=1)
    with pytest.raises(RecipeError, match="scoring"):
        r.with_updates(scoring="nope")


def test_validate_for():
    r = Recipe((0.0,) * 32, family="llava")
    validate_for(r, family="llava", num_layers=32)
    with pytest.raises(RecipeError, match="recipe has 32 layers, model has 30: fit a recipe"):
        validate_for(r, family="llava", num_layers=30)
    with pytest.raises(RecipeError, match="'llava'.*'qwen2_vl'"):
        validate_for(r, family="qwen2_vl", num_layers=32)
    validate_for(r.with_updates(family=None), family="qwen2_vl", num_layers=32)  # None = any family
