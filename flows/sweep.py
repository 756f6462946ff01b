"""The sweep: calibrate → fit a budget grid per method → evaluate → Pareto front.

``run_sweep`` (what ``fitprune sweep`` runs) executes the steps in-process, no Prefect server
needed; ``flows.sweep_flow`` runs the very same composition (``compose``) with each step as a
Prefect task. The steps themselves are plain functions over plain data in ``tasks.steps``. Every
step reads and writes the store (Parquet + DuckDB); statistics are keyed by checkpoint
fingerprint and calibration id and written per shard of samples, so a re-run reuses what is
there and collects only the missing shards.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

from tasks import steps as plain_steps
from tasks.steps import (  # noqa: F401  (re-exported: the sweep's building blocks)
    DEFAULT_METHODS,
    METHODS,
    SEARCH_SIZES,
    calibration_stats,
    evaluate,
    method_recipes,
    recipe_id,
)

DEFAULT_BENCHMARKS = ("easy-vqa:test", "synthetic:test")


@dataclass
class SweepConfig:
    """What a sweep runs. ``source``: calibration samples; ``benchmarks``: evaluation sources (default:
    easy-VQA test + synthetic test for question sources, the calibration source's own "eval" split for
    input sources); ``n_eval`` samples each. Sources: ``tasks.sources``. ``search``: how wide the
    ``fitprune`` method's divergence search is (``small``, ``full``; ``auto``: small on a CPU, full on
    a GPU; ``tasks.steps.search_config``)."""

    budgets: tuple[float, ...] = (0.5, 0.7)
    methods: tuple[str, ...] = DEFAULT_METHODS
    n_calib: int = 16
    n_eval: int = 40
    batch_size: int = 8
    seed: int = 0
    root: str | None = None
    shard_size: int = 64
    source: str = "easy-vqa:train"
    benchmarks: tuple[str, ...] | None = None
    convention: str = "full"
    max_new_tokens: int = 6
    search: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        from tasks import sources

        self.budgets = tuple(self.budgets)
        self.methods = tuple(self.methods)
        sources.parse(self.source)  # raises on an unknown source
        if self.benchmarks is None:
            self.benchmarks = DEFAULT_BENCHMARKS if sources.is_question_source(self.source) else (self.source,)
        self.benchmarks = tuple(str(sources.parse(b)) for b in self.benchmarks)
        if not self.benchmarks:
            raise ValueError("benchmarks is empty; pass one or more evaluation sources, e.g. easy-vqa:test")
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
        if self.search not in SEARCH_SIZES:
            raise ValueError(f"search = {self.search!r}; known: {', '.join(SEARCH_SIZES)}")
        for name in ("n_calib", "n_eval", "batch_size", "shard_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_calib < 4:
            raise ValueError(f"n_calib = {self.n_calib}: every recipe's divergence is measured on a search and a "
                             "held-out part of the calibration set, so it needs at least 4 samples (2 + 2)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Progress of a long step on stderr: a tqdm bar on a terminal (if tqdm is installed), else one
    line per unit. ``note`` prints a line either way (through the bar, so it is not broken)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.done, self.enabled, self.bar = total, desc, 0, enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="shard", leave=True)

    def update(self, detail: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(detail)
        elif self.enabled:
            _log(f"{self.desc}: {self.done}/{self.total} {detail}".rstrip())

    def note(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            _log(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_all(task, calls: list[dict]):
    """Run ``task`` once per kwargs dict; yields results in order. Prefect tasks are submitted all at
    once (separate task runs a task runner may spread), plain functions run one after another."""
    if hasattr(task, "submit"):
        futures = [task.submit(**kw) for kw in calls]
        for future in futures:
            yield future.result()
    else:
        for kw in calls:
            yield task(**kw)


def default_spec(config: SweepConfig) -> dict:
    """The model a sweep runs when none is named: the toy model for toy inputs, else the demo model."""
    from tasks import sources

    return {"kind": "toy", "seed": config.seed} if sources.parse(config.source).kind == "toy" else {"kind": "demo"}


def _stderr(metric: float, n: int) -> float:
    return (metric * (1 - metric) / n) ** 0.5 if n > 1 and 0 <= metric <= 1 else float("nan")


def compose(config: SweepConfig, spec: dict, steps=plain_steps, progress: bool = False) -> dict:
    """The sweep wired from ``steps`` (plain functions, or the Prefect tasks of ``tasks.sweep``).

    Statistics and evaluation run per shard of ``config.shard_size`` samples; statistics shards
    already in the store are skipped (an interrupted sweep resumes), evaluation shards write one
    row each (plus per-sample predictions for question benchmarks). Every method is evaluated at
    every budget on every benchmark, and the unpruned model once per benchmark. Only paths, ids,
    recipe JSON and small dicts pass between steps. ``progress``: a line (or bar) per shard on
    stderr. Returns ``{"run_id", "checkpoint", "rows", "summary", "recipes", "pareto_rows"}``
    (``rows``: one per recipe, benchmark and shard; ``summary``: one per recipe and benchmark).
    """
    spec = plain_steps.normalize_spec(spec)
    run_id = "run-" + uuid.uuid4().hex[:12]
    started = time.time()
    root = config.root
    _log(plain_steps.describe_model(spec))
    info = steps.model_info(spec)
    checkpoint = info["checkpoint"]
    calib = steps.calibration_set(config.n_calib, config.seed, "calib", config.source, root)
    eval_sets = {b: steps.calibration_set(config.n_eval, config.seed + 1, "eval", b, root) for b in config.benchmarks}
    _log(f"checkpoint {checkpoint}; calibration: {config.n_calib} samples of {config.source} ({calib['id']}); "
         f"budgets {list(config.budgets)}; methods {list(config.methods)} + unpruned; evaluation: "
         f"{config.n_eval} samples each of {', '.join(config.benchmarks)}; shards of {config.shard_size}")

    shards = plain_steps.shard_ranges(calib["n"], config.shard_size)
    bar = Progress(len(shards), "statistics", progress)
    reused = True
    for done in _run_all(steps.collect_stats_shard, [
            dict(spec=spec, calib=calib, checkpoint=checkpoint, start=s, end=e, batch_size=config.batch_size,
                 root=root) for s, e in shards]):
        reused &= done["reused"]
        bar.update(f"samples {done['start']}-{done['end']} " + ("reused" if done["reused"] else f"{done['seconds']:.1f}s"))
    bar.close()
    if reused:
        _log(f"statistics: reusing {checkpoint}/{calib['id']} from the store")
    stats_ref = {"checkpoint": checkpoint, "calib_id": calib["id"], "n": calib["n"], "reused": reused}
    grid = steps.fit_budgets(info, stats_ref, list(config.budgets), list(config.methods), config.convention, root,
                             spec=spec, calib=calib, batch_size=config.batch_size, search=config.search)

    jobs = [("none", None)] + [(m, rj) for m in config.methods for rj in grid[m]]
    calls, keys = [], []
    for benchmark, eval_set in eval_sets.items():
        for m, rj in jobs:
            for s, e in plain_steps.shard_ranges(eval_set["n"], config.shard_size):
                calls.append(dict(spec=spec, info=info, eval_set=eval_set, recipe_json=rj, start=s, end=e,
                                  batch_size=config.batch_size, run_id=run_id, method=m, benchmark=benchmark,
                                  root=root, max_new_tokens=config.max_new_tokens))
                keys.append((benchmark, m, rj))
    bar = Progress(len(calls), "evaluation", progress)
    grouped: dict[tuple, list[dict]] = {}
    for key, row in zip(keys, _run_all(steps.evaluate_shard, calls)):
        grouped.setdefault(key, []).append(row)
        bar.update(f"{key[0]} {key[1]} shard {row['shard']}")
    eval_rows, summary, recipe_rows = [], [], {}
    for (benchmark, method, recipe_json), shard_rows in grouped.items():
        eval_rows += shard_rows
        res = plain_steps.combine_shards(shard_rows)
        budget = None
        if recipe_json is not None:
            recipe = plain_steps.Recipe.from_dict(json.loads(recipe_json))
            budget = recipe.budget
            recipe_rows.setdefault(recipe_json, plain_steps.recipe_row(recipe, method, info["family"], run_id,
                                                                       config.convention))
        n_scored = res["n_samples"] - res["n_failed"]
        summary.append({"benchmark": benchmark, "method": method, "budget": budget,
                        "flops_reduction": res["flops_reduction"], "metric_name": res["metric_name"],
                        "metric": res["metric"], "stderr": _stderr(res["metric"], n_scored),
                        "n_samples": res["n_samples"], "n_failed": res["n_failed"], "wall_s": res["wall_s"]})
        label = "unpruned" if budget is None else f"budget {budget:.2f}"
        failed = f", {res['n_failed']} failed" if res["n_failed"] else ""
        bar.note(f"{benchmark:16s} {method:9s} {label:12s}: measured FLOPs −{res['flops_reduction']:.3f}, "
                 f"{res['metric_name']} {res['metric']:.3f} ± {summary[-1]['stderr']:.3f} ({n_scored} samples{failed})")
    bar.close()
    parameters = {**asdict(config), "model": spec}
    steps.write_results(run_id, list(recipe_rows.values()), [], parameters, started, root)
    front = steps.pareto_rows(root, checkpoint, None)
    return {"run_id": run_id, "checkpoint": checkpoint, "rows": eval_rows, "summary": summary,
            "recipes": list(recipe_rows.values()), "pareto_rows": front, "config": parameters}


def run_sweep(config: SweepConfig | None = None, spec: dict | None = None, progress: bool = False) -> dict:
    """Run the whole sweep in-process; returns {"run_id", "checkpoint", "pareto" (Arrow table), "rows", ...}.

    ``spec`` picks the model (``tasks.models``); default: the demo model (the toy model for toy inputs).
    """
    from storage import catalog

    config = config or SweepConfig()
    spec = spec or default_spec(config)
    result = compose(config, spec, plain_steps, progress=progress)
    result["pareto"] = catalog.pareto(config.root, checkpoint=result["checkpoint"])
    return result


__all__ = ["DEFAULT_BENCHMARKS", "DEFAULT_METHODS", "METHODS", "SweepConfig", "calibration_stats", "compose", "default_spec", "evaluate",
           "method_recipes", "recipe_id", "run_sweep"]
