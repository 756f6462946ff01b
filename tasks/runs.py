"""A run's life cycle in the store, and what it produced, read back through the catalog's views.

``start_run`` writes the run's start row (``running``) before any work; ``end_run`` its end row
(``completed``, ``failed`` with the error, or ``interrupted``). A run killed outright keeps only
its start row, so it never counts as completed. The views (``storage/sql``) count completed runs
only: ``evaluation_summary`` and ``pareto`` show, per recipe and sample set, the latest completed
run; ``run_evaluations`` shows every run's work with the run's status. ``run_summary`` and
``pareto_rows`` read those views: the CLI, the artifacts and SQL users all read one aggregation.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from storage import catalog, store

__all__ = ["END_STATES", "end_run", "new_run_id", "pareto_rows", "run_summary", "start_run", "versions"]

END_STATES = ("completed", "failed", "interrupted")


def versions() -> dict:
    import torch
    import transformers

    import fitprune

    return {"fitprune": fitprune.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def new_run_id() -> str:
    return "run-" + uuid.uuid4().hex[:12]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def start_run(run_id: str, flow: str, parameters: dict, root) -> str:
    """Write the run's start row (status ``running``); returns its start time (ISO, UTC)."""
    started = _now()
    store.write_rows("runs", [dict(run_id=run_id, flow=flow, parameters=parameters, status="running",
                                   started_at=started, ended_at=None, versions=versions())],
                     root=root, write_id=f"{run_id}-start")
    return started.isoformat()


def end_run(run_id: str, flow: str, parameters: dict, started_at: str, status: str, root,
            error: str | None = None) -> None:
    """Write the run's end row: ``completed``, or ``failed`` / ``interrupted`` with ``error``."""
    if status not in END_STATES:
        raise ValueError(f"a run ends as one of {', '.join(END_STATES)}, not {status!r}")
    store.write_rows("runs", [dict(run_id=run_id, flow=flow, parameters=parameters, status=status,
                                   started_at=datetime.fromisoformat(started_at), ended_at=_now(),
                                   versions=versions(), error=error)],
                     root=root, write_id=f"{run_id}-end")


def _plain(row: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in row.items()}


_RUN_SQL = """
SELECT * FROM run_evaluations
WHERE run_id = $run_id
ORDER BY benchmark, eval_set, coalesce(budget, 0), method, recipe_id
"""


def run_summary(run_id: str, root) -> list[dict]:
    """One row per (benchmark, sample set, recipe) the run evaluated, from the ``run_evaluations`` view."""
    return [_plain(r) for r in catalog.query(_RUN_SQL, {"run_id": run_id}, root=root).to_pylist()]


def pareto_rows(root, checkpoint: str | None, benchmark: str | None = None) -> list[dict]:
    """The Pareto front from the DuckDB catalog as plain rows (timestamps as text)."""
    return [_plain(r) for r in catalog.pareto(root, checkpoint=checkpoint, benchmark=benchmark).to_pylist()]
