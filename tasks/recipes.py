"""Recipes of the sweep: fitted per method and budget, written to the store when fitted, passed on by id.

``fit_budgets`` fits every method's budget grid and writes one ``recipes`` row per recipe with
the facts of its fit (predicted and measured reduction, feasible, α, divergence on the
calibration set) before anything is evaluated; it returns recipe ids. Later steps read the
recipe back with ``load_recipe``. A recipe's id is a hash of what it does (``recipe_id``), so the
same recipe fitted by two runs has one id and a row per run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time

from fitprune import Recipe
from fitprune.baselines import FAMILIES, random_recipe
from fitprune.fit import fit
from fitprune.flops import ModelDims
from storage import store

from .models import LOCK, load_model, normalize_spec
from .samples import load_samples
from .statistics import read_stats

__all__ = ["DEFAULT_METHODS", "METHODS", "SEARCH_SIZES", "check_methods", "fit_budgets", "load_recipe", "method_recipes",
           "recipe_id", "recipe_row", "search_config"]

METHODS = ("fitprune", "fitprune-paper", "fastv", "pyramid", "dart", "divprune", "visionzip", "random")
DEFAULT_METHODS = ("fitprune", "fitprune-paper", "fastv", "random")
SEARCH_SIZES = ("auto", "small", "full")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_methods(methods, family: str) -> None:
    """Refuse, before any work, a method the model's family cannot run (VisionZip needs LLaVA-1.5's layout)."""
    bad = [m for m in methods if family not in FAMILIES.get(m, (family,))]
    if bad:
        raise ValueError(f"method(s) {bad} cannot run on a {family!r} model: "
                         + "; ".join(f"{m} supports {', '.join(FAMILIES[m])}" for m in bad)
                         + ". Leave them out of --methods for this model.")


def search_config(size: str, device: str):
    """The divergence search of the ``fitprune`` method: ``small`` on a CPU, ``full`` on a GPU (``auto``)."""
    from fitprune.search import SearchConfig

    if size not in SEARCH_SIZES:
        raise ValueError(f"search size {size!r}; known: {', '.join(SEARCH_SIZES)}")
    if size == "auto":
        size = "small" if str(device).startswith("cpu") else "full"
    return SearchConfig.small() if size == "small" else SearchConfig.full()


def method_recipes(method: str, budgets, fitted: dict, searcher) -> list[Recipe]:
    """One recipe per budget for ``method``, every baseline matched to the budget on the calibration counts.

    ``fitted[b]``: the divergence search's result (``fitprune``); ``fitted[("paper", b)]``: the
    authors' statistical α-walk (``fitprune-paper``). ``random`` prunes ``fitprune``'s schedule at random.
    """
    recipes = []
    for budget in budgets:
        if method == "fitprune":
            recipe = fitted[budget].recipe
        elif method == "fitprune-paper":
            recipe = fitted[("paper", budget)].recipe.with_updates(method="fitprune-paper")
        elif method in ("fastv", "pyramid", "dart", "divprune", "visionzip"):
            recipe = searcher.baseline(method, budget)
        elif method == "random":
            recipe = random_recipe(fitted[budget].recipe, seed=0)
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        recipes.append(recipe)
    return recipes


def recipe_id(recipe: Recipe) -> str:
    """``r-`` + a hash of what the recipe does: every field but ``metadata``. The same schedule fitted
    again (other timings, other calibration facts) is the same recipe; each fit keeps its own row."""
    what = {k: v for k, v in recipe.to_dict().items() if k != "metadata"}
    return "r-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)


def recipe_row(recipe: Recipe, run_id: str, family: str) -> dict:
    """The ``recipes`` row of a fitted recipe: its fit's facts from its metadata (see ``fit_budgets``)."""
    meta = recipe.metadata
    div = meta.get("calibration_divergence") or {}
    measured = _finite_or_none(div.get("measured_reduction"))
    predicted = meta.get("predicted_reduction")
    if predicted is None:
        raise ValueError(f"recipe {recipe.method}@{recipe.budget}: its metadata has no predicted_reduction; only "
                         "fitted recipes (fit_budgets) are stored")
    if "feasible" in meta:
        feasible = bool(meta["feasible"])
    else:  # the baselines and the search: the budget is met on the calibration set, as measured
        reached = measured if measured is not None else float(predicted)
        feasible = recipe.budget is not None and reached >= recipe.budget - 1e-9
    return dict(
        recipe_id=recipe_id(recipe), checkpoint=recipe.checkpoint, family=family, method=recipe.method,
        scoring=recipe.scoring, budget=recipe.budget, flops_convention=recipe.flops_convention,
        alpha=meta.get("alpha"), predicted_reduction=float(predicted), drop_fractions=list(recipe.drop_fractions),
        recipe_json=recipe.to_json(), run_id=run_id, feasible=feasible,
        divergence=_finite_or_none(div.get("divergence")),
        divergence_search=_finite_or_none(div.get("divergence_search")),
        divergence_calib_id=div.get("calib_id"), divergence_samples=div.get("n_heldout"),
        measured_reduction=measured,
    )


def load_recipe(rid: str, root) -> Recipe:
    """The stored recipe ``rid``; a ValueError if no ``recipes`` row has it."""
    rows = store.read_table("recipes", root, filters={"recipe_id": rid}, columns=["recipe_json"])
    if not rows.num_rows:
        raise ValueError(f"recipe {rid} is not in the store under this data root; recipes are written when fitted "
                         "(tasks.recipes.fit_budgets): fit it first, or check the data root")
    return Recipe.from_dict(json.loads(rows.column("recipe_json")[0].as_py()))


def _grid_of(rows: list[dict], methods, budgets) -> dict:
    by_key = {(r["method"], r["budget"]): r["recipe_id"] for r in rows}
    return {m: [by_key[(m, float(b))] for b in budgets] for m in methods}


def fit_budgets(info: dict, stats_ref: dict, budgets, methods, convention: str, root, spec=None, calib=None,
                batch_size: int = 8, search: str = "auto", run_id: str | None = None, part: str | None = None) -> dict:
    """Fit the budget grid of every method, write the recipes, return ``{method: [recipe id, ...]}`` (budget order).

    ``fitprune`` is the divergence search (:mod:`fitprune.search`) on the calibration set ``calib``
    (batches of the ``spec`` model; a held-out part decides), ``fitprune-paper`` the authors'
    statistical α-walk on the stored statistics, the baselines are matched to each budget on the
    calibration token counts. Each ``recipes`` row (write id ``<run_id>-recipes``) carries the
    recipe's divergence on the calibration set (held-out and search parts), its measured and
    predicted FLOPs reduction there, and whether it meets its budget. Idempotent per run: if the
    run's recipes are stored already (a retried task), they are returned, not fitted again.
    ``part``: a name for this call's share of the run's grid when the methods are fitted by
    separate calls (``flows.fanout``, one per method group): write id ``<run_id>-recipes-<part>``.
    """
    from fitprune.search import RecipeSearch

    if spec is None or calib is None or run_id is None:
        raise ValueError("fit_budgets needs the model spec, the calibration set and the run id: the fitprune method "
                         "searches recipes by their output divergence on the calibration samples")
    if convention != "full":
        raise ValueError(f"the sweep measures FLOPs from executed token counts ('full' convention), not {convention!r}")
    check_methods(methods, info["family"])
    budgets, methods = [float(b) for b in budgets], list(methods)
    write_id = f"{run_id}-recipes" + (f"-{part}" if part else "")
    if store.part_exists("recipes", write_id, root):
        return _grid_of(store.read_table("recipes", root, filters={"run_id": run_id}).to_pylist(), methods, budgets)
    stats = read_stats(stats_ref["checkpoint"], stats_ref["calib_id"], root)
    dims = ModelDims(**info["dims"])
    spec = normalize_spec(spec)
    model = load_model(spec, root)
    # at least four batches, so the search has two to search on and two to decide on
    per = max(1, min(batch_size, calib["n"] // 4))
    batches = load_samples(calib, per, spec["device"], spec=spec, root=root)
    t0 = time.perf_counter()
    with LOCK:
        searcher = RecipeSearch(model, batches, stats, dims, config=search_config(search, spec["device"]),
                                convention=convention, family=info["family"], log=_log)
        # the authors' α-walk on the whole calibration set; also a seed of the search, so it cannot win there
        paper = fit(stats, budgets, dims, convention=convention, family=info["family"])
        fitted: dict = {("paper", b): r for b, r in zip(budgets, paper)}
        if {"fitprune", "random"} & set(methods):
            seeds = {b: [r.recipe.with_updates(method="fitprune-paper")] for b, r in zip(budgets, paper) if r.feasible}
            fitted.update({r.budget: r for r in searcher.fit(budgets, seeds=seeds)})
        _log(f"fit: {len(budgets)} budgets in {time.perf_counter() - t0:.1f}s")
        rows = []
        for m in methods:
            for r in method_recipes(m, budgets, fitted, searcher):
                r = r.with_updates(checkpoint=info["checkpoint"], flops_convention=convention)
                r = r.with_updates(metadata={**r.metadata, "calibration_divergence": searcher.measure(r)})
                rows.append(recipe_row(r, run_id, info["family"]))
    store.write_rows("recipes", rows, root=root, write_id=write_id)
    return _grid_of(rows, methods, budgets)
