"""fitprune's system of record: Parquet tables under one data root, and a DuckDB catalog of views.

Usable alone: it needs pyarrow and duckdb, not torch, transformers, prefect or ``fitprune``.
Writes are append-only and idempotent (``write_rows``); reads go through pyarrow
(``read_table``) or SQL over the catalog (``query``, ``pareto``). See DESIGN.md §4.
"""

from .catalog import ReadOnlyQueryError, build_catalog, connect, format_table, pareto, query, view_names
from .root import data_root
from .store import read_table, validate, write_rows
from .tables import TABLES, get_table, schema_markdown

__all__ = [
    "ReadOnlyQueryError",
    "TABLES",
    "build_catalog",
    "connect",
    "data_root",
    "format_table",
    "get_table",
    "pareto",
    "query",
    "read_table",
    "schema_markdown",
    "validate",
    "view_names",
    "write_rows",
]
