"""Prefect tasks: thin wrappers over ``tasks.steps`` (names, retries, tags; no logic here).

Each takes and returns JSON-able values. GPU work (statistics, evaluation) carries the tag
``gpu``, so a tag concurrency limit (``prefect concurrency-limit create gpu 1``) lets one such
task run at a time per server. Prefect's own result caching is off (``NO_CACHE``): reuse happens
in the store, keyed by checkpoint fingerprint and calibration id, where every run can see it.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import steps

_COMMON = dict(cache_policy=NO_CACHE, log_prints=True)

model_info = task(name="inspect-checkpoint", retries=1, tags=["gpu"], **_COMMON)(steps.model_info)
calibration_set = task(name="sample-calibration-set", retries=2, **_COMMON)(steps.calibration_set)
collect_statistics = task(name="collect-statistics", retries=1, retry_delay_seconds=5, tags=["gpu"],
                          **_COMMON)(steps.collect_statistics)  # idempotent: fixed write id, reuses the store
collect_stats_shard = task(name="collect-statistics-shard", retries=1, retry_delay_seconds=5, tags=["gpu"],
                           task_run_name="stats-{calib[id]}-{start}-{end}",
                           **_COMMON)(steps.collect_stats_shard)  # skips a shard already in the store
fit_budgets = task(name="fit-budget-grid", retries=1, tags=["gpu"], **_COMMON)(steps.fit_budgets)  # the search runs the model
evaluate_recipe = task(name="evaluate-recipe", retries=1, tags=["gpu"], **_COMMON)(steps.evaluate_recipe)
evaluate_shard = task(name="evaluate-shard", retries=1, tags=["gpu"], task_run_name="eval-{method}-{start}-{end}",
                      **_COMMON)(steps.evaluate_shard)  # write id per (run, recipe, shard)
write_results = task(name="write-results", retries=2, retry_delay_seconds=2, **_COMMON)(steps.write_results)
pareto_rows = task(name="select-pareto-front", retries=2, **_COMMON)(steps.pareto_rows)


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(result: dict, out_dir: str | None = None) -> dict:
    """A markdown table of the Pareto front and, with matplotlib, a PNG of metric vs FLOPs reduction."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger

    from tasks.report import markdown_report, plot_front

    logger = get_run_logger()
    md = markdown_report(result)
    key = "fitprune-pareto-" + result["checkpoint"].lower().replace("_", "-")
    create_markdown_artifact(markdown=md, key=key, description=f"Pareto front, run {result['run_id']}")
    png = plot_front(result, out_dir) if out_dir else None
    if out_dir and png is None:
        logger.info("matplotlib is not installed: skipping the metric-vs-FLOPs plot (pip install matplotlib)")
    elif png:
        logger.info(f"plot written to {png}")
        create_markdown_artifact(markdown=f"![metric vs FLOPs reduction]({png})\n\n`{png}`",
                                 key=key + "-plot", description="metric vs measured FLOPs reduction per method")
    return {"markdown_key": key, "plot": png}
