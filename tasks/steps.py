"""The sweep's steps as plain functions over plain data (no Prefect here).

Each step takes and returns JSON-able values — a *model spec*, a calibration-set description,
recipe JSON, result dicts — so it can run as a Prefect task (``tasks.sweep``) or be called
directly (``flows.sweep.run_sweep``, which is what ``fitprune sweep`` runs). A model never
crosses a step boundary: every step that needs one calls ``load_model(spec)``, which builds or
loads it once per process and caches it, keyed by the spec.

Model specs::

    {"kind": "demo", "seed": 0}                 the interim demo model (flows/demo.py)
    {"kind": "path", "path": "/ckpt/llava"}     a local Hugging Face checkpoint directory

optionally with ``"device"`` (default ``"cpu"``). Samples come from a calibration-set
description ``{"source": "demo-synthetic", "n": 32, "seed": 0, "split": "calib"}``; the synthetic
demo inputs are the only source until real data lands (issue "Embedded default and evaluation").
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import torch

import fitprune
from fitprune import Recipe
from fitprune.adapters import get_adapter
from fitprune.baselines import fastv, for_budget, random_recipe
from fitprune.calibration import CalibrationStats
from fitprune.fingerprint import fingerprint
from fitprune.fit import fit
from fitprune.flops import ModelDims, prefill_flops
from fitprune.stats import collect_stats
from storage import catalog, store

__all__ = [
    "METHODS", "MODEL_KINDS", "SOURCES", "normalize_spec", "describe_model", "load_model", "model_info", "calibration_set",
    "load_samples", "calibration_stats", "collect_statistics", "fit_budgets", "method_recipes",
    "method_recipe_jsons", "recipe_id", "evaluate", "evaluate_recipe", "recipe_row", "eval_row",
    "write_results", "pareto_rows", "versions",
]

METHODS = ("fitprune", "fastv", "random")
MODEL_KINDS = ("demo", "path")
SOURCES = ("demo-synthetic",)

_MODELS: dict[str, torch.nn.Module] = {}
_REFERENCE: dict[str, list[torch.Tensor]] = {}
_LOCK = threading.RLock()  # tasks may run in threads of one process: build each model once


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def versions() -> dict:
    import transformers

    return {"fitprune": fitprune.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


# --- models ----------------------------------------------------------------------------------


def normalize_spec(spec) -> dict:
    """A validated copy of a model spec (see the module docstring); raises ValueError otherwise."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            spec = {"kind": "path", "path": spec}  # a bare string is a checkpoint directory
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec is a dict such as {{'kind': 'demo', 'seed': 0}}; got {spec!r}")
    kind = spec.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model spec kind {kind!r} is not known; use one of {', '.join(MODEL_KINDS)} "
                         "({'kind': 'demo', 'seed': 0} or {'kind': 'path', 'path': '/dir/with/config.json'})")
    out = {"kind": kind, "device": str(spec.get("device") or "cpu")}
    if kind == "demo":
        seed = spec.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"demo model spec: seed must be an integer, got {seed!r}")
        out["seed"] = seed
    else:
        from pathlib import Path

        path = spec.get("path")
        if not path or not (Path(path) / "config.json").is_file():
            raise ValueError(f"model spec path {path!r} is not a checkpoint directory (it needs a config.json); "
                             "pass {'kind': 'path', 'path': '/dir/with/config.json'}")
        out["path"] = str(Path(path).resolve())
    unknown = sorted(set(spec) - {"kind", "device", "seed", "path"})
    if unknown:
        raise ValueError(f"model spec: unknown key(s) {unknown}; allowed: kind, device, seed (demo), path (path)")
    dev = out["device"]
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {dev!r} asked for, but CUDA is not available here; use device 'cpu'")
    return out


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def load_model(spec) -> torch.nn.Module:
    """The model for ``spec``, built or loaded once per process (eval mode, on the spec's device)."""
    spec = normalize_spec(spec)
    key = _key(spec)
    with _LOCK:
        if key not in _MODELS:
            if spec["kind"] == "demo":
                from flows import demo  # interim demo model; goes with issue "Embedded default and evaluation"

                model = demo.demo_model(spec["seed"])
            else:
                _log(f"model: loading {spec['path']}")
                model = _load_local(spec["path"])
            _MODELS[key] = model.to(spec["device"]).eval()
        return _MODELS[key]


def describe_model(spec) -> str:
    """One line saying what the spec's model is (logged by every sweep)."""
    spec = normalize_spec(spec)
    if spec["kind"] == "demo":
        return (f"model: interim demo, seed {spec['seed']} (seeded random-weight tiny LLaVA, synthetic images) "
                "— agreement, not accuracy")
    return f"model: {spec['path']} on {spec['device']}"


def _load_local(path: str) -> torch.nn.Module:
    """A local checkpoint: image-text-to-text class first, then vision-to-sequence, then causal LM."""
    import transformers

    errors = []
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(path, local_files_only=True)
        except (ValueError, KeyError, OSError) as err:
            errors.append(f"{name}: {err}")
    raise ValueError(f"cannot load {path} with transformers: " + "; ".join(errors))


def model_info(spec) -> dict:
    """Checkpoint fingerprint, family and text dims (as a dict) of the spec's model.

    A path spec is fingerprinted from its files (what ``flows.recalibrate`` looks up); a demo
    model from its live weights.
    """
    spec = normalize_spec(spec)
    model = load_model(spec)
    adapter = get_adapter(model)
    dims = ModelDims.from_config(adapter.text_config(model))
    checkpoint = fingerprint(spec["path"]) if spec["kind"] == "path" else fingerprint(model)
    return {"checkpoint": checkpoint, "family": adapter.family, "dims": asdict(dims)}


def _dims(info: dict) -> ModelDims:
    return ModelDims(**info["dims"])


# --- data ------------------------------------------------------------------------------------


def calibration_set(n: int, seed: int, split: str = "calib", source: str = "demo-synthetic") -> dict:
    """Describe a sample set: which samples, from which source, with its id (a content key)."""
    if source not in SOURCES:
        raise ValueError(f"sample source {source!r} is not known; available: {', '.join(SOURCES)}")
    if split == "calib":
        calib_id = f"demo-{n}-s{seed}"  # the id the store already holds for demo statistics
    else:
        calib_id = f"{source}-{split}-{n}-s{seed}"
    return {"source": source, "split": split, "n": int(n), "seed": int(seed), "id": calib_id}


def load_samples(sample_set: dict, batch_size: int, device: str = "cpu") -> list[dict]:
    from flows import demo

    batches = demo.demo_batches(sample_set["n"], batch_size, sample_set["seed"], sample_set["split"])
    if device != "cpu":
        batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    return batches


# --- statistics ------------------------------------------------------------------------------


def calibration_stats(model, batches, checkpoint: str, calib_id: str, root) -> CalibrationStats:
    """Statistics of the calibration set: read from the store when present, else collected and written."""
    key = {"checkpoint": checkpoint, "calib_id": calib_id}
    tokens = store.read_table("stats_token", root, filters=key)
    if tokens.num_rows:
        _log(f"statistics: reusing {checkpoint}/{calib_id} from the store")
        layers = store.read_table("stats_layer", root, filters=key)
        return CalibrationStats.from_arrow(tokens, layers, checkpoint=checkpoint, calib_id=calib_id)
    n = sum(len(b["sample_ids"]) for b in batches)
    stats = collect_stats(model, batches, checkpoint=checkpoint, calib_id=calib_id,
                          progress=lambda k, done=[0]: (done.__setitem__(0, done[0] + k),
                                                        _log(f"statistics: {done[0]}/{n} samples")))
    tokens, layers = stats.to_arrow()
    write_id = f"{checkpoint}-{calib_id}"
    store.write_rows("stats_layer", layers, root=root, write_id=write_id, partition=key)
    store.write_rows("stats_token", tokens, root=root, write_id=write_id, partition=key)  # written last: marks done
    return stats


def stats_present(checkpoint: str, calib_id: str, root) -> bool:
    key = {"checkpoint": checkpoint, "calib_id": calib_id}
    return store.read_table("stats_token", root, filters=key).num_rows > 0


def collect_statistics(spec, calib: dict, checkpoint: str, batch_size: int, root) -> dict:
    """Make sure the store holds statistics for checkpoint + calibration set; say whether they were reused."""
    if stats_present(checkpoint, calib["id"], root):
        _log(f"statistics: reusing {checkpoint}/{calib['id']} from the store")
        return {"checkpoint": checkpoint, "calib_id": calib["id"], "reused": True}
    spec = normalize_spec(spec)
    model = load_model(spec)
    calibration_stats(model, load_samples(calib, batch_size, spec["device"]), checkpoint, calib["id"], root)
    return {"checkpoint": checkpoint, "calib_id": calib["id"], "reused": False}


def _read_stats(checkpoint: str, calib_id: str, root) -> CalibrationStats:
    key = {"checkpoint": checkpoint, "calib_id": calib_id}
    tokens = store.read_table("stats_token", root, filters=key)
    if not tokens.num_rows:
        raise ValueError(f"no statistics in the store for {checkpoint}/{calib_id}; collect them first")
    layers = store.read_table("stats_layer", root, filters=key)
    return CalibrationStats.from_arrow(tokens, layers, checkpoint=checkpoint, calib_id=calib_id)


# --- recipes ---------------------------------------------------------------------------------


def _fit(stats: CalibrationStats, budgets, dims, family, convention) -> dict:
    t0 = time.perf_counter()
    fitted = {r.recipe.budget: r for r in fit(stats, list(budgets), dims, convention=convention, family=family)}
    _log(f"fit: {len(fitted)} budgets in {time.perf_counter() - t0:.2f}s")
    return {b: fitted[b] for b in budgets}


def method_recipes(method: str, stats: CalibrationStats, budgets, dims, family, checkpoint, convention, fitted):
    """One recipe per budget for ``method``; FastV and random are matched to the same FLOPs."""
    n_visual = int(round(float(np.mean(stats.n_visual))))
    n_other = int(round(float(np.mean(stats.n_system + stats.n_text))))
    recipes = []
    for budget in budgets:
        if method == "fitprune":
            recipe = fitted[budget].recipe
        elif method == "fastv":
            recipe = for_budget(lambda r: fastv(dims.num_layers, layer=2, ratio=r, family=family), dims, budget,
                                n_visual, n_other, convention=convention)
        else:
            recipe = random_recipe(fitted[budget].recipe, seed=0)
        recipes.append(recipe.with_updates(checkpoint=checkpoint, budget=budget, flops_convention=convention))
    return recipes


def fit_budgets(info: dict, stats_ref: dict, budgets, methods, convention: str, root) -> dict:
    """The budget grid per method from stored statistics: ``{method: [recipe JSON, ...]}`` (budget order)."""
    stats = _read_stats(stats_ref["checkpoint"], stats_ref["calib_id"], root)
    dims = _dims(info)
    budgets = list(budgets)
    fitted = _fit(stats, budgets, dims, info["family"], convention)
    return {m: [r.to_json() for r in method_recipes(m, stats, budgets, dims, info["family"], info["checkpoint"],
                                                    convention, fitted)]
            for m in methods}


def method_recipe_jsons(method: str, fitted_grid: dict) -> list[str]:
    return list(fitted_grid[method])


def recipe_id(recipe: Recipe) -> str:
    return "r-" + hashlib.sha256(recipe.to_json().encode()).hexdigest()[:16]


# --- evaluation ------------------------------------------------------------------------------


def evaluate(model, batches, recipe: Recipe | None, reference: list[torch.Tensor], dims) -> dict:
    """Next-token agreement with the unpruned model and FLOPs measured from executed token counts."""
    start = time.perf_counter()
    agree, total, flops_pruned, flops_full = 0, 0, 0.0, 0.0
    L = dims.num_layers
    for batch, ref in zip(batches, reference):
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        if recipe is None:
            with torch.no_grad():
                logits = model(**inputs).logits[:, -1]
            per_sample = [prefill_flops(dims, [int(n)] * L) for n in inputs["attention_mask"].sum(1)]
            pruned = per_sample
        else:
            with fitprune.apply(model, recipe):
                with torch.no_grad():
                    logits = model(**inputs).logits[:, -1]
                report = fitprune.last_report(model)
            pruned = report.flops(dims, "full").tolist()
            per_sample = [prefill_flops(dims, [int(n)] * L) for n in report.attn_tokens[:, 0]]
        agree += int((logits.argmax(-1) == ref).sum())
        total += len(ref)
        flops_pruned += sum(pruned)
        flops_full += sum(per_sample)
    return {
        "metric": agree / total,
        "n_samples": total,
        "flops_reduction": 1.0 - flops_pruned / flops_full,
        "prefill_flops": flops_pruned / total,
        "wall_s": time.perf_counter() - start,
    }


def reference_tokens(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**{k: v for k, v in b.items() if k != "sample_ids"}).logits[:, -1].argmax(-1) for b in batches]


def evaluate_recipe(spec, info: dict, eval_set: dict, recipe_json: str | None, batch_size: int) -> dict:
    """Evaluate one recipe (``None``: the unpruned model) on the evaluation set; a result dict."""
    spec = normalize_spec(spec)
    model = load_model(spec)
    batches = load_samples(eval_set, batch_size, spec["device"])
    key = _key([spec, eval_set, batch_size])
    with _LOCK:  # pruning hooks are per model: one evaluation at a time per process
        if key not in _REFERENCE:
            _REFERENCE[key] = reference_tokens(model, batches)
        recipe = None if recipe_json is None else Recipe.from_dict(json.loads(recipe_json))
        return evaluate(model, batches, recipe, _REFERENCE[key], _dims(info))


# --- results ---------------------------------------------------------------------------------


def recipe_row(recipe: Recipe, method: str, family: str, run_id: str, convention: str) -> dict:
    return dict(
        recipe_id=recipe_id(recipe), checkpoint=recipe.checkpoint, family=family, method=method,
        scoring=recipe.scoring, budget=recipe.budget, flops_convention=convention,
        alpha=recipe.metadata.get("alpha"),
        predicted_reduction=float(recipe.metadata.get("predicted_reduction", recipe.budget)),
        drop_fractions=list(recipe.drop_fractions), recipe_json=recipe.to_json(), run_id=run_id,
    )


def eval_row(result: dict, run_id: str, rid: str, checkpoint: str, method: str, benchmark: str, vers: dict) -> dict:
    return dict(run_id=run_id, recipe_id=rid, checkpoint=checkpoint, method=method, benchmark=benchmark,
                n_failed=0, metric_name="agreement", shard=f"0-{result['n_samples']}", versions=vers, **result)


def write_results(run_id: str, recipe_rows: list[dict], eval_rows: list[dict], parameters: dict, started: float,
                  root, flow: str = "sweep") -> None:
    """Append the run's recipes, evaluations and run row (idempotent per run id)."""
    from datetime import datetime, timezone

    def ts(t):
        return datetime.fromtimestamp(t, tz=timezone.utc)

    store.write_rows("recipes", recipe_rows, root=root, write_id=run_id)
    store.write_rows("evaluations", eval_rows, root=root, write_id=run_id)
    store.write_rows("runs", [dict(run_id=run_id, flow=flow, parameters=parameters, status="completed",
                                   started_at=ts(started), ended_at=ts(time.time()), versions=versions())],
                     root=root, write_id=run_id)


def pareto_rows(root, checkpoint: str | None, benchmark: str | None) -> list[dict]:
    """The Pareto front from the DuckDB catalog as plain rows (timestamps as text)."""
    front = catalog.pareto(root, checkpoint=checkpoint, benchmark=benchmark)
    rows = []
    for row in front.to_pylist():
        rows.append({k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in row.items()})
    return rows
