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

import errno
import os
import re
from pathlib import Path
from urllib.parse import quote

__all__ = ["ENV_VAR", "DEFAULT_ROOT", "GLOB_CHARS", "DataRootError", "data_root", "check_root", "not_writable",
           "is_not_writable", "table_dir", "partition_dir", "catalog_path", "check_write_id"]

ENV_VAR = "FITPRUNE_DATA"
DEFAULT_ROOT = Path("~/.cache/fitprune")
GLOB_CHARS = "*?[]{}"  # DuckDB reads a path holding any of these as a file pattern
_HOW = "pass another with --data-root or $FITPRUNE_DATA"


class DataRootError(ValueError):
    """The data root (or a directory in it) cannot be used; the message names it, says why and what to do."""

# A write id becomes part of a file name: keep it to a portable alphabet.
_WRITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root as an absolute path: ``root`` > ``$FITPRUNE_DATA`` > ``~/.cache/fitprune``.

    Pure: nothing is created. An empty ``FITPRUNE_DATA`` counts as unset.
    """
    if root is None or str(root) == "":
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser().resolve()


def check_root(root: str | os.PathLike | None = None, *, create: bool = True, writable: bool = True) -> Path:
    """The data root (as ``data_root``) if it can be used, else ``DataRootError`` saying why.

    Checked before any work starts: no glob characters in the path (``GLOB_CHARS``), not a file,
    existing (``create``: made if missing) and, with ``writable``, writable (the root and its
    ``tables`` directory, by ``os.access``). Creating the directory is the only side effect.
    """
    path = data_root(root)
    found = "".join(c for c in GLOB_CHARS if c in str(path))
    if found:
        raise DataRootError(f"data root {path} contains {found!r}, which DuckDB reads as a file pattern, so its "
                            f"tables could not be queried; choose a path without any of {GLOB_CHARS} ({_HOW})")
    if path.exists() and not path.is_dir():
        raise DataRootError(f"data root {path} is a file, not a directory; {_HOW}")
    if not path.exists():
        if not create:
            raise DataRootError(f"no data root at {path}; run a sweep first or pass --data-root (or $FITPRUNE_DATA)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataRootError(f"cannot create the data root {path}: {exc.strerror or exc}; {_HOW}") from exc
    if writable:
        for directory in (path, path / "tables"):
            if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
                raise not_writable(directory, what="data root" if directory == path else "directory")
    return path


def not_writable(directory: str | os.PathLike, exc: OSError | None = None, what: str = "directory") -> DataRootError:
    """The error for a directory of the data root that cannot be written (``exc``: the failed write)."""
    why = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
    return DataRootError(f"{what} {directory} is not writable{why}; make it writable, or {_HOW}")


def is_not_writable(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused by permissions or a read-only file system."""
    return isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


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
