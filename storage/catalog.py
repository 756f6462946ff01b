"""The DuckDB catalog: a file of views over the Parquet tables, rebuilt whenever it is stale.

``<root>/catalog.duckdb`` holds views only, so it can be deleted and rebuilt at any time:

* the raw layer, one view per table of ``storage.tables`` named after it, from the template
  ``sql/_table.sql`` (its globs are read when a query runs, so new files show up without a rebuild);
* one view per other ``sql/<view>.sql`` file, named after the file, reading only views;
* ``catalog_info``: the root, a hash of the SQL and schemas it was built from, DuckDB's version.

``build_catalog`` writes a temp file and renames it over the catalog, so a reader opens either
the old or the new catalog, never a half-built one. ``connect`` rebuilds a missing or stale
catalog first. Query parameters are bound (``$name``), never formatted into SQL.

User SQL (``query``, ``pareto``, ``fitprune sql``) is read-only: exactly one SELECT (checked by
DuckDB's parser), run on a ``connect_locked`` connection that can touch no file outside
``<root>/tables/``.

The build reads no data file: every view is first bound and run over the typed zero-row files
alone (a broken view fails the build), then stored unbound (``DEFER_BINDING``) over the real
globs. So a corrupt part breaks the queries that read its table, with a ``CorruptPartError``
naming it, and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import duckdb
import pyarrow as pa

from .root import GLOB_CHARS, catalog_path, data_root, table_dir
from .store import clean_stale_tmp, ensure_empty, find_corrupt_part
from .tables import TABLES, Table

__all__ = [
    "SQL_DIR", "view_names", "build_catalog", "connect", "connect_locked", "ReadOnlyQueryError", "query", "pareto",
    "format_table",
]

SQL_DIR = Path(__file__).with_name("sql")
_TEMPLATE = "_table.sql"
_GLOB_CHARS = set(GLOB_CHARS)


def _literal(text: str) -> str:
    """A SQL string literal (for file paths in view DDL, where parameters cannot be bound)."""
    if "\x00" in text:
        raise ValueError("NUL character in a SQL string")
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _duckdb_type(t: pa.DataType) -> str:
    if t == pa.string():
        return "VARCHAR"
    raise ValueError(f"no DuckDB type for partition column type {t}")


def _view_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SQL_DIR.glob("*.sql")) if not p.name.startswith("_")}


def view_names() -> list[str]:
    """Every view the catalog holds: the tables' raw views, the ``sql/*.sql`` views, ``catalog_info``."""
    return [*TABLES, *_view_files(), "catalog_info"]


def _raw_view_sql(spec: Table, root: Path, template: str, files: str | None = None) -> str:
    base = table_dir(spec.name, root)
    if _GLOB_CHARS & set(str(base)):
        raise ValueError(
            f"the data root {root} contains one of {''.join(sorted(_GLOB_CHARS))}, which DuckDB would read "
            "as a file pattern; choose a data root without them (argument or $FITPRUNE_DATA)"
        )
    # the parts and the typed _empty.parquet all sit one directory level per partition column down
    pattern = files or "/".join([str(base), *(f"{key}=*" for key in spec.partition_by), "*.parquet"])
    if spec.partition_by:
        types = ", ".join(f"{_literal(k)}: {_duckdb_type(spec.column(k).type)}" for k in spec.partition_by)
        hive = f"hive_partitioning = true, hive_types = {{{types}}}"
    else:
        hive = "hive_partitioning = false"
    return (
        template.replace("@columns@", ", ".join(_ident(n) for n in spec.names))
        .replace("@files@", _literal(pattern))
        .replace("@hive@", hive)
    )


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    h.update(str(root).encode() + b"\0" + duckdb.__version__.encode())
    for spec in TABLES.values():
        h.update(spec.name.encode() + spec.fingerprint.encode())
    for path in sorted(SQL_DIR.glob("*.sql")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _create_views(con: duckdb.DuckDBPyConnection, root: Path, check: bool = False) -> None:
    """Every view in ``con``. ``check``: the raw views read only the typed zero-row files, and every
    view is bound and run; else they read the real globs and are bound only when queried."""
    template = (SQL_DIR / _TEMPLATE).read_text()
    defer = "" if check else " WITH (DEFER_BINDING)"
    for spec in TABLES.values():
        empty = ensure_empty(spec.name, root)
        body = _raw_view_sql(spec, root, template, str(empty) if check else None)
        con.execute(f"CREATE VIEW {_ident(spec.name)}{defer} AS\n{body}")
    # Views may read each other: create in rounds until every one binds (or none progresses).
    pending = {name: path.read_text() for name, path in _view_files().items()}
    while pending:
        errors = {}
        for name, body in list(pending.items()):
            try:
                con.execute(f"CREATE VIEW {_ident(name)}{defer} AS\n{body}")
            except duckdb.Error as exc:
                errors[name] = exc
        if len(errors) == len(pending):  # no view built in this round
            name, exc = next(iter(errors.items()))
            raise ValueError(f"view {name!r} ({SQL_DIR / (name + '.sql')}) does not build: {exc}") from exc
        pending = {name: pending[name] for name in errors}
    info = (
        f"SELECT {_literal(str(root))} AS root, {_literal(_fingerprint(root))} AS fingerprint, "
        f"{_literal(duckdb.__version__)} AS duckdb_version, "
        f"TIMESTAMPTZ {_literal(datetime.now(timezone.utc).isoformat())} AS built_at"
    )
    con.execute(f"CREATE VIEW catalog_info AS {info}")
    for name in view_names() if check else ():
        con.execute(f"SELECT * FROM {_ident(name)} LIMIT 0").fetchall()


def build_catalog(root=None) -> Path:
    """(Re)create ``<root>/catalog.duckdb`` with every view; return its path.

    Atomic: built in a temp file next to it and renamed over it. Safe to run while others read.
    """
    root = data_root(root)
    final = catalog_path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root, time.time(), ".catalog.*")  # from builds killed over an hour ago
    check = duckdb.connect()  # in memory: every view bound over the zero-row files, no data file read
    try:
        _create_views(check, root, check=True)
    finally:
        check.close()
    tmp = root / f".catalog.{os.getpid()}-{uuid.uuid4().hex[:8]}.duckdb.tmp"
    try:
        con = duckdb.connect(str(tmp))
        try:
            _create_views(con, root)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, Path(str(tmp) + ".wal")):
            try:
                leftover.unlink(missing_ok=True)
            except OSError:  # a read-only root fails the cleanup too: keep the error that led here
                pass
    return final


def _open_current(path: Path, root: Path, read_only: bool) -> duckdb.DuckDBPyConnection | None:
    """A connection to the catalog if it opens and was built for this root and code, else None."""
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error:
        return None
    try:
        rows = con.execute("SELECT root, fingerprint FROM catalog_info").fetchall()
    except duckdb.Error:
        rows = None
    if rows == [(str(root), _fingerprint(root))]:
        return con
    con.close()
    return None


def connect(root=None, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to the catalog, rebuilt first if it is missing or stale.

    Read-only by default, which many processes may hold at once. ``read_only=False`` locks the
    file for this process alone; anything you create in it is lost at the next rebuild.
    For internal code only: the file is read-only, but the connection can still read and write
    files anywhere (COPY, read_csv, ATTACH, ...). SQL from a user goes through ``query`` (or a
    ``connect_locked`` connection).
    """
    root = data_root(root)
    path = catalog_path(root)
    con = _open_current(path, root, read_only) if path.exists() else None
    if con is None:
        build_catalog(root)
        con = duckdb.connect(str(path), read_only=read_only)
    return con


class ReadOnlyQueryError(ValueError):
    """SQL that ``query`` refuses: not exactly one read (SELECT) statement."""


# Read statements. DESCRIBE, SHOW, SUMMARIZE, FROM-first, VALUES, WITH, UNPIVOT and a PIVOT
# that lists its values (ON col IN (...)) parse as SELECT; a PIVOT without them is MULTI (it runs
# a query first to find the values) and EXPLAIN [ANALYZE] is EXPLAIN: both are refused.
_READ_TYPES = frozenset({duckdb.StatementType.SELECT})
_NEXT_STEP = (
    "to export, run the SELECT with `fitprune sql` and redirect its output, or use storage.query / "
    "storage.read_table in Python and write the result yourself"
)
_HINTS = {
    "MULTI": "list the pivot values (PIVOT ... ON col IN (...)) or write it as a SELECT with GROUP BY",
    "SET": "settings (SET, RESET, USE) are fixed for user queries",
    "EXPLAIN": "EXPLAIN is not supported here; use storage.connect in Python to see a plan",
}


def _lockdown_sql(root: Path) -> list[str]:
    """The settings that confine a connection to the files under ``<root>/tables/``, for good.

    DuckDB allows reading *and writing* in ``allowed_directories``: these settings stop a COPY
    outside the tables, not one over a part; the one-SELECT check of ``query`` stops that.
    Order matters in DuckDB 2.0.1: ``allowed_directories`` can only be set after the database has
    started (not in ``duckdb.connect(config=...)``) and before ``enable_external_access = false``;
    ``lock_configuration`` last, so the query cannot SET/RESET any of them back. ``temp_directory``
    is the catalog's own (as for a file connection), else an in-memory database spills to ./.tmp,
    which DuckDB would then also allow reading.
    """
    return [
        f"SET temp_directory = {_literal(str(catalog_path(root)) + '.tmp')}",
        f"SET allowed_directories = [{_literal(str(root / 'tables'))}]",
        "SET enable_external_access = false",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET lock_configuration = true",
    ]


def connect_locked(root=None) -> duckdb.DuckDBPyConnection:
    """A connection to the catalog for user SQL: it reads the views and ``<root>/tables/``, nothing else.

    The catalog (rebuilt first if missing or stale, as by ``connect``) is attached READ_ONLY, as
    database ``fitprune`` (the default), to a private in-memory DuckDB, which is then locked down
    (see ``_lockdown_sql``): no file outside ``<root>/tables/`` can be read (read_csv, read_text,
    glob, 'file.csv' scans, ATTACH) or written (COPY, EXPORT), no extension installed or loaded,
    and no setting changed. DuckDB itself still reads the attached catalog file and may spill to
    ``<root>/catalog.duckdb.tmp/``. A private instance, because DuckDB shares one instance (and
    its settings) between the connections a process opens to the same file: locking that one
    would lock every other ``connect`` of this process too. It still runs any statement you give
    it, including a COPY into ``<root>/tables/`` (a CREATE lands in the in-memory database and is
    lost): ``query`` checks the statement first; do the same if you hand it SQL yourself.
    """
    root = data_root(root)
    connect(root).close()  # build a missing or stale catalog
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH {_literal(str(catalog_path(root)))} AS fitprune (READ_ONLY)")
        con.execute("USE fitprune")
        for statement in _lockdown_sql(root):
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con


def _check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    statements = con.extract_statements(sql)  # DuckDB's parser; a syntax error raises duckdb.ParserException
    allowed = "only one read statement is allowed (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE)"
    if not statements:
        raise ReadOnlyQueryError(f"got 0 statements (empty SQL or only comments); {allowed}")
    if len(statements) > 1:
        kinds = ", ".join(st.type.name for st in statements)
        raise ReadOnlyQueryError(
            f"got {len(statements)} statements ({kinds}); {allowed}: send one statement per call, without a second ';'"
        )
    kind = statements[0].type
    if kind not in _READ_TYPES:
        hint = _HINTS.get(kind.name, "user SQL changes nothing: no file, setting, extension or catalog entry")
        raise ReadOnlyQueryError(f"got a statement of type {kind.name}; {allowed}; {hint}; {_NEXT_STEP}")


def query(sql: str, params: Mapping[str, Any] | list | None = None, root=None) -> pa.Table:
    """Run one read query on the catalog's views and return an Arrow table.

    Bind values as parameters: ``query("SELECT * FROM evaluations WHERE benchmark = $b", {"b": "pope"})``.
    ``sql`` must be exactly one statement that DuckDB's parser types SELECT (also WITH, FROM-first,
    VALUES, DESCRIBE, SHOW, SUMMARIZE); anything else (a second statement, COPY, EXPORT, ATTACH,
    SET/RESET/PRAGMA, INSTALL/LOAD, CREATE/INSERT/DROP, EXPLAIN, ...) raises ``ReadOnlyQueryError``
    and runs nothing. The SELECT runs on a ``connect_locked`` connection: a file outside
    ``<root>/tables/`` (``read_csv('/etc/passwd')``, ``glob``, ``FROM 'x.csv'``) raises
    ``duckdb.PermissionException``.
    """
    con = connect_locked(root)
    try:
        _check_read_only(con, sql)
        return con.sql(sql, params=params).to_arrow_table()
    except duckdb.Error as exc:
        _raise_if_corrupt(exc, root)
        raise
    finally:
        con.close()


def _raise_if_corrupt(exc: duckdb.Error, root) -> None:
    """Raise the ``CorruptPartError`` behind a failed query, if a data file is to blame."""
    if isinstance(exc, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)) \
            and ".parquet" not in str(exc):
        return  # the SQL itself is wrong: no file to look at
    corrupt = find_corrupt_part(exc, root)
    if corrupt is not None:
        raise corrupt from exc


_PARETO_SQL = """
SELECT * FROM pareto
WHERE ($checkpoint IS NULL OR checkpoint = $checkpoint)
  AND ($benchmark IS NULL OR benchmark = $benchmark)
ORDER BY checkpoint, benchmark, eval_set, metric_name, flops_reduction, recipe_id
"""


def pareto(root=None, checkpoint: str | None = None, benchmark: str | None = None) -> pa.Table:
    """The Pareto front (flops_reduction up, metric up) per checkpoint, benchmark and metric.

    Rows of the ``pareto`` view (see ``sql/pareto.sql``), optionally for one checkpoint and/or
    benchmark, sorted by increasing FLOPs reduction.
    """
    return query(_PARETO_SQL, {"checkpoint": checkpoint, "benchmark": benchmark}, root=root)


def _cell(value: Any, width: int = 40) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(value, date):
        text = value.isoformat()
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_cell(v, width) for v in value) + "]"
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(table: pa.Table, max_rows: int = 50) -> str:
    """A plain aligned text table (numbers right-aligned), at most ``max_rows`` rows, with a count."""
    shown = table.slice(0, max(0, max_rows)).to_pylist()
    names = table.column_names
    cells = [[_cell(row[n]) for n in names] for row in shown]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    right = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in table.schema.types]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    out = [line(names), line(["-" * w for w in widths])] + [line(r) for r in cells]
    n = table.num_rows
    out.append(f"({n} row{'s' if n != 1 else ''})" if n <= len(shown) else f"({len(shown)} of {n} rows shown)")
    return "\n".join(out)
