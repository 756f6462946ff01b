"""``fitprune export-checkpoint``: write a model as a checkpoint directory the pipeline can load.

The demo model is written with a stock ``LlavaProcessor`` that encodes exactly like the demo's own
(``DemoProcessor.to_hf``), so a sweep of the exported directory (``{"kind": "path"}``) reads
questions and images; a checkpoint directory is copied with its processor when it has one; the toy
model has no processor (sweep it with ``source: toy``). The directory is written next to its
target and renamed into place, so a watcher never sees half a checkpoint. Optionally the event
``fitprune.checkpoint.created`` is emitted, naming the new directory (resource id
``fitprune.checkpoint.<dir name>``, payload ``{"path": ...}``): the re-calibration deployment's trigger.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tasks.models import fingerprint, model_and_processor, normalize_spec

__all__ = ["EVENT", "emit_created", "export_checkpoint"]

EVENT = "fitprune.checkpoint.created"


def _processor_for(spec: dict, processor):
    if spec["kind"] == "demo":
        return processor.to_hf()
    return processor  # a path checkpoint's own (or None); the toy model has none


def export_checkpoint(spec, out_dir, root=None) -> dict:
    """Write the spec's model (``tasks.models``) to ``out_dir``, which must not exist or be empty.
    Returns ``{"path", "checkpoint" (fingerprint of the written files), "processor" (bool)}``."""
    spec = normalize_spec(spec)
    target = Path(out_dir).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} already exists and is not an empty directory; pass a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    model, processor = model_and_processor(spec, root)
    processor = _processor_for(spec, processor)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"path": str(target), "checkpoint": fingerprint(str(target)), "processor": processor is not None}


def emit_created(path: str) -> str:
    """Emit ``fitprune.checkpoint.created`` for checkpoint ``path`` to the Prefect API; returns the resource id."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    resource_id = "fitprune.checkpoint." + Path(path).name
    event = emit_event(event=EVENT, resource={"prefect.resource.id": resource_id}, payload={"path": str(path)})
    if event is None:
        raise RuntimeError(f"could not emit {EVENT}: no Prefect API is configured (set PREFECT_API_URL)")
    EventsWorker.drain_all()  # sent before a short-lived process exits
    return resource_id
