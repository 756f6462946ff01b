"""User SQL is read-only: ``storage.catalog.query`` (and so ``pareto`` and ``fitprune sql``) runs
exactly one SELECT, on a connection that reads no file outside ``<root>/tables/`` and writes none.

Real Parquet parts and a real catalog under tmp_path. Every refused statement is checked for its
effect too: no file under the data root changed, no file outside it was created or read.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from flows.cli import main
from storage.catalog import ReadOnlyQueryError, connect_locked, pareto, query

SECRET = "TOPSECRET-4711"


def eval_row(recipe_id: str, flops_reduction: float, metric: float) -> dict:
    return dict(
        run_id="run1", recipe_id=recipe_id, checkpoint="ckA", method="fitprune", benchmark="pope", n_samples=100,
        n_failed=0, metric_name="accuracy", metric=metric, flops_reduction=flops_reduction, prefill_flops=1e12,
        wall_s=10.0, shard="0-100", versions={"fitprune": "0.1.0"},
    )


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "data"
    rows = [eval_row("r1", 0.3, 0.9), eval_row("r2", 0.6, 0.8), eval_row("r3", 0.2, 0.5)]  # r3 is dominated by r1
    storage.write_rows("evaluations", rows, root=root, write_id="w1")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)  # a completed run: only those count in the summary views
    storage.write_rows("runs", [dict(run_id="run1", flow="sweep", parameters={}, status="completed", started_at=t0,
                                     ended_at=t0, versions="{}")], root=root, write_id="run1-end")
    storage.build_catalog(root)
    # files a query must not read: outside the root, in the root but not under tables/, in a
    # sibling of tables/ whose name starts with "tables"
    for directory in (tmp_path / "outside", root, root / "tables_x"):
        directory.mkdir(exist_ok=True)
        (directory / "secret.csv").write_text(f"secret,n\n{SECRET},1\n")
    pq.write_table(pa.table({"secret": [SECRET]}), tmp_path / "outside" / "secret.parquet")
    return root


@pytest.fixture
def part(root) -> Path:
    (path,) = (root / "tables" / "evaluations").glob("part-*.parquet")
    return path


def snapshot(top: Path) -> dict[str, str]:
    """Every file under ``top`` with a hash of its bytes."""
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(top.rglob("*"))
            if p.is_file()}


def n_rows(root: Path) -> int:
    return query("SELECT count(*) AS n FROM evaluations", root=root).column("n")[0].as_py()


# --- writes -------------------------------------------------------------------------------------


def test_copy_over_a_part_is_refused_and_the_part_is_unchanged(root, part):
    before = part.read_bytes()
    sql = f"COPY (SELECT * REPLACE (0.0 AS metric) FROM evaluations) TO '{part}' (FORMAT parquet)"
    with pytest.raises(ReadOnlyQueryError, match=r"got a statement of type COPY.*only one read statement.*fitprune sql"):
        query(sql, root=root)
    assert part.read_bytes() == before
    assert sorted(query("SELECT metric FROM evaluations", root=root).column("metric").to_pylist()) == [0.5, 0.8, 0.9]


@pytest.mark.parametrize(
    "sql, target, kind",
    [
        ("COPY (SELECT 1 AS x) TO '{t}'", "outside/copied.csv", "COPY"),
        ("COPY evaluations TO '{t}' (FORMAT parquet)", "outside/copied.parquet", "COPY"),
        ("COPY (SELECT 1 AS x) TO '{t}' (FORMAT parquet)", "data/tables/evaluations/part-evil.parquet", "COPY"),
        ("EXPORT DATABASE '{t}'", "outside/exported", "EXPORT"),
        ("ATTACH '{t}' AS other", "outside/attached.duckdb", "ATTACH"),
        ("SELECT 1; COPY (SELECT 1 AS x) TO '{t}'", "outside/second.csv", "2 statements"),
    ],
)
def test_writes_anywhere_are_refused_and_create_nothing(root, tmp_path, sql, target, kind):
    target = tmp_path / target
    before = snapshot(root)
    with pytest.raises(ReadOnlyQueryError, match=kind):
        query(sql.replace("{t}", str(target)), root=root)
    assert not target.exists()
    assert snapshot(root) == before


@pytest.mark.parametrize(
    "sql, kind",
    [
        ("SELECT 1; SELECT 2", "got 2 statements .SELECT, SELECT."),
        ("SELECT count(*) FROM evaluations;; DROP VIEW evaluations", "got 2 statements .SELECT, DROP."),
        ("", "got 0 statements"),
        ("-- only a comment", "got 0 statements"),
        ("SET threads = 1", "got a statement of type SET"),
        ("SET enable_external_access = true", "got a statement of type SET"),
        ("SET lock_configuration = false", "got a statement of type SET"),
        ("RESET allowed_directories", "got a statement of type SET"),
        ("SET VARIABLE x = 1", "got a statement of type SET"),
        ("USE memory", "got a statement of type SET"),
        ("PRAGMA enable_profiling", "got a statement of type PRAGMA"),
        ("INSTALL httpfs", "got a statement of type LOAD"),
        ("LOAD httpfs", "got a statement of type LOAD"),
        ("CREATE TABLE t AS SELECT 1 AS x", "got a statement of type CREATE"),
        ("CREATE OR REPLACE VIEW evaluations AS SELECT 1 AS x", "got a statement of type CREATE"),
        ("CREATE MACRO f() AS 1", "got a statement of type CREATE"),
        ("INSERT INTO evaluations (run_id) VALUES ('x')", "got a statement of type INSERT"),
        ("UPDATE evaluations SET metric = 0", "got a statement of type UPDATE"),
        ("DELETE FROM evaluations", "got a statement of type DELETE"),
        ("DROP VIEW evaluations", "got a statement of type DROP"),
        ("ALTER VIEW evaluations RENAME TO e", "got a statement of type ALTER"),
        ("DETACH fitprune", "got a statement of type DETACH"),
        ("CHECKPOINT", "got a statement of type CALL"),
        ("CALL pragma_version()", "got a statement of type CALL"),
        ("BEGIN TRANSACTION", "got a statement of type TRANSACTION"),
        ("PREPARE p AS SELECT 1", "got a statement of type PREPARE"),
        ("VACUUM", "got a statement of type VACUUM"),
        ("EXPLAIN SELECT * FROM evaluations", "got a statement of type EXPLAIN"),
        ("EXPLAIN ANALYZE SELECT * FROM evaluations", "got a statement of type EXPLAIN"),
        ("PIVOT evaluations ON recipe_id USING max(metric)", "got a statement of type MULTI.*ON col IN"),
    ],
)
def test_statements_other_than_one_select_are_refused(root, sql, kind):
    before = snapshot(root)
    with pytest.raises(ReadOnlyQueryError, match=kind) as info:
        query(sql, root=root)
    message = str(info.value)
    assert "only one read statement is allowed (SELECT" in message and "\n" not in message
    assert snapshot(root) == before
    assert n_rows(root) == 3  # the views are all still there


# --- reads --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql, readable_unlocked",
    [
        ("SELECT * FROM read_csv('/etc/passwd')", False),
        ("SELECT * FROM read_text('/etc/passwd')", False),
        ("SELECT * FROM read_blob('/etc/passwd')", False),
        ("SELECT * FROM read_text('/proc/self/environ')", False),
        ("SELECT * FROM glob('/etc/*')", False),
        ("SELECT * FROM glob('{tmp}/outside/*')", False),
        ("SELECT * FROM glob('{tmp}/data/*')", False),
        ("SELECT * FROM read_csv('{tmp}/outside/secret.csv')", True),
        ("SELECT * FROM '{tmp}/outside/secret.csv'", True),  # replacement scan
        ("SELECT * FROM read_parquet('{tmp}/outside/secret.parquet')", True),
        ("SELECT * FROM read_text('{tmp}/outside/secret.csv')", True),
        ("SELECT * FROM sniff_csv('{tmp}/outside/secret.csv')", False),
        ("SELECT * FROM read_csv('{tmp}/data/secret.csv')", True),  # in the root, not in tables/
        ("SELECT * FROM read_csv('{tmp}/data/tables_x/secret.csv')", True),  # prefix of tables/
        ("SELECT * FROM read_csv('{tmp}/data/tables/../secret.csv')", True),  # .. out of tables/
        ("SELECT * FROM read_csv('file://{tmp}/outside/secret.csv')", False),
        ("SELECT * FROM read_parquet(['{tmp}/data/tables/evaluations/_empty.parquet', "
         "'{tmp}/outside/secret.parquet'], union_by_name = true)", True),
    ],
)
def test_reading_files_outside_the_tables_is_denied(root, tmp_path, sql, readable_unlocked):
    sql = sql.replace("{tmp}", str(tmp_path))
    if readable_unlocked:  # the file is there: an unlocked connection reads it
        con = storage.connect(root)
        try:
            assert SECRET in str(con.sql(sql).fetchall())
        finally:
            con.close()
    with pytest.raises(duckdb.PermissionException, match="disabled by configuration") as info:
        query(sql, root=root)
    assert SECRET not in str(info.value)


def test_etc_passwd_content_is_not_returned(root):
    with pytest.raises(duckdb.Error) as info:
        query("SELECT content FROM read_text('/etc/passwd')", root=root)
    assert "root:" not in str(info.value)


def test_getenv_does_not_exist(root):
    with pytest.raises(duckdb.CatalogException, match="getenv"):
        query("SELECT getenv('HOME')", root=root)


def test_the_lock_holds_without_the_statement_check(root, tmp_path, part):
    """The second layer alone: a connect_locked connection runs what it is given, but DuckDB's
    settings stop it reading or writing outside the tables and undoing the settings.
    (allowed_directories allows writing too: only the one-SELECT check keeps COPY out of tables/.)"""
    con = connect_locked(root)
    try:
        settings = dict(con.sql(
            "SELECT name, value FROM duckdb_settings() WHERE name IN "
            "('enable_external_access', 'lock_configuration', 'autoload_known_extensions', 'allowed_directories')"
        ).fetchall())
        assert settings["enable_external_access"] == "false" and settings["lock_configuration"] == "true"
        assert settings["autoload_known_extensions"] == "false"
        assert f"{root}/tables/" in settings["allowed_directories"]
        for undo in ["SET enable_external_access = true", "RESET enable_external_access",
                     "SET lock_configuration = false", f"SET allowed_directories = ['{tmp_path}']",
                     "SET temp_directory = '/tmp'"]:
            with pytest.raises(duckdb.InvalidInputException, match="configuration has been locked"):
                con.execute(undo)
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"COPY (SELECT 1 AS x) TO '{tmp_path}/outside/locked.csv'")
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"ATTACH '{tmp_path}/outside/locked.duckdb' AS x")
        with pytest.raises(duckdb.Error):
            con.execute("LOAD httpfs")
        with pytest.raises(duckdb.InvalidInputException, match="read-only"):
            con.execute("CREATE VIEW fitprune.v AS SELECT 1")
        assert con.sql("SELECT count(*) FROM evaluations").fetchall() == [(3,)]
    finally:
        con.close()
    assert not (tmp_path / "outside" / "locked.csv").exists()
    assert not (tmp_path / "outside" / "locked.duckdb").exists()


def test_the_lock_does_not_leak_into_other_connections_of_the_process(root, tmp_path):
    """DuckDB shares one instance per file within a process; the locked connection must not be it."""
    outside = f"SELECT * FROM read_csv('{tmp_path}/outside/secret.csv')"
    with storage.connect(root) as held:  # held open across the user queries
        assert n_rows(root) == 3
        with pytest.raises(duckdb.PermissionException):
            query(outside, root=root)
        assert SECRET in str(held.sql(outside).fetchall())
        assert held.sql("SELECT current_setting('enable_external_access')").fetchall() == [(True,)]
    with storage.connect(root) as fresh:
        assert SECRET in str(fresh.sql(outside).fetchall())
    with storage.connect(root, read_only=False) as writer:  # same file, another configuration: still opens
        assert writer.sql("SELECT count(*) FROM evaluations").fetchall() == [(3,)]


# --- what still works ---------------------------------------------------------------------------


def test_select_over_a_view_with_a_bound_parameter(root):
    got = query("SELECT recipe_id, metric FROM evaluations WHERE flops_reduction >= $f ORDER BY recipe_id",
                {"f": 0.3}, root=root).to_pylist()
    assert got == [{"recipe_id": "r1", "metric": 0.9}, {"recipe_id": "r2", "metric": 0.8}]
    assert query("SELECT count(*) AS n FROM evaluations WHERE recipe_id = $r", {"r": "r1' OR '1'='1"},
                 root=root).column("n")[0].as_py() == 0


@pytest.mark.parametrize(
    "sql, expected_rows",
    [
        ("SELECT 1 AS x;", 1),
        ("WITH e AS (SELECT * FROM evaluations) SELECT * FROM e", 3),
        ("FROM evaluation_summary", 3),
        ("VALUES (1), (2)", 2),
        ("DESCRIBE evaluations", len(storage.TABLES["evaluations"].names)),
        ("SUMMARIZE evaluations", len(storage.TABLES["evaluations"].names)),
        ("PIVOT evaluations ON recipe_id IN ('r1', 'r2') USING max(metric) GROUP BY benchmark", 1),
        ("SELECT * FROM glob('{root}/tables/evaluations/*.parquet')", 2),  # the part and _empty.parquet
    ],
)
def test_other_reads_run(root, sql, expected_rows):
    assert query(sql.replace("{root}", str(root)), root=root).num_rows == expected_rows


def test_a_syntax_error_is_duckdbs_parser_error(root):
    with pytest.raises(duckdb.ParserException, match="syntax error"):
        query("SELEC 1", root=root)


def test_pareto_still_works(root):
    front = pareto(root).to_pylist()
    assert [(r["recipe_id"], r["flops_reduction"], r["metric"]) for r in front] == [("r1", 0.3, 0.9), ("r2", 0.6, 0.8)]
    assert pareto(root, checkpoint="ckB").num_rows == 0


def test_query_rebuilds_a_missing_catalog(root):
    storage.catalog.catalog_path(root).unlink()
    assert n_rows(root) == 3
    assert storage.catalog.catalog_path(root).exists()


# --- fitprune sql -------------------------------------------------------------------------------


def test_cli_refusal_is_one_line_and_exit_1(root, part, capsys):
    before = part.read_bytes()
    code = main(["--data-root", str(root), "sql", f"COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet)"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fitprune sql: got a statement of type COPY; only one read statement")
    assert "Traceback" not in err
    assert part.read_bytes() == before


def test_cli_denied_read_is_a_duckdb_error(root, tmp_path, capsys):
    code = main(["--data-root", str(root), "sql", f"SELECT * FROM read_csv('{tmp_path}/outside/secret.csv')"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and SECRET not in err
    assert err.startswith("fitprune sql: Permission Error: Cannot access file")
    assert err.splitlines()[-1].startswith("views: ") and "Traceback" not in err


def test_cli_select_prints_the_table(root, capsys):
    code = main(["--data-root", str(root), "sql", "SELECT recipe_id FROM evaluations ORDER BY recipe_id"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert out.split() == ["recipe_id", "---------", "r1", "r2", "r3", "(3", "rows)"]
