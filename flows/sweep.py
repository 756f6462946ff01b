"""The sweep: calibrate → fit a budget grid per method → evaluate → Pareto front.

``run_sweep`` (what ``fitprune sweep`` runs) executes the steps in-process, no Prefect server
needed; ``flows.sweep_flow`` runs the very same composition (``compose``) with each step as a
Prefect task. The steps themselves are plain functions over plain data in ``tasks.steps``. Every
step reads and writes the store (Parquet + DuckDB); statistics are keyed by checkpoint
fingerprint and calibration id and reused when present.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

from tasks import steps as plain_steps
from tasks.steps import (  # noqa: F401  (re-exported: the sweep's building blocks)
    METHODS,
    calibration_stats,
    evaluate,
    method_recipes,
    recipe_id,
)

BENCHMARK = "demo-agreement"


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
        self.budgets = tuple(self.budgets)
        self.methods = tuple(self.methods)
        if not self.budgets:
            raise ValueError("budgets is empty; pass at least one FLOPs fraction in (0, 1), e.g. [0.3, 0.5]")
        bad = [b for b in self.budgets if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"budgets must lie in (0, 1) (fractions of prefill FLOPs to remove); got {bad}")
        if not self.methods:
            raise ValueError(f"methods is empty; pass one or more of {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        for name in ("n_calib", "n_eval", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compose(config: SweepConfig, spec: dict, steps=plain_steps, benchmark: str = BENCHMARK) -> dict:
    """The sweep wired from ``steps`` (plain functions, or the Prefect tasks of ``tasks.sweep``).

    Only paths, ids, recipe JSON and small dicts pass between steps. Returns
    ``{"run_id", "checkpoint", "rows", "recipes", "pareto_rows"}``.
    """
    spec = plain_steps.normalize_spec(spec)
    run_id = "run-" + uuid.uuid4().hex[:12]
    started = time.time()
    root = config.root
    _log(plain_steps.describe_model(spec))
    info = steps.model_info(spec)
    checkpoint = info["checkpoint"]
    calib = steps.calibration_set(config.n_calib, config.seed, "calib")
    eval_set = steps.calibration_set(config.n_eval, config.seed + 1, "eval")
    _log(f"checkpoint {checkpoint}; calibration {calib['id']}; budgets {list(config.budgets)}; "
         f"methods {list(config.methods)}; {config.n_eval} evaluation samples")
    stats_ref = steps.collect_statistics(spec, calib, checkpoint, config.batch_size, root)
    grid = steps.fit_budgets(info, stats_ref, list(config.budgets), list(config.methods), config.convention, root)

    vers = plain_steps.versions()
    base = steps.evaluate_recipe(spec, info, eval_set, None, config.batch_size)
    eval_rows = [plain_steps.eval_row(base, run_id, "none", checkpoint, "none", benchmark, vers)]
    recipe_rows = []
    for method in config.methods:
        for recipe_json in grid[method]:
            recipe = plain_steps.Recipe.from_dict(json.loads(recipe_json))
            res = steps.evaluate_recipe(spec, info, eval_set, recipe_json, config.batch_size)
            _log(f"{method:9s} budget {recipe.budget:.2f}: measured FLOPs −{res['flops_reduction']:.3f}, "
                 f"agreement {res['metric']:.3f} ({res['n_samples']} samples)")
            row = plain_steps.recipe_row(recipe, method, info["family"], run_id, config.convention)
            recipe_rows.append(row)
            eval_rows.append(plain_steps.eval_row(res, run_id, row["recipe_id"], checkpoint, method, benchmark, vers))
    parameters = {**asdict(config), "model": spec}
    steps.write_results(run_id, recipe_rows, eval_rows, parameters, started, root)
    front = steps.pareto_rows(root, checkpoint, benchmark)
    return {"run_id": run_id, "checkpoint": checkpoint, "rows": eval_rows, "recipes": recipe_rows,
            "pareto_rows": front}


def run_sweep(config: SweepConfig | None = None, spec: dict | None = None, benchmark: str = BENCHMARK) -> dict:
    """Run the whole sweep in-process; returns {"run_id", "checkpoint", "pareto" (Arrow table), "rows", ...}.

    ``spec`` picks the model (``tasks.steps`` docstring); default: the interim demo model.
    """
    from storage import catalog

    config = config or SweepConfig()
    spec = spec or {"kind": "demo", "seed": config.seed}
    result = compose(config, spec, plain_steps, benchmark)
    result["pareto"] = catalog.pareto(config.root, checkpoint=result["checkpoint"], benchmark=benchmark)
    return result


__all__ = ["SweepConfig", "compose", "run_sweep", "calibration_stats", "method_recipes", "evaluate", "recipe_id",
           "BENCHMARK", "METHODS"]
