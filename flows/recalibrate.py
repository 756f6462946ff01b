"""Re-calibration: run the sweep for every checkpoint in a watched directory that has no recipes yet.

Deployment ``fitprune-recalibrate/recalibrate`` (prefect.yaml): on a daily cron schedule, and on a
custom ``fitprune.checkpoint.created`` event. A checkpoint is a subdirectory holding
``config.json`` and weights; it is keyed by ``fitprune.fingerprint.fingerprint(path)``.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.sweep import DEFAULT_METHODS
from flows.sweep_flow import sweep


WATCH_ENV = "FITPRUNE_WATCH_DIR"


def watch_dir_for(watch_dir: str | None, data_root: str | None) -> str:
    """``watch_dir``, else ``$FITPRUNE_WATCH_DIR``, else ``<data root>/checkpoints``."""
    from storage.root import data_root as resolve_root

    return str(watch_dir or os.environ.get(WATCH_ENV) or resolve_root(data_root) / "checkpoints")


def find_checkpoints(watch_dir: str) -> list[str]:
    """Subdirectories of ``watch_dir`` (sorted) that hold a ``config.json``."""
    root = Path(watch_dir)
    if not root.is_dir():
        raise ValueError(f"watch_dir {watch_dir!r} is not a directory; pass the folder new checkpoints land in")
    return [str(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "config.json").is_file()]


_SWEPT = """
SELECT DISTINCT recipes.checkpoint
FROM recipes JOIN runs_latest USING (run_id)
WHERE runs_latest.status = 'completed'
"""


def checkpoints_without_recipes(paths: list[str], data_root: str | None) -> list[dict]:
    """``[{"path", "checkpoint"}]`` for the paths whose fingerprint has no recipes from a completed run
    (a failed or killed sweep does not count: its checkpoint is swept again)."""
    from fitprune.fingerprint import fingerprint
    from storage import catalog

    known = set(catalog.query(_SWEPT, root=data_root).column("checkpoint").to_pylist())
    out = []
    for path in paths:
        try:
            fp = fingerprint(path)
        except (OSError, ValueError) as err:  # unreadable: reported by recalibrate, the scan goes on
            out.append({"path": path, "checkpoint": None, "error": f"{type(err).__name__}: {err}"})
            continue
        if fp not in known:
            out.append({"path": path, "checkpoint": fp})
    return out


@task(name="scan-checkpoints", retries=2, cache_policy=NO_CACHE)
def scan(watch_dir: str, data_root: str | None) -> list[dict]:
    return checkpoints_without_recipes(find_checkpoints(watch_dir), data_root)


@flow(name="fitprune-recalibrate", log_prints=True)
def recalibrate(
    watch_dir: str | None = None,
    calib_samples: int = 16,
    eval_samples: int = 40,
    budgets: list[float] = [0.5, 0.7],  # noqa: B006
    methods: list[str] = list(DEFAULT_METHODS),  # noqa: B006
    batch_size: int = 8,
    device: str = "cpu",
    data_root: str | None = None,
    source: str = "easy-vqa:train",
    benchmarks: list[str] | None = None,
) -> list[dict]:
    """Sweep (as a subflow) each checkpoint under ``watch_dir`` whose fingerprint has no recipes.

    ``watch_dir``: default ``$FITPRUNE_WATCH_DIR``, else ``<data root>/checkpoints`` (created if
    missing). Question sources need checkpoints saved with their processor; ``source="toy"`` needs
    none. A checkpoint that cannot be read or swept is logged with its reason and the others are
    still swept; the run then fails, naming every checkpoint that failed.
    """
    logger = get_run_logger()
    default = watch_dir is None and not os.environ.get(WATCH_ENV)
    watch_dir = watch_dir_for(watch_dir, data_root)
    if default:
        Path(watch_dir).mkdir(parents=True, exist_ok=True)
    todo = scan(watch_dir, data_root)
    logger.info(f"{len(todo)} checkpoint(s) under {watch_dir} without recipes")
    done, failed = [], []
    for item in todo:
        error = item.get("error")
        if error is None:
            state = sweep(checkpoint={"kind": "path", "path": item["path"]}, calib_samples=calib_samples,
                          eval_samples=eval_samples, budgets=budgets, methods=methods, batch_size=batch_size,
                          device=device, data_root=data_root, source=source, benchmarks=benchmarks,
                          return_state=True)
            try:
                result = state.result()
            except Exception as err:  # the sweep's failure, as its subflow run recorded it
                error = f"{type(err).__name__}: {err}"
            else:
                done.append({"path": item["path"], "checkpoint": result["checkpoint"], "run_id": result["run_id"]})
        if error is not None:
            logger.error(f"checkpoint {item['path']}: {error}")
            failed.append(f"{item['path']} ({error})")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} checkpoint(s) failed, {len(done)} swept: "
                           + "; ".join(failed))
    return done
