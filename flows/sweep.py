"""The sweep: calibrate → fit a budget grid per method → evaluate → Pareto front.

Plain Python for now (``fitprune sweep`` runs it in-process); the Prefect flow and tasks of the
pipeline issue wrap these same steps. Every step reads and writes the store (Parquet + DuckDB);
statistics are keyed by checkpoint fingerprint and calibration id and reused when present.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

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

METHODS = ("fitprune", "fastv", "random")


@dataclass
class SweepConfig:
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7)
    methods: tuple[str, ...] = METHODS
    n_calib: int = 32
    n_eval: int = 64
    batch_size: int = 16
    seed: int = 0
    root: str | None = None
    convention: str = "full"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = [b for b in self.budgets if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"budgets must lie in (0, 1) (fractions of prefill FLOPs to remove); got {bad}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        for name in ("n_calib", "n_eval", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _versions() -> dict:
    import transformers

    return {"fitprune": fitprune.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


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


def recipe_id(recipe: Recipe) -> str:
    import hashlib

    return "r-" + hashlib.sha256(recipe.to_json().encode()).hexdigest()[:16]


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


def run_sweep(config: SweepConfig | None = None, model=None, calib_batches=None, eval_batches=None,
              benchmark: str = "demo-agreement") -> dict:
    """Run the whole sweep; returns {"run_id", "pareto" (Arrow table), "rows"}."""
    from flows import demo

    config = config or SweepConfig()
    run_id = "run-" + uuid.uuid4().hex[:12]
    root = config.root
    started = time.time()
    if model is None:
        _log("model: interim demo (seeded random-weight tiny LLaVA, synthetic images) — agreement, not accuracy")
        model = demo.demo_model(config.seed)
        calib_batches = demo.demo_batches(config.n_calib, config.batch_size, config.seed, "calib")
        eval_batches = demo.demo_batches(config.n_eval, config.batch_size, config.seed + 1, "eval")
    adapter = get_adapter(model)
    dims = ModelDims.from_config(adapter.text_config(model))
    checkpoint = fingerprint(model)
    calib_id = f"demo-{config.n_calib}-s{config.seed}"
    _log(f"checkpoint {checkpoint}; calibration {calib_id}; budgets {list(config.budgets)}; "
         f"methods {list(config.methods)}; {config.n_eval} evaluation samples")

    stats = calibration_stats(model, calib_batches, checkpoint, calib_id, root)
    t0 = time.perf_counter()
    fitted = {r.recipe.budget: r for r in fit(stats, list(config.budgets), dims, convention=config.convention,
                                              family=adapter.family)}
    fitted = {b: fitted[b] for b in config.budgets}
    _log(f"fit: {len(fitted)} budgets in {time.perf_counter() - t0:.2f}s")

    with torch.no_grad():
        reference = [model(**{k: v for k, v in b.items() if k != "sample_ids"}).logits[:, -1].argmax(-1)
                     for b in eval_batches]
    versions = _versions()
    recipe_rows, eval_rows = [], []
    base = evaluate(model, eval_batches, None, reference, dims)
    eval_rows.append(dict(run_id=run_id, recipe_id="none", checkpoint=checkpoint, method="none",
                          benchmark=benchmark, n_failed=0, metric_name="agreement",
                          shard=f"0-{base['n_samples']}", versions=versions, **base))
    for method in config.methods:
        for recipe in method_recipes(method, stats, config.budgets, dims, adapter.family, checkpoint,
                                     config.convention, fitted):
            rid = recipe_id(recipe)
            res = evaluate(model, eval_batches, recipe, reference, dims)
            _log(f"{method:9s} budget {recipe.budget:.2f}: measured FLOPs −{res['flops_reduction']:.3f}, "
                 f"agreement {res['metric']:.3f} ({res['n_samples']} samples)")
            recipe_rows.append(dict(
                recipe_id=rid, checkpoint=checkpoint, family=adapter.family, method=method, scoring=recipe.scoring,
                budget=recipe.budget, flops_convention=config.convention, alpha=recipe.metadata.get("alpha"),
                predicted_reduction=float(recipe.metadata.get("predicted_reduction", recipe.budget)),
                drop_fractions=list(recipe.drop_fractions), recipe_json=recipe.to_json(), run_id=run_id,
            ))
            eval_rows.append(dict(run_id=run_id, recipe_id=rid, checkpoint=checkpoint, method=method,
                                  benchmark=benchmark, n_failed=0, metric_name="agreement",
                                  shard=f"0-{res['n_samples']}", versions=versions, **res))
    store.write_rows("recipes", recipe_rows, root=root, write_id=run_id)
    store.write_rows("evaluations", eval_rows, root=root, write_id=run_id)
    store.write_rows("runs", [dict(run_id=run_id, flow="sweep", parameters=asdict(config), status="completed",
                                   started_at=_ts(started), ended_at=_ts(time.time()), versions=versions)],
                     root=root, write_id=run_id)
    front = catalog.pareto(root, checkpoint=checkpoint, benchmark=benchmark)
    return {"run_id": run_id, "pareto": front, "rows": eval_rows, "checkpoint": checkpoint}


def _ts(t: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, tz=timezone.utc)
