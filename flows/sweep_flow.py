"""The sweep as a Prefect flow. Deployment name: ``fitprune/sweep`` (flow ``fitprune``, deployment ``sweep``).

Same composition as ``fitprune sweep`` (``flows.sweep.compose``), with each step a task of
``tasks.sweep``; then the Pareto front is published as artifacts. The one parameter, ``config``, is a
``flows.config.SweepConfig``: Prefect validates it when the run starts, and ``check_sweep`` checks
the device, model and data root, so a bad value fails the run before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from prefect import flow, get_run_logger

from flows.checks import check_sweep
from flows.config import SweepConfig
from flows.fanout import compose_on
from tasks import sweep as sweep_tasks


@flow(name="fitprune", log_prints=True, validate_parameters=True)
def sweep(config: SweepConfig = SweepConfig()) -> dict:  # noqa: B008 (the UI shows the default)
    """Calibrate → fit a budget grid per method → evaluate each recipe → Pareto front → artifacts.

    ``config``: every setting of the sweep (``flows.config.SweepConfig``, the same model ``fitprune
    sweep``'s options come from): the model (``{"kind": "demo"}``, ``{"kind": "toy"}`` or
    ``{"kind": "path", "path": DIR}``), device, budgets, methods, sample counts, sources, data root.
    Returns the run id, checkpoint fingerprint, the run's summary rows and the Pareto rows, and logs
    both tables last (what ``prefect deployment run --watch`` shows); a failed run logs its reason.
    """
    from storage.root import data_root as resolve_root
    from tasks.report import pareto_text, summary_text

    logger = get_run_logger()
    # resolved once, here, so every task writes the same place and runs the same counts
    config = config.model_copy(update={"data_root": str(resolve_root(config.data_root))}).resolved()
    check_sweep(config)  # device, model vs sources, weight files, data root: before any model loads
    logger.info(f"model {config.spec()}; data root {config.data_root}")
    try:
        result = compose_on(config, sweep_tasks, flow="fitprune/sweep")  # config.cluster: on Dask workers
    except Exception as err:
        logger.error(f"sweep failed: {type(err).__name__}: {err}")  # the last line --watch users see
        raise
    sweep_tasks.publish_artifacts(result, str(Path(config.data_root) / "reports"))
    logger.info(f"run {result['run_id']} on {result['checkpoint']}:\n{summary_text(result)}\n\nPareto front:\n"
                f"{pareto_text(result)}")
    return {"run_id": result["run_id"], "checkpoint": result["checkpoint"], "summary": result["summary"],
            "pareto_rows": result["pareto_rows"]}


if __name__ == "__main__":
    sweep()
