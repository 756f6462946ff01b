"""Re-calibration: sweep new checkpoints, on a schedule or when an event names one.

Deployment ``fitprune-recalibrate/recalibrate`` (``prefect.yaml``): daily at 03:00 UTC, and on the
event ``fitprune.checkpoint.created``. Its parameters come from ``prefect.yaml``: ``config`` (a
``flows.config.SweepConfig``, the template of every sweep: sizes, data root, methods, budgets) and
``watch_dir``; the trigger adds what the event names:

* ``checkpoint``: the event's ``payload.path`` (a checkpoint directory, absolute or under the watch dir);
* ``resource_id``: the event's resource id; ``fitprune.checkpoint.<name>`` names ``<watch dir>/<name>``.

An event naming a checkpoint sweeps that one; a run naming none (the schedule, an event without a
name) scans the watch dir. A checkpoint is a directory holding ``config.json`` and weights, keyed by
``fitprune.fingerprint.fingerprint(path)``; one whose fingerprint has recipes from a completed run is
skipped. Each sweep runs under a Prefect global concurrency limit of 1 keyed by the fingerprint
(``flows.guard``), and the store is checked again once it holds the slot, so two quick events sweep
a checkpoint once. A checkpoint that cannot be read or swept gets a ``failed`` row in ``runs`` with
its reason, the others are still swept, and the run then fails naming each.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger

from flows.config import PathModel, SweepConfig
from flows.guard import checkpoint_guard
from flows.sweep_flow import sweep

WATCH_ENV = "FITPRUNE_WATCH_DIR"
RESOURCE_PREFIX = "fitprune.checkpoint."
FLOW = "fitprune-recalibrate"


def watch_dir_for(watch_dir: str | None, data_root: str | None) -> str:
    """``watch_dir``, else ``$FITPRUNE_WATCH_DIR``, else ``<data root>/checkpoints``."""
    from storage.root import data_root as resolve_root

    return str(watch_dir or os.environ.get(WATCH_ENV) or resolve_root(data_root) / "checkpoints")


def find_checkpoints(watch_dir: str) -> list[str]:
    """Subdirectories of ``watch_dir`` (sorted) that hold a ``config.json``; hidden ones (``.name``, such as
    ``fitprune export-checkpoint``'s staging directory while it writes) are not checkpoints yet."""
    root = Path(watch_dir)
    if not root.is_dir():
        raise ValueError(f"watch_dir {watch_dir!r} is not a directory; pass the folder new checkpoints land in")
    return [str(p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()]


def named_checkpoint(watch_dir: str, checkpoint: str | None, resource_id: str | None) -> str | None:
    """The directory an event names (module docstring), or None when it names none. Template text that
    rendered empty (an event without a payload path) counts as not given."""
    checkpoint = (checkpoint or "").strip()
    if checkpoint:
        path = Path(checkpoint)
        return str(path if path.is_absolute() else Path(watch_dir) / path)
    resource_id = (resource_id or "").strip()
    name = resource_id[len(RESOURCE_PREFIX):] if resource_id.startswith(RESOURCE_PREFIX) else ""
    if name and "/" not in name and name not in (".", ".."):
        return str(Path(watch_dir) / name)
    return None


_SWEPT = """
SELECT DISTINCT recipes.checkpoint
FROM recipes JOIN runs_latest USING (run_id)
WHERE runs_latest.status = 'completed'
"""


def swept_checkpoints(data_root: str | None) -> set[str]:
    """Fingerprints with recipes from a completed run (a failed or killed sweep does not count)."""
    from storage import catalog

    return set(catalog.query(_SWEPT, root=data_root).column("checkpoint").to_pylist())


def checkpoints_without_recipes(paths: list[str], data_root: str | None) -> list[dict]:
    """``[{"path", "checkpoint"}]`` for the paths whose fingerprint has no recipes from a completed run;
    an unreadable path gets ``{"path", "checkpoint": None, "error"}`` (reported, the scan goes on)."""
    from fitprune.fingerprint import fingerprint

    known = swept_checkpoints(data_root)
    out = []
    for path in paths:
        try:
            if not (Path(path) / "config.json").is_file():
                raise ValueError(f"{path} is not a checkpoint directory (no config.json)")
            fp = fingerprint(path)
        except (OSError, ValueError) as err:
            out.append({"path": path, "checkpoint": None, "error": f"{type(err).__name__}: {err}"})
            continue
        if fp not in known:
            out.append({"path": path, "checkpoint": fp})
    return out


def _record_failure(path: str, error: str, config: SweepConfig) -> None:
    """A ``failed`` row in ``runs`` for a checkpoint that could not be swept (queryable with SQL)."""
    from tasks import steps

    run_id, parameters = steps.new_run_id(), {"checkpoint_path": path, "config": config.model_dump(mode="json")}
    started = steps.start_run(run_id, FLOW, parameters, config.data_root)
    steps.end_run(run_id, FLOW, parameters, started, "failed", config.data_root, error=error[:2000])


def _sweep_one(item: dict, config: SweepConfig, logger) -> dict | None:
    """Sweep one checkpoint under its fingerprint's guard; None when another run swept it meanwhile."""
    dtype = getattr(config.model, "dtype", None)
    model = PathModel(path=item["path"], **({"dtype": dtype} if dtype else {}))
    with checkpoint_guard(item["checkpoint"]):
        if item["checkpoint"] in swept_checkpoints(config.data_root):
            logger.info(f"checkpoint {item['path']} ({item['checkpoint']}) was swept by another run meanwhile")
            return None
        state = sweep(config=config.model_copy(update={"model": model}), return_state=True)
        result = state.result()  # raises the sweep's failure, as its subflow run recorded it
    return {"path": item["path"], "checkpoint": result["checkpoint"], "run_id": result["run_id"]}


@flow(name=FLOW, log_prints=True, validate_parameters=True)
def recalibrate(
    config: SweepConfig = SweepConfig(),  # noqa: B008 (the UI shows the default)
    watch_dir: str | None = None,
    checkpoint: str | None = None,
    resource_id: str | None = None,
) -> list[dict]:
    """Sweep (as a subflow, with ``config``'s settings) the checkpoint an event names, else every
    checkpoint under ``watch_dir`` without recipes (module docstring).

    ``watch_dir``: default ``$FITPRUNE_WATCH_DIR``, else ``<data root>/checkpoints`` (created if
    missing). Question sources need checkpoints saved with their processor (``fitprune
    export-checkpoint``); ``source: toy`` needs none. Returns ``[{"path", "checkpoint", "run_id"}]``.
    """
    from storage.root import data_root as resolve_root

    logger = get_run_logger()
    config = config.model_copy(update={"data_root": str(resolve_root(config.data_root))})
    default = watch_dir is None and not os.environ.get(WATCH_ENV)
    watch_dir = watch_dir_for(watch_dir, config.data_root)
    if default:
        Path(watch_dir).mkdir(parents=True, exist_ok=True)
    named = named_checkpoint(watch_dir, checkpoint, resource_id)
    paths = [named] if named else find_checkpoints(watch_dir)
    todo = checkpoints_without_recipes(paths, config.data_root)
    logger.info(f"{len(todo)} checkpoint(s) without recipes " +
                (f"(named by the event: {named})" if named else f"under {watch_dir}"))
    done, failed = [], []
    for item in todo:
        error = item.get("error")
        if error is None:
            try:
                swept = _sweep_one(item, config, logger)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
            else:
                done += [swept] if swept else []
        if error is not None:
            logger.error(f"checkpoint {item['path']}: {error}")
            _record_failure(item["path"], error, config)
            failed.append(f"{item['path']} ({error})")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} checkpoint(s) failed, {len(done)} swept: "
                           + "; ".join(failed))
    logger.info(f"swept {len(done)} checkpoint(s): " + ", ".join(f"{d['path']} → {d['run_id']}" for d in done))
    return done
