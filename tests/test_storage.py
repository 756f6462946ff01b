"""storage: schemas, append-only idempotent writes, the DuckDB catalog and its views, Pareto SQL.

Everything runs on real Parquet and DuckDB files under tmp_path; no torch needed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import storage
from storage import catalog
from storage.tables import TABLES

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "data"


def eval_row(**kw) -> dict:
    row = dict(
        run_id="run1",
        recipe_id="r1",
        checkpoint="ckA",
        method="fitprune",
        benchmark="pope",
        n_samples=100,
        n_failed=0,
        metric_name="accuracy",
        metric=0.5,
        flops_reduction=0.5,
        prefill_flops=1e12,
        wall_s=10.0,
        shard="0-100",
        versions={"fitprune": "0.1.0"},
    )
    row.update(kw)
    return row


def one_row_per_table() -> dict[str, dict]:
    return {
        "calibration_sets": dict(
            calib_id="c1", source="tiny", split="train", n_samples=2, seed=0, content_hash="h", sample_ids=["a", "b"]
        ),
        "stats_token": dict(checkpoint="ckA", calib_id="c1", sample="a", layer=2, token=5, cross=0.25, self=0.5),
        "stats_layer": dict(
            checkpoint="ckA", calib_id="c1", sample="a", layer=2, cross_mass=1.0, self_mass=2.0,
            n_system=35, n_visual=576, n_text=20, n_alive=576,
        ),
        "recipes": dict(
            recipe_id="r1", checkpoint="ckA", family="llava", method="fitprune", scoring="fitprune", budget=0.6,
            flops_convention="paper", alpha=0.03, predicted_reduction=0.61, drop_fractions=[0.0, 0.5, 0.25],
            recipe_json=json.dumps({"layers": 3}), run_id="run1",
        ),
        "evaluations": eval_row(),
        "predictions": dict(run_id="run1", recipe_id="r1", checkpoint="ckA", method="fitprune", benchmark="easy-vqa:test",
                            shard="0-1", sample_id="q1", question="what color is the shape?", prediction=None,
                            answers=["red"], error="missing image: /x.png"),
        "runs": dict(run_id="run1", flow="sweep", parameters={"budgets": [0.6]}, status="completed",
                     started_at=T0, ended_at=T0, versions="{}"),
        "benchmarks": dict(run_id="run1", gpu="H100", config={"batch": 1}, metric="prefill_ms", value=12.5,
                           ratio_vs_unpruned=0.5, flops_ratio=0.4, versions="{}"),
    }


def completed(root: Path, *run_ids: str, ended_at: datetime = T0) -> None:
    """The runs rows of completed runs: only their evaluations count in evaluation_summary and pareto."""
    for run_id in run_ids:
        storage.write_rows("runs", [dict(one_row_per_table()["runs"], run_id=run_id, ended_at=ended_at)], root=root,
                           write_id=f"{run_id}-end")


def populate(root: Path) -> None:
    for name, row in one_row_per_table().items():
        storage.write_rows(name, [row], root=root, write_id=f"populate-{name}")


# --- root and ids --------------------------------------------------------------------------------


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("FITPRUNE_DATA", raising=False)
    assert storage.data_root() == Path("~/.cache/fitprune").expanduser().resolve()
    monkeypatch.setenv("FITPRUNE_DATA", str(tmp_path / "env"))
    assert storage.data_root() == tmp_path / "env"
    assert storage.data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("FITPRUNE_DATA", "")
    assert storage.data_root() == Path("~/.cache/fitprune").expanduser().resolve()


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a b", "-x", ".hidden", "x" * 201, "é", None])
def test_write_id_rejected(root, bad):
    with pytest.raises(ValueError, match="write_id"):
        storage.write_rows("evaluations", [eval_row()], root=root, write_id=bad)


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        ({"bogus": 1}, ValueError, r"unknown column.*bogus"),
        ({"metric": "high"}, TypeError, r"evaluations\.metric: row 0 has 'high'"),
        ({"n_samples": 2**40}, TypeError, r"evaluations\.n_samples"),
        ({"n_samples": 1.5}, TypeError, r"evaluations\.n_samples"),
        ({"benchmark": None}, ValueError, r"evaluations\.benchmark: row 0 is null"),
        ({"versions": "{not json"}, ValueError, r"evaluations\.versions: row 0 is not valid JSON"),
    ],
)
def test_validation_names_the_column(root, change, error, pattern):
    with pytest.raises(error, match=pattern):
        storage.write_rows("evaluations", [eval_row(**change)], root=root, write_id="w")
    assert storage.read_table("evaluations", root).num_rows == 0


def test_validation_missing_and_unknown(root):
    row = eval_row()
    del row["metric"]
    with pytest.raises(ValueError, match=r"missing required column 'metric'"):
        storage.validate("evaluations", [row])
    with pytest.raises(KeyError, match=r"unknown table 'evals'; known tables: benchmarks, calibration_sets"):
        storage.validate("evals", [row])
    with pytest.raises(TypeError, match="list of dicts or a pyarrow Table"):
        storage.validate("evaluations", "rows")
    layer = dict(one_row_per_table()["stats_token"], layer=40_000)
    with pytest.raises(TypeError, match=r"stats_token\.layer: row 0 has 40000"):
        storage.validate("stats_token", [layer])


def test_validation_of_arrow_input():
    good = storage.validate("evaluations", [eval_row()])
    assert good.schema == TABLES["evaluations"].schema
    # compatible types are cast safely; a lossy cast names the column
    loose = good.set_column(good.schema.get_field_index("n_samples"), "n_samples", pa.array([100], pa.int64()))
    assert storage.validate("evaluations", loose).column("n_samples").type == pa.int32()
    bad = good.set_column(good.schema.get_field_index("metric"), "metric", pa.array(["x"]))
    with pytest.raises(TypeError, match=r"evaluations\.metric: cannot store string as double"):
        storage.validate("evaluations", bad)
    with pytest.raises(ValueError, match=r"unknown column.*extra"):
        storage.validate("evaluations", good.append_column("extra", pa.array([1])))
    batch = good.to_batches()[0]
    assert storage.validate("evaluations", batch).num_rows == 1


def test_validation_fills_defaults_and_serialises_json():
    row = one_row_per_table()["recipes"]
    del row["alpha"]
    t = storage.validate("recipes", [row])
    assert t.column("alpha").to_pylist() == [None]
    assert t.column("created_at").type == pa.timestamp("us", tz="UTC")
    assert abs((datetime.now(timezone.utc) - t.column("created_at")[0].as_py()).total_seconds()) < 60
    runs = storage.validate("runs", [one_row_per_table()["runs"]])
    assert runs.column("parameters").to_pylist() == ['{"budgets": [0.6]}']
    assert runs.column("ended_at").to_pylist()[0] == T0


def test_partitions(root):
    rows = [one_row_per_table()["stats_token"]]
    path = storage.write_rows("stats_token", rows, root=root, write_id="w1")
    assert path.parent == root / "tables/stats_token/checkpoint=ckA/calib_id=c1"
    slashed = [dict(rows[0], checkpoint="org/model@abc def")]
    path = storage.write_rows("stats_token", slashed, root=root, write_id="w2")
    assert path.parent.parent.name == "checkpoint=org%2Fmodel%40abc%20def"
    with pytest.raises(ValueError, match="partition checkpoint='ckB' but rows have checkpoint='ckA'"):
        storage.write_rows("stats_token", rows, root=root, write_id="w3", partition={"checkpoint": "ckB"})
    mixed = rows + [dict(rows[0], checkpoint="ckB")]
    with pytest.raises(ValueError, match="2 values of partition column 'checkpoint'"):
        storage.write_rows("stats_token", mixed, root=root, write_id="w4")
    with pytest.raises(ValueError, match="not partitioned"):
        storage.write_rows("evaluations", [eval_row()], root=root, write_id="w5", partition={"checkpoint": "ckA"})
    got = storage.query("SELECT checkpoint FROM stats_token ORDER BY checkpoint", root=root)
    assert got.column(0).to_pylist() == ["ckA", "org/model@abc def"]  # hive values decode to the file's
    assert storage.read_table("stats_token", root, filters={"checkpoint": "org/model@abc def"}).num_rows == 1


# --- writes and reads ----------------------------------------------------------------------------


def test_roundtrip_every_table(root):
    populate(root)
    for name, row in one_row_per_table().items():
        got = storage.read_table(name, root)
        assert got.schema == TABLES[name].schema, name
        assert got.num_rows == 1, name
        back = got.to_pylist()[0]
        for key, value in row.items():
            if TABLES[name].column(key).json and not isinstance(value, str):
                value = json.dumps(value, sort_keys=True)
            assert back[key] == (pytest.approx(value) if isinstance(value, float) else value), (name, key)
        via_sql = storage.query(f'SELECT * FROM "{name}"', root=root)
        assert via_sql.column_names == TABLES[name].names and via_sql.num_rows == 1


def test_read_table_empty_and_filters(root):
    assert storage.read_table("recipes", root).schema == TABLES["recipes"].schema
    rows = [eval_row(recipe_id=f"r{i}", benchmark=["pope", "gqa"][i % 2], metric=i / 10) for i in range(6)]
    storage.write_rows("evaluations", rows, root=root, write_id="w")
    assert storage.read_table("evaluations", root, filters={"benchmark": "gqa"}).num_rows == 3
    got = storage.read_table("evaluations", root, filters={"recipe_id": ["r0", "r1", "zz"], "benchmark": "pope"})
    assert got.column("recipe_id").to_pylist() == ["r0"]
    assert storage.read_table("evaluations", root, filters=ds.field("metric") > 0.35).num_rows == 2
    with pytest.raises(ValueError, match="unknown column 'bench'"):
        storage.read_table("evaluations", root, filters={"bench": "gqa"})


def test_idempotent_retry(root):
    first = storage.write_rows("evaluations", [eval_row(), eval_row(shard="100-200")], root=root, write_id="task-7")
    mtime = first.stat().st_mtime_ns
    again = storage.write_rows("evaluations", [eval_row(metric=0.9)], root=root, write_id="task-7")
    assert again == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir() if p.name.startswith("part-")] == ["part-task-7.parquet"]
    assert storage.read_table("evaluations", root).num_rows == 2
    assert storage.query("SELECT count(*) FROM evaluations", root=root).column(0)[0].as_py() == 2
    assert not list(first.parent.glob(".*.tmp"))


def test_zero_row_writes_and_stale_catalog_builds(root):
    assert storage.write_rows("evaluations", [], root=root, write_id="nothing").exists()
    assert storage.read_table("evaluations", root).num_rows == 0
    with pytest.raises(ValueError, match="pass partition="):
        storage.write_rows("stats_token", [], root=root, write_id="x")
    part = {"checkpoint": "ckA", "calib_id": "c1"}
    assert storage.write_rows("stats_token", [], root=root, write_id="x", partition=part).exists()
    old = time.time() - 2 * 3600
    stale, live = root / ".catalog.1-dead.duckdb.tmp", root / ".catalog.2-live.duckdb.tmp"
    for path in (stale, live):
        path.write_bytes(b"")
    os.utime(stale, (old, old))
    storage.build_catalog(root)
    assert not stale.exists() and live.exists()


_KILLED_WRITER = """
import os, signal, sys
import storage
from storage import store
real = store.pq.write_table
def write_half_then_die(table, where, **kw):
    real(table, where, **kw)
    with open(where, "r+b") as f:
        f.truncate(os.path.getsize(where) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
store.pq.write_table = write_half_then_die
rows = [dict(run_id="run1", recipe_id=f"r{i}", checkpoint="ckA", method="m", benchmark="pope", n_samples=1,
             n_failed=0, metric_name="accuracy", metric=0.5, flops_reduction=0.5, prefill_flops=1.0, wall_s=1.0,
             shard="0-1", versions="{}") for i in range(1000)]
storage.write_rows("evaluations", rows, root=sys.argv[1], write_id="killed")
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env, **kw)


def test_interrupted_write_leaves_readers_unaffected(root):
    storage.write_rows("evaluations", [eval_row()], root=root, write_id="before")
    completed(root, "run1")
    proc = _python(_KILLED_WRITER, str(root))
    assert proc.wait(timeout=60) == -signal.SIGKILL
    directory = root / "tables/evaluations"
    leftovers = list(directory.glob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".part-killed.parquet.")
    assert not (directory / "part-killed.parquet").exists()
    assert storage.read_table("evaluations", root).num_rows == 1
    assert storage.query("SELECT count(*) FROM evaluations", root=root).column(0)[0].as_py() == 1
    assert storage.pareto(root).num_rows == 1
    # a fresh .tmp may belong to a live writer: kept; an hour-old one is cleaned by the next write
    storage.write_rows("evaluations", [eval_row(shard="1")], root=root, write_id="retry-1")
    assert leftovers[0].exists()
    old = time.time() - 2 * 3600
    os.utime(leftovers[0], (old, old))
    storage.write_rows("evaluations", [eval_row(shard="2")], root=root, write_id="retry-2")
    assert not leftovers[0].exists()
    assert storage.read_table("evaluations", root).num_rows == 3


_WRITER = """
import sys
import storage
root, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    # every other write id is shared by both writers: exactly one copy of it may land
    wid = f"shared-{i}" if i % 2 else f"{who}-{i}"
    rows = [dict(run_id=wid, recipe_id=f"r{j}", checkpoint="ckA", method="m", benchmark="pope", n_samples=1,
                 n_failed=0, metric_name="accuracy", metric=j / 5, flops_reduction=j / 5, prefill_flops=1.0,
                 wall_s=1.0, shard="0-1", versions="{}") for j in range(5)]
    storage.write_rows("evaluations", rows, root=root, write_id=wid)
"""

_REBUILDER = """
import sys
import storage
for _ in range(int(sys.argv[2])):
    storage.build_catalog(sys.argv[1])
"""


def test_concurrent_writers_lose_nothing_and_readers_never_fail(root):
    storage.build_catalog(root)
    n = 40
    procs = [_python(_WRITER, str(root), who, str(n)) for who in ("a", "b")]
    procs.append(_python(_REBUILDER, str(root), "15"))
    counts = []
    while any(p.poll() is None for p in procs) or len(counts) < 3:
        got = storage.query("SELECT count(*) AS n, count(DISTINCT run_id) AS runs FROM evaluations", root=root)
        counts.append(got.column("n")[0].as_py())
        assert counts[-1] == 5 * got.column("runs")[0].as_py()  # whole files only, never partial
        storage.pareto(root)
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert counts == sorted(counts), "a reader saw rows disappear"
    expected_ids = {f"a-{i}" for i in range(0, n, 2)} | {f"b-{i}" for i in range(0, n, 2)} | {
        f"shared-{i}" for i in range(1, n, 2)
    }
    final = storage.read_table("evaluations", root)
    assert final.num_rows == 5 * len(expected_ids)
    assert set(final.column("run_id").to_pylist()) == expected_ids
    assert storage.query("SELECT count(*) FROM evaluations", root=root).column(0)[0].as_py() == final.num_rows
    leftovers = list((root / "tables/evaluations").glob(".*.tmp")) + list(root.glob(".catalog*"))
    assert leftovers == []
    print(f"\nreader ran {len(counts)} catalog queries during the writes")


# --- catalog and views ---------------------------------------------------------------------------


def test_every_view_loads_on_empty_and_populated_root(root):
    names = storage.view_names()
    assert {"evaluation_summary", "pareto", "recipes_latest", "runs_latest", "stats_coverage"} <= set(names)
    for name in names:
        storage.query(f'SELECT * FROM "{name}"', root=root)
    populate(root)
    for name in names:
        got = storage.query(f'SELECT * FROM "{name}"', root=root)
        assert got.num_rows == 1, name
    cov = storage.query("SELECT n_samples, n_expected, complete FROM stats_coverage", root=root).to_pylist()
    assert cov == [{"n_samples": 1, "n_expected": 2, "complete": False}]


def test_catalog_is_views_only_and_rebuilds_when_missing_or_stale(root, tmp_path):
    populate(root)
    path = storage.build_catalog(root)
    con = storage.connect(root)
    try:
        kinds = con.execute("SELECT table_type, count(*) FROM information_schema.tables GROUP BY ALL").fetchall()
    finally:
        con.close()
    assert kinds == [("VIEW", len(storage.view_names()))]
    path.unlink()
    assert storage.query("SELECT count(*) FROM recipes", root=root).column(0)[0].as_py() == 1
    path.write_bytes(b"not a duckdb file")
    assert storage.query("SELECT count(*) FROM recipes", root=root).column(0)[0].as_py() == 1
    moved = tmp_path / "moved data"  # a moved root (and a path with a space) gets a new catalog
    root.rename(moved)
    assert storage.query("SELECT root FROM catalog_info", root=moved).column(0)[0].as_py() == str(moved)
    assert storage.query("SELECT count(*) FROM recipes", root=moved).column(0)[0].as_py() == 1


def test_root_paths_are_quoted_or_refused(tmp_path):
    quoted = tmp_path / "it's data"
    storage.write_rows("evaluations", [eval_row()], root=quoted, write_id="w")
    assert storage.query("SELECT count(*) FROM evaluations", root=quoted).column(0)[0].as_py() == 1
    with pytest.raises(ValueError, match="file pattern"):
        storage.build_catalog(tmp_path / "data[1]")


def test_old_files_without_a_new_column_read_as_null(root):
    storage.write_rows("recipes", [one_row_per_table()["recipes"]], root=root, write_id="new")
    old_schema = pa.schema([f for f in TABLES["recipes"].schema if f.name != "alpha"])
    old = storage.validate("recipes", [dict(one_row_per_table()["recipes"], recipe_id="old")]).drop_columns(["alpha"])
    pq.write_table(old.cast(old_schema), root / "tables/recipes/part-old.parquet")
    sql = storage.query("SELECT recipe_id, alpha FROM recipes ORDER BY recipe_id", root=root).to_pylist()
    assert sql == [{"recipe_id": "old", "alpha": None}, {"recipe_id": "r1", "alpha": 0.03}]
    arrow = storage.read_table("recipes", root, filters={"recipe_id": "old"})
    assert arrow.column("alpha").to_pylist() == [None]


def test_evaluation_summary_combines_shards(root):
    rows = [
        eval_row(shard="0-100", n_samples=100, metric=0.5, flops_reduction=0.40),
        eval_row(shard="100-400", n_samples=300, n_failed=100, metric=0.9, flops_reduction=0.60),
        eval_row(recipe_id="none", method="none", metric=0.8, flops_reduction=0.0),
    ]
    storage.write_rows("evaluations", rows, root=root, write_id="w1")
    # the same shard again under another write id (a retried task with a new id): counted once
    storage.write_rows("evaluations", [rows[0]], root=root, write_id="w2")
    storage.write_rows("recipes", [one_row_per_table()["recipes"]], root=root, write_id="rec")
    completed(root, "run1")
    got = {r["recipe_id"]: r for r in storage.query("SELECT * FROM evaluation_summary", root=root).to_pylist()}
    # weighted by scored samples: 100 of the first shard, 200 of the second
    assert got["r1"]["metric"] == pytest.approx((100 * 0.5 + 200 * 0.9) / 300)
    assert got["r1"]["flops_reduction"] == pytest.approx((100 * 0.4 + 200 * 0.6) / 300)
    assert (got["r1"]["n_samples"], got["r1"]["n_scored"], got["r1"]["n_shards"], got["r1"]["budget"]) == (
        400, 300, 2, 0.6)
    assert got["none"]["budget"] is None and got["none"]["method"] == "none"


def _prediction(i: int, score, **kw) -> dict:
    return dict(dict(one_row_per_table()["predictions"], sample_id=f"q{i}", prediction=None if score is None else "x",
                     error="missing image" if score is None else None, score=score), **kw)


def test_summary_stderr_and_flops_come_from_the_samples(root):
    """The standard error is the per-sample scores' (ddof 1, over scored samples; VQA scores are not 0/1),
    and the FLOPs reduction is total executed over total unpruned FLOPs across shards."""
    scores = [[1.0, 0.3, 0.6, None], [0.0, 1.0, 0.9, 0.3, 0.6, 1.0]]
    for k, shard in enumerate(scores):
        preds = [_prediction(10 * k + i, v, shard=str(k), benchmark="textvqa", eval_set="e1")
                 for i, v in enumerate(shard)]
        storage.write_rows("predictions", preds, root=root, write_id=f"p{k}")
        ran = [v for v in shard if v is not None]
        storage.write_rows("evaluations", [eval_row(
            benchmark="textvqa", eval_set="e1", metric_name="vqa_accuracy", shard=str(k), n_samples=len(shard),
            n_failed=len(shard) - len(ran), metric=sum(ran) / len(ran), prefill_flops=[2.0, 6.0][k],
            prefill_flops_full=[10.0, 10.0][k], flops_reduction=[0.8, 0.4][k])], root=root, write_id=f"e{k}")
    completed(root, "run1")
    (row,) = storage.query("SELECT * FROM evaluation_summary", root=root).to_pylist()
    values = np.array([v for shard in scores for v in shard if v is not None])
    assert row["n_scored"] == 9 and row["n_failed"] == 1
    assert row["metric"] == pytest.approx(values.mean())
    assert row["stderr"] == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)))
    assert row["flops_reduction"] == pytest.approx(1 - (3 * 2.0 + 6 * 6.0) / (3 * 10.0 + 6 * 10.0))


def test_only_the_latest_completed_run_counts_and_runs_are_never_pooled(root):
    """Issue 16, defect 2: a killed run (start row only), a failed run and two completed runs on the same
    questions. The summary is the latest completed run's rows alone; the others show in run_evaluations."""
    later = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for run_id, metric in (("killed", 0.1), ("failed", 0.2), ("old", 0.3), ("new", 0.4)):
        storage.write_rows("evaluations", [eval_row(run_id=run_id, metric=metric, eval_set="e1")], root=root,
                           write_id=run_id)
    run = one_row_per_table()["runs"]
    storage.write_rows("runs", [dict(run, run_id="killed", status="running", ended_at=None)], root=root,
                       write_id="killed-start")
    storage.write_rows("runs", [dict(run, run_id="failed", status="failed", ended_at=later, error="boom")],
                       root=root, write_id="failed-end")
    completed(root, "old", ended_at=T0)
    completed(root, "new", ended_at=later)
    (row,) = storage.query("SELECT * FROM evaluation_summary", root=root).to_pylist()
    assert (row["run_id"], row["metric"], row["n_samples"], row["n_runs"]) == ("new", 0.4, 100, 2)
    assert [r["run_id"] for r in storage.pareto(root).to_pylist()] == ["new"]
    every = storage.query("SELECT run_id, status FROM run_evaluations ORDER BY run_id", root=root).to_pylist()
    assert every == [{"run_id": "failed", "status": "failed"}, {"run_id": "killed", "status": "running"},
                     {"run_id": "new", "status": "completed"}, {"run_id": "old", "status": "completed"}]
    # another sample set of the same benchmark is another row, and another front
    storage.write_rows("evaluations", [eval_row(run_id="new", metric=0.9, eval_set="e2", n_samples=50)], root=root,
                       write_id="new-e2")
    summary = storage.query("SELECT eval_set, metric FROM evaluation_summary ORDER BY eval_set", root=root).to_pylist()
    assert summary == [{"eval_set": "e1", "metric": 0.4}, {"eval_set": "e2", "metric": 0.9}]
    assert sorted(r["eval_set"] for r in storage.pareto(root).to_pylist()) == ["e1", "e2"]


def test_front_treats_reductions_within_a_tenth_of_a_point_as_ties(root):
    """Issue 16, defect 4: a worse recipe fitted to the same budget does not join the front by a hair of FLOPs."""
    rows = [eval_row(recipe_id="none", method="none", flops_reduction=0.0, metric=0.9),
            eval_row(recipe_id="better", flops_reduction=0.69879, metric=0.6),
            eval_row(recipe_id="worse", flops_reduction=0.69883, metric=0.5),
            eval_row(recipe_id="twin", flops_reduction=0.69881, metric=0.6),  # an exact tie stays
            eval_row(recipe_id="further", flops_reduction=0.7012, metric=0.4),  # clearly more FLOPs removed
            # measured on the H200 (synthetic test, budget 0.5): pyramid −0.4994 at 0.574, fitprune-paper −0.5001
            # at 0.518; rounding both to three decimals would have put the worse one on the front
            eval_row(benchmark="synthetic", recipe_id="none", method="none", flops_reduction=0.0, metric=0.578),
            eval_row(benchmark="synthetic", recipe_id="pyramid", flops_reduction=0.4994, metric=0.574),
            eval_row(benchmark="synthetic", recipe_id="paper", flops_reduction=0.5001, metric=0.518)]
    storage.write_rows("evaluations", rows, root=root, write_id="w")
    completed(root, "run1")
    front = [r["recipe_id"] for r in storage.pareto(root, benchmark="pope").to_pylist()]
    assert front == ["none", "better", "twin", "further"]
    assert [r["recipe_id"] for r in storage.pareto(root, benchmark="synthetic").to_pylist()] == ["none", "pyramid"]


def test_recipes_latest_and_runs_latest(root):
    base = one_row_per_table()["recipes"]
    storage.write_rows("recipes", [dict(base, recipe_id="old", created_at=T0)], root=root, write_id="a")
    later = datetime(2026, 2, 1, tzinfo=timezone.utc)
    storage.write_rows("recipes", [dict(base, recipe_id="new", created_at=later)], root=root, write_id="b")
    got = storage.query("SELECT recipe_id, n_fits FROM recipes_latest", root=root).to_pylist()
    assert got == [{"recipe_id": "new", "n_fits": 2}]
    run = one_row_per_table()["runs"]
    storage.write_rows("runs", [dict(run, status="running", ended_at=None)], root=root, write_id="start")
    storage.write_rows("runs", [dict(run, status="completed", ended_at=later)], root=root, write_id="end")
    assert storage.query("SELECT status FROM runs_latest", root=root).column(0).to_pylist() == ["completed"]


# --- Pareto --------------------------------------------------------------------------------------


TIE = 0.001  # FLOPs reductions this close are ties (storage/sql/pareto.sql)


def brute_force_front(points: list[tuple]) -> set:
    """The definition, quadratic: (key, f, m) not dominated by another point, where q dominates p iff
    q is as good in FLOPs up to a tie and better in metric, or clearly better in FLOPs and as good in metric."""
    finite = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2])]
    return {
        k
        for k, f, m in finite
        if not any((f2 >= f - TIE and m2 > m) or (f2 >= f + TIE and m2 >= m) for _, f2, m2 in finite)
    }


def random_evaluations(seed: int, per_group: int = 60) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for ck in ("ckA", "ckB"):
        for bench, metrics in (("pope", ["accuracy", "f1"]), ("gqa", ["accuracy"])):
            for metric_name in metrics:
                rows.append(eval_row(checkpoint=ck, benchmark=bench, metric_name=metric_name, recipe_id="none",
                                     method="none", flops_reduction=0.0, metric=0.75))
                for i in range(per_group):
                    # coarse grids force ties in both coordinates
                    f, m = rng.integers(0, 8) / 8, rng.integers(0, 16) / 16
                    kw = dict(checkpoint=ck, benchmark=bench, metric_name=metric_name, recipe_id=f"r{i}",
                              method=str(rng.choice(["fitprune", "fastv", "random"])), flops_reduction=f)
                    if rng.random() < 0.3:  # two shards of different size and metric
                        rows.append(eval_row(**kw, shard="0-50", n_samples=50, metric=m))
                        rows.append(eval_row(**kw, shard="50-150", n_samples=100, metric=rng.integers(0, 16) / 16))
                    else:
                        rows.append(eval_row(**kw, metric=m))
                    if rng.random() < 0.15:  # an exact duplicate point under another recipe
                        rows.append(eval_row(**dict(kw, recipe_id=f"dup{i}"), metric=m))
                rows.append(eval_row(checkpoint=ck, benchmark=bench, metric_name=metric_name, recipe_id="nan",
                                     flops_reduction=1.0, metric=float("nan")))
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_pareto_matches_brute_force(root, seed):
    rows = random_evaluations(seed)
    storage.write_rows("evaluations", rows, root=root, write_id=f"seed{seed}")
    completed(root, "run1")
    summary = storage.query("SELECT * FROM evaluation_summary", root=root).to_pylist()
    groups: dict[tuple, list] = {}
    for r in summary:
        groups.setdefault((r["checkpoint"], r["benchmark"], r["metric_name"]), []).append(
            (r["recipe_id"], r["flops_reduction"], r["metric"])
        )
    expected = {(*g, k) for g, pts in groups.items() for k in brute_force_front(pts)}
    front = storage.pareto(root).to_pylist()
    got = [(r["checkpoint"], r["benchmark"], r["metric_name"], r["recipe_id"]) for r in front]
    assert len(got) == len(set(got))
    assert set(got) == expected
    assert any(k.startswith("dup") for *_, k in expected) or seed != 0  # duplicates do reach the front
    sub = storage.pareto(root, checkpoint="ckB", benchmark="gqa").to_pylist()
    assert {r["recipe_id"] for r in sub} == {k for c, b, m, k in expected if (c, b) == ("ckB", "gqa")}
    assert storage.pareto(root, checkpoint="x' OR '1'='1").num_rows == 0  # bound, not formatted


def test_pareto_timing_200k(root):
    n = 200_000
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 4, n)
    data = pa.table({
        "run_id": pa.array(["run1"] * n),
        "recipe_id": pa.array([f"r{i}" for i in range(n)]),
        "checkpoint": pa.array(np.where(groups < 2, "ckA", "ckB")),
        "method": pa.array(["fitprune"] * n),
        "benchmark": pa.array(np.where(groups % 2 == 0, "pope", "gqa")),
        "n_samples": pa.array(rng.integers(1, 500, n), pa.int32()),
        "n_failed": pa.array(np.zeros(n, np.int32)),
        "metric_name": pa.array(["accuracy"] * n),
        "metric": pa.array(np.round(rng.random(n), 3)),
        "flops_reduction": pa.array(np.round(rng.random(n), 3)),
        "prefill_flops": pa.array(rng.random(n) * 1e12),
        "wall_s": pa.array(rng.random(n)),
        "shard": pa.array(["0-500"] * n),
        "versions": pa.array(["{}"] * n),
    })
    storage.write_rows("evaluations", data, root=root, write_id="big")
    completed(root, "run1")
    storage.build_catalog(root)
    con = storage.connect(root)
    try:
        start = time.perf_counter()
        front = con.sql("SELECT * FROM pareto").to_arrow_table()
        elapsed = time.perf_counter() - start
    finally:
        con.close()
    print(f"\npareto over {n} evaluation rows: {elapsed * 1000:.0f} ms, {front.num_rows} rows on the fronts")
    # on a front sorted by flops_reduction, metric strictly falls (equal metrics only within a FLOPs tie)
    for g in front.group_by(["checkpoint", "benchmark"]).aggregate([]).to_pylist():
        pts = sorted(
            (r["flops_reduction"], r["metric"])
            for r in front.to_pylist()
            if (r["checkpoint"], r["benchmark"]) == (g["checkpoint"], g["benchmark"])
        )
        assert all((a[1] == b[1] and b[0] - a[0] <= TIE + 1e-9) or (a[0] < b[0] and a[1] > b[1])
                   for a, b in zip(pts, pts[1:]))


# --- formatting and imports ----------------------------------------------------------------------


def test_format_table():
    t = pa.table({"name": ["a", None, "x" * 60], "value": [1.5, 22.25, None], "n": [1, 20, 300]})
    text = storage.format_table(t)
    lines = text.splitlines()
    assert lines[0] == "name" + " " * 36 + "  value    n"
    assert lines[2].endswith("  1.5    1") and lines[3].startswith("NULL ")
    assert "…" in lines[4] and lines[-1] == "(3 rows)"
    assert storage.format_table(t, max_rows=1).splitlines()[-1] == "(1 of 3 rows shown)"
    assert storage.format_table(t.slice(0, 0)).splitlines()[-1] == "(0 rows)"


def test_storage_imports_nothing_heavy():
    code = (
        "import sys, storage; heavy = [m for m in ('torch', 'transformers', 'prefect', 'fitprune') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    proc = _python(code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()


def test_schema_markdown_lists_every_column():
    md = storage.schema_markdown()
    for spec in TABLES.values():
        assert f"### `{spec.name}`" in md
        for col in spec.columns:
            assert f"| `{col.name}` |" in md and col.doc


def test_catalog_sql_files_are_named_after_their_views():
    files = sorted(p.stem for p in catalog.SQL_DIR.glob("*.sql") if not p.name.startswith("_"))
    assert files == sorted(set(storage.view_names()) - set(TABLES) - {"catalog_info"})
    for path in catalog.SQL_DIR.glob("*.sql"):
        assert path.read_text().lstrip().startswith("--"), f"{path.name}: start with a comment saying what it is"


def test_compare_counts_rows_without_a_twin_and_the_command_says_so(tmp_path, capsys, monkeypatch):
    """storage.compare: ids and clocks are not compared; a changed value, or a row stored twice in one
    root, is a difference; the command exits 1 on any difference, 0 when every table is equal."""
    from storage import compare

    a = {"evaluations": ['{"metric": 0.5}', '{"metric": 0.7}'], "recipes": ['{"r": 1}']}
    assert compare.differences(a, a) == {"evaluations": (2, 2, 0), "recipes": (1, 1, 0)}
    b = {"evaluations": ['{"metric": 0.5}', '{"metric": 0.5}'], "recipes": ['{"r": 1}']}
    assert compare.differences(a, b)["evaluations"] == (2, 2, 2)  # 0.7 missing in b, a second 0.5 in b
    assert compare.differences(a, {"recipes": ['{"r": 1}']})["evaluations"] == (2, 0, 2)
    row = {"run_id": "r1", "created_at": 1.0, "wall_s": 3.0, "metric": 0.5,
           "recipe_json": '{"metadata": {"seconds": 2.0, "budget": 0.5}}'}
    twin = dict(row, run_id="r2", created_at=9.0, wall_s=4.0,
                recipe_json='{"metadata": {"seconds": 7.0, "budget": 0.5}}')
    assert compare._row_text(row) == compare._row_text(twin)
    assert compare._row_text(row) != compare._row_text(dict(twin, metric=0.6))
    empty = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert compare.main(empty) == 0 and "identical" in capsys.readouterr().out
    monkeypatch.setattr(compare, "snapshot", lambda root: a if root.endswith("a") else b)
    assert compare.main(empty) == 1 and "DIFFERENT" in capsys.readouterr().out
