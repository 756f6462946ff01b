"""Append-only Parquet writes and reads, one file per write.

``write_rows`` validates rows against the table's schema, writes them to a hidden temp file in
the target directory, then publishes it as ``part-<write_id>.parquet`` with an atomic link or
rename. A ``write_id`` that already exists is a no-op, so a retried task writes no duplicate
rows; an interrupted one leaves at most a ``.part-*.tmp`` file, which readers never match and
the next write to that directory deletes once it is an hour old. Files are never rewritten.

A part that cannot be read (truncated, overwritten) raises ``CorruptPartError`` naming it: move
that one file out of the data root and the rest of the table reads as before.
"""

from __future__ import annotations

import errno
import glob
import json
import numbers
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .root import check_write_id, is_not_writable, not_writable, partition_dir, table_dir
from .tables import TABLES, Table, get_table

__all__ = ["validate", "write_rows", "read_table", "list_parts", "part_exists", "ensure_empty", "empty_file",
           "clean_stale_tmp", "CorruptPartError", "check_part", "find_corrupt_part"]

STALE_TMP_S = 3600.0
_EMPTY = "_empty.parquet"
_NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"  # hive's "no value": the empty file's directories
_FINGERPRINT_KEY = b"fitprune.schema"


# --- validation (pure) -----------------------------------------------------------------------


def _bad_value(values: list, typ: pa.DataType) -> tuple[int, Any, str]:
    for i, v in enumerate(values):
        if pa.types.is_integer(typ) and _fractional(v):
            return i, v, "not a whole number"
        try:
            pa.array([v], type=typ)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            return i, v, str(exc)
    return -1, None, ""


def _fractional(v: Any) -> bool:
    # pa.array truncates 1.5 to 1 in an integer column: refuse instead
    return isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not float(v).is_integer()


def _json_text(value: Any, table: str, name: str, row: int) -> Any:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{table}.{name}: row {row} is not valid JSON ({exc}): {value[:80]!r}; "
                "pass a dict/list or a JSON string"
            ) from None
        return value
    raise TypeError(f"{table}.{name}: row {row} is {type(value).__name__}; expected a JSON string, dict or list")


def _from_rows(spec: Table, rows: Sequence[Mapping[str, Any]]) -> dict[str, pa.Array]:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{spec.name}: row {i} is a {type(row).__name__}; rows must be dicts of column -> value")
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    unknown = sorted(keys - set(spec.names), key=str)
    if unknown:
        raise ValueError(f"{spec.name}: unknown column(s) {unknown}; the columns are {spec.names}")
    arrays = {}
    for col in spec.columns:
        if col.name not in keys:
            arrays[col.name] = None  # filled or rejected below
            continue
        values = [r.get(col.name) for r in rows]
        if col.json:
            values = [_json_text(v, spec.name, col.name, i) for i, v in enumerate(values)]
        try:
            if pa.types.is_integer(col.type) and any(_fractional(v) for v in values):
                raise TypeError("fractional value")
            arrays[col.name] = pa.array(values, type=col.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            i, v, why = _bad_value(values, col.type)
            raise TypeError(
                f"{spec.name}.{col.name}: row {i} has {v!r} ({type(v).__name__}), which is not {col.type}: {why}"
            ) from None
    return arrays


def _from_arrow(spec: Table, data: pa.Table) -> dict[str, pa.Array]:
    unknown = [n for n in data.column_names if n not in spec.names]
    if unknown:
        raise ValueError(f"{spec.name}: unknown column(s) {unknown}; the columns are {spec.names}")
    if len(set(data.column_names)) != len(data.column_names):
        raise ValueError(f"{spec.name}: duplicate column names in {data.column_names}")
    arrays = {}
    for col in spec.columns:
        if col.name not in data.column_names:
            arrays[col.name] = None
            continue
        arr = data.column(col.name)
        if col.json and pa.types.is_string(arr.type):
            for i, v in enumerate(arr.to_pylist()):
                _json_text(v, spec.name, col.name, i)
        try:
            arrays[col.name] = arr.cast(col.type, safe=True)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise TypeError(f"{spec.name}.{col.name}: cannot store {arr.type} as {col.type} ({exc})") from None
    return arrays


def validate(table: str, rows: Any) -> pa.Table:
    """Rows as a ``pa.Table`` with exactly ``table``'s schema, or an error naming the column.

    ``rows``: a list of dicts, a ``pa.Table``/``pa.RecordBatch``, or anything exporting Arrow
    (``__arrow_c_stream__``: pandas, polars, DuckDB results). Omitted columns with a default
    (``created_at``) are filled, omitted nullable columns are NULL, anything else missing, unknown
    or of the wrong type raises. Values are cast safely (no overflow, no truncation). For large
    writes (statistics) pass Arrow: it is cast column by column, while dicts go row by row.
    """
    spec = get_table(table)
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    elif not isinstance(rows, (pa.Table, list, tuple)) and hasattr(rows, "__arrow_c_stream__"):
        rows = pa.table(rows)
    if isinstance(rows, pa.Table):
        arrays, n = _from_arrow(spec, rows), rows.num_rows
    elif isinstance(rows, (list, tuple)):
        arrays, n = _from_rows(spec, rows), len(rows)
    else:
        raise TypeError(
            f"{spec.name}: cannot write a {type(rows).__name__}; pass a list of dicts or a pyarrow Table"
        )
    out = []
    for col in spec.columns:
        arr = arrays[col.name]
        if arr is None:
            if n == 0:
                arr = pa.array([], type=col.type)
            elif col.default is not None:
                arr = pa.array([col.default()] * n, type=col.type)
            elif col.nullable:
                arr = pa.nulls(n, type=col.type)
            else:
                raise ValueError(f"{spec.name}: missing required column {col.name!r} ({col.type}: {col.doc})")
        if not col.nullable and arr.null_count:
            first = pc.index(pc.is_null(arr), True).as_py()
            raise ValueError(f"{spec.name}.{col.name}: row {first} is null, but the column is required ({col.doc})")
        out.append(arr)
    return pa.Table.from_arrays(out, schema=spec.schema)


def _partition_of(spec: Table, data: pa.Table, partition: Mapping[str, Any] | None) -> dict[str, str]:
    partition = dict(partition or {})
    extra = sorted(set(partition) - set(spec.partition_by))
    if extra:
        allowed = list(spec.partition_by) or "none (the table is not partitioned)"
        raise ValueError(f"{spec.name}: cannot partition by {extra}; partition columns: {allowed}")
    out = {}
    for key in spec.partition_by:
        distinct = pc.unique(data.column(key)).to_pylist()
        if key in partition:
            value = partition[key]
            if not isinstance(value, str) or not value or value == _NULL_PARTITION:
                raise ValueError(f"{spec.name}: partition {key}={value!r} must be a non-empty string")
            wrong = [v for v in distinct if v != value]
            if wrong:
                raise ValueError(
                    f"{spec.name}: partition {key}={value!r} but rows have {key}={wrong[0]!r}; "
                    f"write each {key} separately"
                )
        elif len(distinct) == 1 and distinct[0] and distinct[0] != _NULL_PARTITION:
            value = distinct[0]
        else:
            raise ValueError(
                f"{spec.name}: rows hold {len(distinct)} values of partition column {key!r}; pass "
                f"partition={{{key!r}: ...}} with rows of one {key} per write"
            )
        out[key] = value
    return out


# --- files (side effects) --------------------------------------------------------------------


class CorruptPartError(RuntimeError):
    """A Parquet file of the store cannot be read; ``path`` names it."""

    def __init__(self, path: Path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(
            f"{path} is truncated or corrupt ({why}); move it out of the data root: tables are append-only, "
            "one file per write, so the other files read as before (this file's rows are lost; re-run what "
            "wrote them)"
        )


def check_part(path: str | os.PathLike) -> str | None:
    """None if ``path``'s Parquet footer reads, else why not (one line)."""
    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        size = os.path.getsize(path)
        if size == 0:
            return "0 bytes"
        text = str(exc).split(": ")[-1].split(". ")[0].strip().rstrip(".")
        return f"{size} bytes, not readable as Parquet: {text}"
    return None


def find_corrupt_part(error: BaseException | str, root=None,
                      paths: Sequence[Path] | None = None) -> CorruptPartError | None:
    """The ``CorruptPartError`` behind a failed read, or None if no file is to blame.

    Files named in ``error``'s message are checked first, then every file of ``paths`` (default:
    every part and typed empty file under the root). Only footers are read.
    """
    if paths is None:
        paths = [p for name in TABLES for p in [*list_parts(name, root), empty_file(name, root)] if p.exists()]
    message = str(error)
    named = [p for p in paths if str(p) in message]
    for path in [*named, *(p for p in paths if p not in named)]:
        why = check_part(path) if Path(path).is_file() else None  # a vanished file is not a corrupt one
        if why is not None:
            return CorruptPartError(path, why)
    return None


def _discard(path: Path) -> None:
    """Remove a temp file, never raising: a failed cleanup must not hide the error that led to it."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class _Writing:
    """Turns a write refused by permissions or a read-only file system into a ``DataRootError``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and is_not_writable(exc):
            where = Path(exc.filename).parent if getattr(exc, "filename", None) else self.directory
            raise not_writable(where, exc) from exc
        return False


def clean_stale_tmp(directory: Path, now: float, pattern: str = ".*.tmp") -> None:
    """Delete hidden temp files in ``directory`` left by writers that died over an hour ago."""
    for tmp in directory.glob(pattern):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except FileNotFoundError:
            pass


def _tmp_path(directory: Path, name: str) -> Path:
    return directory / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _publish(tmp: Path, final: Path) -> bool:
    """Make ``tmp`` appear as ``final`` atomically; False if ``final`` already existed (tmp removed)."""
    try:
        os.link(tmp, final)  # never replaces: a concurrent twin with the same write_id wins once
    except FileExistsError:
        tmp.unlink()
        return False
    except OSError as exc:  # file systems without hard links
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            tmp.unlink()
            return False
        os.replace(tmp, final)
        return True
    tmp.unlink()
    return True


def empty_file(table: str, root=None) -> Path:
    """Path of the table's typed zero-row file, at the same depth as its partitioned parts."""
    spec = get_table(table)
    base = partition_dir(table_dir(spec.name, root), {k: _NULL_PARTITION for k in spec.partition_by})
    return base / _EMPTY


def ensure_empty(table: str, root=None) -> Path:
    """Write the table's zero-row file if it is missing or has an old schema; return its path.

    It keeps the catalog's views valid before any write and gives new columns their type.
    """
    spec = get_table(table)
    path = empty_file(table, root)
    want = spec.fingerprint.encode()
    try:
        if (pq.read_schema(path).metadata or {}).get(_FINGERPRINT_KEY) == want:
            return path
    except (FileNotFoundError, pa.ArrowException):
        pass
    schema = spec.schema.with_metadata({**spec.schema.metadata, _FINGERPRINT_KEY: want})
    tmp = _tmp_path(path.parent, _EMPTY)
    with _Writing(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(schema.empty_table(), tmp)
            os.replace(tmp, path)  # zero rows: replacing it changes no reader's results
        except BaseException:
            _discard(tmp)
            raise
    return path


def write_rows(
    table: str,
    rows: Any,
    *,
    root=None,
    write_id: str,
    partition: Mapping[str, str] | None = None,
) -> Path:
    """Append ``rows`` to ``table`` as ``part-<write_id>.parquet``; return the file's path.

    Idempotent: if that file exists it is returned untouched, so use a ``write_id`` that is the
    same on a retry (e.g. the task run id plus the shard). ``partition`` names the values of the
    table's partition columns (``stats_token``: checkpoint, calib_id); when omitted they are taken
    from the rows, which must then hold one value each. See ``validate`` for accepted ``rows``.
    """
    check_write_id(write_id)
    spec = get_table(table)
    data = validate(table, rows)
    part = _partition_of(spec, data, partition)
    directory = partition_dir(table_dir(spec.name, root), part)
    final = directory / f"part-{write_id}.parquet"
    if final.exists():
        return final
    with _Writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(directory, time.time())
        ensure_empty(table, root)
        tmp = _tmp_path(directory, final.name)
        try:
            pq.write_table(data, tmp, compression="zstd")
            _publish(tmp, final)
        except BaseException:
            _discard(tmp)  # e.g. EROFS from the cleanup itself must not replace the write's error
            raise
    return final


def list_parts(table: str, root=None, partition: Mapping[str, str] | None = None) -> list[Path]:
    """The table's published part files, sorted; ``partition`` narrows to matching directories."""
    spec = get_table(table)
    partition = dict(partition or {})
    pattern = glob.escape(str(table_dir(spec.name, root)))
    for key in spec.partition_by:
        value = partition.get(key)
        pattern += f"/{key}=" + (quote(value, safe="") if isinstance(value, str) else "*")
    return sorted(Path(p) for p in glob.glob(pattern + "/part-*.parquet"))


def part_exists(table: str, write_id: str, root=None, partition: Mapping[str, str] | None = None) -> bool:
    """Whether ``write_rows(table, ..., write_id=write_id, partition=partition)`` has been published.

    ``partition`` must name every partition column of the table (the directory of the part).
    """
    check_write_id(write_id)
    spec = get_table(table)
    partition = dict(partition or {})
    missing = [k for k in spec.partition_by if not partition.get(k)]
    if missing:
        raise ValueError(f"{spec.name}: part_exists needs the partition value(s) {missing}")
    directory = partition_dir(table_dir(spec.name, root), {k: partition[k] for k in spec.partition_by})
    return (directory / f"part-{write_id}.parquet").exists()


def _filter_expr(spec: Table, filters: Mapping[str, Any]) -> ds.Expression | None:
    expr = None
    for name, value in filters.items():
        if name not in spec.names:
            raise ValueError(f"{spec.name}: cannot filter on unknown column {name!r}; the columns are {spec.names}")
        field = ds.field(name)
        if value is None:
            term = field.is_null()
        elif isinstance(value, (list, tuple, set, frozenset)):
            term = field.isin(pa.array(list(value), type=spec.column(name).type))
        else:
            term = field == pa.scalar(value, type=spec.column(name).type)
        expr = term if expr is None else expr & term
    return expr


def read_table(table: str, root=None, filters: Mapping[str, Any] | ds.Expression | None = None,
               columns: Sequence[str] | None = None, parts: Sequence[Path] | None = None) -> pa.Table:
    """All rows of ``table`` (in no particular order) with its schema; zero rows if nothing was written.

    ``filters``: a dict of column -> value (a list/tuple/set means "any of", None means NULL),
    combined with AND; or a ``pyarrow.dataset`` expression. Filters on partition columns skip
    other partitions' files. ``columns``: read only these (in this order). ``parts``: read only
    these part files (from ``list_parts``). Files written under an older schema read with NULL for
    new columns.
    """
    spec = get_table(table)
    if columns is not None:
        unknown = [c for c in columns if c not in spec.names]
        if unknown:
            raise ValueError(f"{spec.name}: cannot read unknown column(s) {unknown}; the columns are {spec.names}")
    if isinstance(filters, Mapping):
        paths = list_parts(table, root, {k: v for k, v in filters.items() if k in spec.partition_by})
        expr = _filter_expr(spec, filters)
    else:
        paths, expr = list_parts(table, root), filters
    if parts is not None:
        wanted = {Path(p) for p in parts}
        paths = [p for p in paths if p in wanted]
    schema = spec.schema if columns is None else pa.schema([spec.schema.field(c) for c in columns],
                                                           metadata=spec.schema.metadata)
    if not paths:
        return schema.empty_table()
    try:
        dataset = ds.dataset([str(p) for p in paths], schema=spec.schema, format="parquet")
        return dataset.to_table(columns=None if columns is None else list(columns),
                                filter=expr).replace_schema_metadata(spec.schema.metadata)
    except (pa.ArrowException, OSError) as exc:
        corrupt = find_corrupt_part(exc, root, paths)
        if corrupt is None:
            raise
        raise corrupt from exc
