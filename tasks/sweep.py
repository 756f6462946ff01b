"""Prefect tasks: thin wrappers over ``tasks.steps`` (names, retries, tags; no logic here).

Each takes and returns JSON-able values. GPU work (statistics, fitting, evaluation) carries the
tag ``gpu``, so a tag concurrency limit (``prefect concurrency-limit create gpu 1``) lets one such
task run at a time per server. Prefect's own result caching is off (``NO_CACHE``): reuse happens
in the store, keyed by checkpoint fingerprint, sample set and sample, where every run can see it.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import steps

_COMMON = dict(cache_policy=NO_CACHE, log_prints=True)

start_run = task(name="start-run", retries=2, retry_delay_seconds=2, **_COMMON)(steps.start_run)
model_info = task(name="inspect-checkpoint", retries=1, tags=["gpu"], **_COMMON)(steps.model_info)
calibration_set = task(name="sample-calibration-set", retries=2, **_COMMON)(steps.calibration_set)
collect_stats_shard = task(name="collect-statistics-shard", retries=1, retry_delay_seconds=5, tags=["gpu"],
                           task_run_name="statistics {calib[id]} samples {start}-{end}",
                           **_COMMON)(steps.collect_stats_shard)  # collects only samples the store lacks


def _fit_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"fit {','.join(p['methods'])} at {','.join(f'-{b:.0%}' for b in p['budgets'])}"


fit_budgets = task(name="fit-budget-grid", retries=1, tags=["gpu"], task_run_name=_fit_name,
                   **_COMMON)(steps.fit_budgets)  # the search runs the model
evaluate_shard = task(name="evaluate-shard", retries=1, tags=["gpu"],
                      task_run_name="eval {benchmark} {label} samples {start}-{end}",
                      **_COMMON)(steps.evaluate_shard)  # write id per (run, sample set, recipe, shard)
end_run = task(name="end-run", retries=2, retry_delay_seconds=2, **_COMMON)(steps.end_run)
run_summary = task(name="summarise-run", retries=2, **_COMMON)(steps.run_summary)
pareto_rows = task(name="select-pareto-front", retries=2, **_COMMON)(steps.pareto_rows)
# pure, no side effects: not tasks
shard_ranges = steps.shard_ranges
new_run_id = steps.new_run_id
normalize_spec = steps.normalize_spec
describe_model = steps.describe_model
DEFAULT_METHODS, METHODS, SEARCH_SIZES = steps.DEFAULT_METHODS, steps.METHODS, steps.SEARCH_SIZES


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(result: dict, out_dir: str | None = None) -> dict:
    """The Pareto front and every evaluation as a markdown artifact and, with matplotlib, the plot of
    metric vs FLOPs reduction as an image artifact. The image travels inside the artifact as a
    ``data:`` URL, so the Prefect UI shows it wherever the browser runs (a local file path would be a
    broken image there); the PNG is also written under ``out_dir``."""
    import base64

    from prefect.artifacts import create_image_artifact, create_markdown_artifact
    from prefect.logging import get_run_logger

    from tasks.report import markdown_report, plot_front

    logger = get_run_logger()
    key = "fitprune-pareto-" + result["checkpoint"].lower().replace("_", "-")
    create_markdown_artifact(markdown=markdown_report(result), key=key,
                             description=f"Pareto front and evaluations, run {result['run_id']}")
    png = plot_front(result, out_dir) if out_dir else None
    if out_dir and png is None:
        logger.info("matplotlib is not installed: skipping the metric-vs-FLOPs plot (pip install matplotlib)")
    elif png:
        logger.info(f"plot written to {png}")
        url = "data:image/png;base64," + base64.b64encode(open(png, "rb").read()).decode("ascii")
        create_image_artifact(image_url=url, key=key + "-plot",
                              description=f"metric vs measured FLOPs reduction per method, run {result['run_id']}")
    return {"markdown_key": key, "plot": png}
