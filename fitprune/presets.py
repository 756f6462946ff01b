"""The recipes published with FitPrune, as :class:`~fitprune.recipe.Recipe` presets.

Source: the authors' code, github.com/ywh187/FitPrune (arXiv 2409.10197), which hard-codes one list
of per-layer visual-token drop counts per model and nominal FLOPs-reduction percentage. They are
stored verbatim in ``fitprune/data/published_recipes.json``; this module is the only place that
knows those numbers (and the paper's reference visual-token counts: 576 for LLaVA-1.5, 1024 for
LLaVA-HR, 2880 for LLaVA-NeXT).

A preset is named ``"<model>/<percent>"``, e.g. ``"llava-1.5-7b/60"``. Its fractions are
``count / reference_visual_tokens``, so ``drop_counts(reference)`` gives back the published counts,
and for LLaVA-NeXT ``drop_counts(n)`` reproduces the authors' run-time rule
``int(count * n / 2880)`` for any ``n``.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any

from .flops import ModelDims
from .recipe import Recipe, RecipeError

__all__ = ["list_presets", "model_info", "preset", "published_counts", "reference_dims"]

SOURCE = "github.com/ywh187/FitPrune"
_FAMILY = {"llava-1.5-7b": "llava", "llava-hr-7b": "llava", "llava-next-7b": "llava_next"}
# The 7B models are Vicuna-7B (LLaMA-2 7B widths): 128-wide heads, no GQA, 32000-token vocabulary
# (huggingface.co/lmsys/vicuna-7b-v1.5, config.json). The JSON holds hidden/MLP widths and layers.
_HEAD_DIM = 128
_VOCAB = 32000


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    text = resources.files("fitprune").joinpath("data", "published_recipes.json").read_text(encoding="utf-8")
    return json.loads(text)["models"]


def _model(model_key: str) -> dict[str, Any]:
    models = _data()
    if model_key not in models:
        raise RecipeError(f"unknown published model {model_key!r}; known: {', '.join(sorted(models))}")
    return models[model_key]


def _reference_visual_tokens(entry: dict[str, Any]) -> int:
    return int(entry.get("visual_tokens", entry.get("visual_tokens_reference")))


def _budget_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (10**9, key)


def list_presets() -> list[str]:
    """All preset names, ``"<model>/<percent>"``, sorted by model then by numeric budget."""
    return [
        f"{model}/{budget}"
        for model in sorted(_data())
        for budget in sorted(_data()[model]["recipes"], key=_budget_order)
    ]


def model_info(model_key: str) -> dict[str, Any]:
    """A copy of the JSON entry of one published model (widths, reference visual count, recipes)."""
    return copy.deepcopy(_model(model_key))


def published_counts(model_key: str, budget_key: str | int) -> list[int]:
    """The raw per-layer drop counts, shape ``(num_layers,)``, of one published recipe."""
    recipes = _model(model_key)["recipes"]
    key = str(budget_key)
    if key not in recipes:
        raise RecipeError(
            f"no published recipe {key!r} for {model_key!r}; known: {', '.join(sorted(recipes, key=_budget_order))}"
        )
    return [int(c) for c in recipes[key]]


def reference_dims(model_key: str) -> ModelDims:
    """The language model's dims for one published model (Vicuna-7B widths, see module constants)."""
    entry = _model(model_key)
    hidden = int(entry["hidden_size"])
    heads = hidden // _HEAD_DIM
    return ModelDims(
        hidden_size=hidden,
        num_layers=int(entry["num_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_HEAD_DIM,
        intermediate_size=int(entry["intermediate_size"]),
        vocab_size=_VOCAB,
        gated_mlp=True,
    )


def preset(name: str) -> Recipe:
    """The published recipe ``name`` (see :func:`list_presets`) as a :class:`Recipe`.

    ``budget`` is the nominal percentage / 100 under the ``"fitprune-paper"`` FLOPs convention; what
    the counts really remove under it is :func:`fitprune.flops.recipe_reduction` (a little less for
    some low budgets).
    """
    model_key, sep, budget_key = str(name).partition("/")
    if not sep or model_key not in _data() or budget_key not in _data()[model_key]["recipes"]:
        raise RecipeError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    entry = _data()[model_key]
    counts = published_counts(model_key, budget_key)
    if len(counts) != int(entry["num_layers"]):  # pragma: no cover - guards the data file
        raise RecipeError(f"preset {name!r} has {len(counts)} entries for a {entry['num_layers']}-layer model")
    n_ref = _reference_visual_tokens(entry)
    return Recipe.from_counts(
        counts,
        n_ref,
        scoring="fitprune",
        method="published",
        family=_FAMILY.get(model_key),
        budget=int(budget_key) / 100,
        flops_convention="fitprune-paper",
        metadata={
            "source": SOURCE,
            "model": model_key,
            "preset": name,
            "reference_visual_tokens": n_ref,
            "published_counts": counts,
        },
    )
