"""Progress within one shard: the steps report each batch; what a user sees depends on where it runs.

``ShardProgress(what, total)`` is called after each batch with the samples done so far:

* inside a Prefect task run, it keeps a progress artifact of the task run up to date (the UI's
  progress bar on the task run's page) and logs a line at every quarter;
* elsewhere (``fitprune sweep``, which already shows one line per shard), it logs a line only when
  30 s have passed since the last one, so short shards stay quiet and long ones show they move.

Reporting never fails a shard: an API error while updating the artifact is logged once and dropped.
"""

from __future__ import annotations

import sys
import time

__all__ = ["ShardProgress"]

QUIET_S = 30.0


def _task_run_active() -> bool:
    try:
        from prefect.context import TaskRunContext
    except ImportError:
        return False
    return TaskRunContext.get() is not None


class ShardProgress:
    """Callable ``(done, total=None)``; see the module docstring."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, max(1, int(total))
        self.in_prefect = _task_run_active()
        self.artifact = None
        self.last_line = time.monotonic()
        self.quarter = 0
        if self.in_prefect:
            self._artifact(0.0)

    def _artifact(self, percent: float) -> None:
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact is None:
                self.artifact = create_progress_artifact(progress=percent, description=self.what)
            else:
                update_progress_artifact(self.artifact, progress=percent)
        except Exception as err:  # progress is a convenience: never fail the shard for it
            print(f"{self.what}: progress not reported ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
            self.in_prefect = False

    def __call__(self, done: int, total: int | None = None) -> None:
        total = max(1, int(total or self.total))
        percent = min(100.0, 100.0 * done / total)
        line = f"{self.what}: {done}/{total} samples"
        if self.in_prefect:
            self._artifact(percent)
            quarter = int(percent // 25)
            if quarter > self.quarter:
                self.quarter = quarter
                print(line, file=sys.stderr, flush=True)
        elif time.monotonic() - self.last_line >= QUIET_S:
            self.last_line = time.monotonic()
            print(line, file=sys.stderr, flush=True)
