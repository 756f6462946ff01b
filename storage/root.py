"""Where the data root lives, and its layout.

The data root is one directory. It is chosen, first match wins, by:

1. the ``root`` argument of any ``storage`` function;
2. the environment variable ``FITPRUNE_DATA``;
3. ``~/.cache/fitprune``.

Layout (everything below the root is created on first write)::

    <root>/tables/<table>/[<key>=<value>/...]/part-<write_id>.parquet   one file per write
    <root>/tables/<table>/[...]/_empty.parquet                          typed, zero rows
    <root>/catalog.duckdb                                               views only; rebuildable

Partition values are percent-encoded in directory names (``/`` becomes ``%2F``), which is how
DuckDB's hive partitioning decodes them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote

__all__ = ["ENV_VAR", "DEFAULT_ROOT", "data_root", "table_dir", "partition_dir", "catalog_path", "check_write_id"]

ENV_VAR = "FITPRUNE_DATA"
DEFAULT_ROOT = Path("~/.cache/fitprune")

# A write id becomes part of a file name: keep it to a portable alphabet.
_WRITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root as an absolute path: ``root`` > ``$FITPRUNE_DATA`` > ``~/.cache/fitprune``.

    Pure: nothing is created. An empty ``FITPRUNE_DATA`` counts as unset.
    """
    if root is None or str(root) == "":
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser().resolve()


def table_dir(table: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/tables/<table>``."""
    return data_root(root) / "tables" / table


def partition_dir(base: Path, partition: dict[str, str]) -> Path:
    """``base/<key>=<value>/...`` in the order given, values percent-encoded (hive style)."""
    path = base
    for key, value in partition.items():
        path = path / f"{key}={quote(str(value), safe='')}"
    return path


def catalog_path(root: str | os.PathLike | None = None) -> Path:
    """``<root>/catalog.duckdb``."""
    return data_root(root) / "catalog.duckdb"


def check_write_id(write_id: str) -> str:
    """Return ``write_id`` if it is 1–200 of letters, digits, ``-``, ``_``, ``.``, starting alphanumeric."""
    if not isinstance(write_id, str) or not _WRITE_ID.fullmatch(write_id):
        raise ValueError(
            f"write_id {write_id!r} is not allowed: use 1-200 characters from letters, digits, '-', '_' "
            "and '.', starting with a letter or digit (for example a task run id, or "
            "f'{run_id}-shard{start}-{stop}'); the same write_id on a retry makes the write a no-op"
        )
    return write_id
