"""One sweep per checkpoint at a time: a Prefect global concurrency limit keyed by the fingerprint.

``checkpoint_guard(fp)`` creates the limit ``fitprune-checkpoint-<fp>`` (limit 1) if the server lacks
it, then holds its one slot for the block. A second run waits for the slot; the slot is a lease
that the server frees if its holder dies (Prefect's default lease, 300 s), so a killed run cannot
block the checkpoint for ever. It needs a Prefect API (a server, or the ephemeral one a flow starts).
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["checkpoint_guard", "guard_name"]


def guard_name(fingerprint: str) -> str:
    """The concurrency limit's name: lowercase letters, digits and dashes only."""
    safe = "".join(c if c.isalnum() else "-" for c in fingerprint.lower())
    return f"fitprune-checkpoint-{safe}"


@contextmanager
def checkpoint_guard(fingerprint: str):
    """Hold the fingerprint's slot (module docstring) for the ``with`` block."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = guard_name(fingerprint)
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
    with concurrency(name, occupy=1, strict=True):
        yield
