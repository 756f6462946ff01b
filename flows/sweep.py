"""The sweep: open a run → calibrate → fit a budget grid per method → evaluate → close the run → report.

``run_sweep`` (what ``fitprune sweep`` runs) executes the steps in-process, no Prefect server
needed; ``flows.sweep_flow`` runs the very same composition (``compose``) with each step as a
Prefect task. The steps are plain functions in ``tasks`` (``tasks.steps`` lists them); each reads
and writes the store (Parquet + DuckDB). Statistics are keyed by checkpoint fingerprint,
calibration set and sample, so a re-run with any shard size collects only missing samples.
``compose`` only wires steps: what a run produced is read back from the catalog's views.
"""

from __future__ import annotations

import sys

from flows.config import DEFAULT_BENCHMARKS, SweepConfig
from tasks import steps as plain_steps
from tasks.recipes import check_methods
from tasks.steps import DEFAULT_METHODS, METHODS


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


def _calls(config: SweepConfig, spec: dict, info: dict, run_id: str, eval_sets: dict, grid: dict) -> list[dict]:
    """One ``evaluate_shard`` call per (benchmark, recipe, shard); the unpruned model first."""
    # (recipe id, what task run names and progress lines call it)
    labels = [("none", "unpruned")] + [(rid, f"{m} -{b:.0%}") for m in config.methods
                                       for b, rid in zip(config.budgets, grid[m])]
    return [dict(spec=spec, info=info, eval_set=eval_set, recipe_id=rid, start=s, end=e, batch_size=config.batch_size,
                 run_id=run_id, benchmark=benchmark, root=config.data_root, max_new_tokens=config.max_new_tokens,
                 label=label)
            for benchmark, eval_set in eval_sets.items() for rid, label in labels
            for s, e in plain_steps.shard_ranges(eval_set["n"], config.shard_size)]


def compose(config: SweepConfig, steps=plain_steps, progress: bool = False, flow: str = "sweep") -> dict:
    """The sweep wired from ``steps`` (``tasks.steps``, or the Prefect tasks of ``tasks.sweep``).

    A start row in ``runs`` first, an end row last: ``completed``, or ``failed`` / ``interrupted``
    (with the error) when a step raises or the run is stopped (Ctrl-C, SIGTERM); the error is
    re-raised. Statistics and evaluation run per shard of ``config.shard_size`` samples; recipes
    are written when fitted and passed on by id. ``progress``: a line (or bar) per shard on
    stderr. Returns ``{"run_id", "checkpoint", "summary", "pareto_rows", "config"}``: ``summary``
    is the run's rows of the ``run_evaluations`` view (one per benchmark and recipe), ``pareto_rows``
    the checkpoint's front (``pareto`` view); plain data only.
    """
    config = config.resolved()
    spec = steps.normalize_spec(config.spec())
    root = config.data_root
    run_id = steps.new_run_id()
    parameters = config.record()
    started = steps.start_run(run_id, flow, parameters, root)
    try:
        _log(steps.describe_model(spec))
        info = steps.model_info(spec, root)
        check_methods(config.methods, info["family"])  # before any statistics: a method the model cannot run
        checkpoint = info["checkpoint"]
        calib = steps.calibration_set(config.calib_samples, config.seed, "calib", config.source, root)
        eval_sets = {b: steps.calibration_set(config.eval_samples, config.seed + 1, "eval", b, root) for b in config.benchmarks}
        _log(f"run {run_id}; checkpoint {checkpoint}; calibration: {config.calib_samples} samples of {config.source} "
             f"({calib['id']}); budgets {list(config.budgets)}; methods {list(config.methods)} + unpruned; evaluation: "
             f"{config.eval_samples} samples each of {', '.join(config.benchmarks)}; shards of {config.shard_size}")

        shards = steps.shard_ranges(calib["n"], config.shard_size)
        bar, collected = Progress(len(shards), "statistics", progress), 0
        for done in _run_all(steps.collect_stats_shard, [
                dict(spec=spec, calib=calib, checkpoint=checkpoint, start=s, end=e, batch_size=config.batch_size,
                     root=root) for s, e in shards]):
            collected += done["collected"]
            bar.update(f"samples {done['start']}-{done['end']} " +
                       ("reused" if done["reused"] else f"{done['collected']} collected, {done['seconds']:.1f}s"))
        bar.close()
        if not collected:
            _log(f"statistics: reusing {checkpoint}/{calib['id']} from the store")
        stats_ref = {"checkpoint": checkpoint, "calib_id": calib["id"]}
        grid = steps.fit_budgets(info, stats_ref, list(config.budgets), list(config.methods), config.convention, root,
                                 spec=spec, calib=calib, batch_size=config.batch_size, search=config.search,
                                 run_id=run_id)

        calls = _calls(config, spec, info, run_id, eval_sets, grid)
        bar = Progress(len(calls), "evaluation", progress)
        for call, row in zip(calls, _run_all(steps.evaluate_shard, calls)):
            bar.update(f"{call['benchmark']} {row['method']} shard {row['shard']}: {row['metric_name']} "
                       f"{row['metric']:.3f}, FLOPs −{row['flops_reduction']:.3f}")
        bar.close()
    except BaseException as err:
        status = "failed" if isinstance(err, Exception) else "interrupted"
        try:
            steps.end_run(run_id, flow, parameters, started, status, root, error=f"{type(err).__name__}: {err}"[:2000])
        except Exception as also:  # keep the run's own error, which says what went wrong
            _log(f"run {run_id}: could not record its end ({type(also).__name__}: {also})")
        raise
    steps.end_run(run_id, flow, parameters, started, "completed", root)
    return {"run_id": run_id, "checkpoint": checkpoint, "summary": steps.run_summary(run_id, root),
            "pareto_rows": steps.pareto_rows(root, checkpoint), "config": parameters}


def run_sweep(config: SweepConfig | None = None, progress: bool = False) -> dict:
    """Run the whole sweep in-process; returns ``compose``'s result (the run's summary and Pareto rows).
    ``config.model`` picks the model; default: the demo model (the toy model for toy inputs)."""
    from flows.fanout import compose_on

    return compose_on(config or SweepConfig(), plain_steps, progress=progress)


__all__ = ["DEFAULT_BENCHMARKS", "DEFAULT_METHODS", "METHODS", "Progress", "SweepConfig", "compose", "run_sweep"]
