"""The sweep's steps, in the order a sweep runs them: one namespace for ``flows.sweep.compose``.

Each step is a plain function over plain data in a module of its own; ``tasks.sweep`` wraps the
same names as Prefect tasks, so ``compose(config, spec, steps)`` runs in-process with this module
and as a flow with that one. Each step reads its inputs from the store, does one thing and writes
its record there; only ids, paths and small dicts pass between steps, never models or tensors.

=====================  =====================================  ===========================
step                   does                                   writes
=====================  =====================================  ===========================
``start_run``          opens the run                          ``runs`` (running)
``model_info``         fingerprints the checkpoint            —
``calibration_set``    describes and hashes a sample set      ``calibration_sets``
``collect_stats_shard``  statistics of missing samples        ``stats_layer``, ``stats_token``
``fit_budgets``        fits every method's budget grid        ``recipes``
``evaluate_shard``     evaluates one recipe on one shard      ``predictions``, ``evaluations``
``end_run``            closes the run                         ``runs`` (completed/failed/…)
``run_summary``        the run's results (SQL view)           —
``pareto_rows``        the Pareto front (SQL view)            —
=====================  =====================================  ===========================
"""

from __future__ import annotations

from .evaluation import evaluate_shard
from .models import describe_model, model_info, normalize_spec
from .recipes import DEFAULT_METHODS, METHODS, SEARCH_SIZES, fit_budgets
from .runs import end_run, new_run_id, pareto_rows, run_summary, start_run
from .samples import calibration_set, shard_ranges
from .statistics import collect_stats_shard

__all__ = [
    "DEFAULT_METHODS", "METHODS", "SEARCH_SIZES", "calibration_set", "collect_stats_shard", "describe_model",
    "end_run", "evaluate_shard", "fit_budgets", "model_info", "new_run_id", "normalize_spec", "pareto_rows",
    "run_summary", "shard_ranges", "start_run",
]
