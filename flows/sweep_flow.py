"""The sweep as a Prefect flow. Deployment name: ``fitprune/sweep`` (flow ``fitprune``, deployment ``sweep``).

Same composition as ``fitprune sweep`` (``flows.sweep.compose``), with each step a task of
``tasks.sweep``; then the Pareto front is published as artifacts. Parameters are validated up
front (``SweepConfig`` and the model spec) so a bad value fails the run before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.checks import check_sweep
from flows.sweep import DEFAULT_METHODS, SweepConfig, compose
from tasks import steps
from tasks import sweep as sweep_tasks


def validate(checkpoint, calib_samples, eval_samples, budgets, methods, batch_size, device, data_root, seed,
             convention="full", shard_size=64, source="easy-vqa:train", benchmarks=None,
             search="auto") -> tuple[SweepConfig, dict]:
    """(config, model spec) from the flow's parameters; ValueError saying what is wrong otherwise."""
    config = SweepConfig(budgets=tuple(budgets), methods=tuple(methods), n_calib=calib_samples, n_eval=eval_samples,
                         batch_size=batch_size, seed=seed, root=data_root, convention=convention, shard_size=shard_size,
                         source=source, benchmarks=None if benchmarks is None else tuple(benchmarks), search=search)
    spec = dict(checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if isinstance(spec, dict) and device and "device" not in spec:
        spec["device"] = device
    elif isinstance(spec, str):
        spec = {"kind": "path", "path": spec, "device": device}
    check_sweep(config, spec)  # device, model vs sources, weight files, data root: before any model loads
    return config, steps.normalize_spec(spec)


@flow(name="fitprune", log_prints=True, validate_parameters=True)
def sweep(
    checkpoint: dict[str, Any] | str = {"kind": "demo"},  # noqa: B006 (shown as the UI default)
    calib_samples: int = 16,
    eval_samples: int = 40,
    budgets: list[float] = [0.5, 0.7],  # noqa: B006
    methods: list[str] = list(DEFAULT_METHODS),  # noqa: B006
    batch_size: int = 8,
    device: str = "cpu",
    data_root: str | None = None,
    seed: int = 0,
    shard_size: int = 64,
    source: str = "easy-vqa:train",
    benchmarks: list[str] | None = None,
    search: str = "auto",
) -> dict:
    """Calibrate → fit a budget grid per method → evaluate each recipe → Pareto front → artifacts.

    ``checkpoint``: a model spec (``tasks.models``): ``{"kind": "demo"}``, ``{"kind": "toy", "seed": 0}``
    or ``{"kind": "path", "path": DIR}`` (a bare string is a path). ``source``: calibration samples;
    ``benchmarks``: evaluation sources (``tasks.sources``; default easy-vqa:test + synthetic:test). ``data_root``: default ``$FITPRUNE_DATA``, else ``~/.cache/fitprune``.
    ``shard_size``: samples per statistics/evaluation shard; each shard is its own task run, and
    statistics shards already in the store are skipped. Returns the run id, checkpoint
    fingerprint, the run's summary rows and the Pareto rows, and logs both tables last.
    """
    from storage.root import data_root as resolve_root

    config, spec = validate(checkpoint, calib_samples, eval_samples, budgets, methods, batch_size, device,
                            data_root, seed, shard_size=shard_size, source=source, benchmarks=benchmarks,
                            search=search)
    config.root = str(resolve_root(config.root))  # resolved once, here, so every task writes the same place
    logger = get_run_logger()
    logger.info(f"model {spec}; data root {config.root}")
    result = compose(config, spec, sweep_tasks, flow="fitprune/sweep")
    sweep_tasks.publish_artifacts(result, str(Path(config.root) / "reports"))
    from tasks.report import pareto_text, summary_text

    logger.info(f"run {result['run_id']} on {result['checkpoint']}:\n{summary_text(result)}\n\nPareto front:\n"
                f"{pareto_text(result)}")  # the last lines `prefect deployment run --watch` shows
    return {"run_id": result["run_id"], "checkpoint": result["checkpoint"], "summary": result["summary"],
            "pareto_rows": result["pareto_rows"]}


if __name__ == "__main__":
    sweep()
