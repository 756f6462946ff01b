"""Sharded statistics and evaluation: calibration sets recorded, statistics keyed by sample (any shard
size reuses them), a ``fitprune sweep`` killed during statistics or during evaluation resumes
without duplicates or bias, and two sweeps on one data root at once lose nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from flows.sweep import SweepConfig, compose
from storage import catalog, store
from tasks import samples, steps

REPO = Path(__file__).resolve().parents[1]
LAYERS, VISUAL = 8, 144  # the toy model: decoder layers, visual tokens per sample


def _sweep_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--data-root", str(root), "sweep", "--source", "toy", "--budgets", "0.5",
            "--methods", "fitprune,fastv", "--batch-size", "4", "--shard-size", "4", *extra]


def _env() -> dict:
    # one torch thread per process: two sweeps on a small CPU machine must not oversubscribe it
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _token_parts(root: Path) -> list[Path]:
    return sorted((root / "tables" / "stats_token").glob("*/*/part-*.parquet"))


def _assert_stats_exact(root: Path, n: int) -> None:
    tokens = store.read_table("stats_token", root)
    layers = store.read_table("stats_layer", root)
    keys = Counter(zip(tokens.column("sample").to_pylist(), tokens.column("layer").to_pylist(),
                       tokens.column("token").to_pylist()))
    assert max(keys.values()) == 1, "duplicate (sample, layer, token) rows in stats_token"
    assert tokens.num_rows == len(keys) == n * LAYERS * VISUAL
    lkeys = Counter(zip(layers.column("sample").to_pylist(), layers.column("layer").to_pylist()))
    assert max(lkeys.values()) == 1, "duplicate (sample, layer) rows in stats_layer"
    assert layers.num_rows == len(lkeys) == n * LAYERS
    for table in ("stats_token", "stats_layer", "evaluations", "calibration_sets"):
        for part in store.list_parts(table, root):  # every published file is whole
            pq.read_table(part)
    coverage = catalog.query("SELECT * FROM stats_coverage", root=root).to_pylist()
    assert [(c["n_samples"], c["complete"]) for c in coverage] == [(n, True)]


def test_calibration_set_is_recorded_once_with_a_content_hash(tmp_path):
    a = steps.calibration_set(6, 0, source="toy", root=tmp_path)
    b = steps.calibration_set(6, 0, "calib", "toy", root=tmp_path)
    assert a == b and a["id"] == "toy-calib-6-s0" and re.fullmatch(r"[0-9a-f]{64}", a["content_hash"])
    rows = store.read_table("calibration_sets", tmp_path).to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert (row["source"], row["split"], row["n_samples"], row["seed"]) == ("toy", "calib", 6, 0)
    assert row["sample_ids"] == [f"calib-{i}" for i in range(6)]
    assert samples.sample_ids(a, tmp_path) == row["sample_ids"]
    assert steps.calibration_set(6, 1, source="toy", root=tmp_path)["content_hash"] != a["content_hash"]
    assert samples.content_hash(a, batch_size=4)[0] == a["content_hash"]  # independent of batching


def test_unknown_or_unavailable_sources_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="not known"):
        steps.calibration_set(4, 0, source="imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="not known"):
        SweepConfig(source="s3://bucket")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the Hugging Face `datasets` package"):
            steps.calibration_set(4, 0, source=f"hf:{tmp_path}", root=tmp_path)


def test_shards_are_written_separately_and_combined(tmp_path):
    config = SweepConfig(budgets=(0.5,), methods=("fitprune",), calib_samples=6, eval_samples=6, batch_size=2, shard_size=4,
                         data_root=str(tmp_path), source="toy")
    result = compose(config)
    assert steps.shard_ranges(6, 4) == [[0, 4], [4, 6]]
    assert len(_token_parts(tmp_path)) == 2
    evals = store.read_table("evaluations", tmp_path).to_pylist()
    assert sorted(r["shard"] for r in evals) == ["0-4", "0-4", "4-6", "4-6"]
    assert len(store.list_parts("evaluations", tmp_path)) == 4  # one file per (run, recipe, shard)
    assert {r["eval_set"] for r in evals} == {"toy-eval-6-s1"}
    summary = catalog.query("SELECT method, n_samples, n_shards, complete FROM evaluation_summary ORDER BY method",
                            root=tmp_path)
    assert summary.to_pylist() == [{"method": "fitprune", "n_samples": 6, "n_shards": 2, "complete": True},
                                   {"method": "none", "n_samples": 6, "n_shards": 2, "complete": True}]
    assert [r["n_scored"] for r in result["summary"]] == [6, 6]
    _assert_stats_exact(tmp_path, 6)


def test_a_changed_shard_size_reuses_statistics_by_sample(tmp_path):
    """Issue 16, defect 1: shard size 4, then 8, then 3: the statistics are written once, every sweep runs."""
    for shard_size in (4, 8, 3):
        config = SweepConfig(budgets=(0.5,), methods=("fitprune",), calib_samples=8, eval_samples=4, batch_size=4,
                             shard_size=shard_size, data_root=str(tmp_path), source="toy")
        compose(config)
        _assert_stats_exact(tmp_path, 8)
    assert len(_token_parts(tmp_path)) == 2  # the first sweep's two shards; the others collected nothing
    # a larger set with the same seed is another set; a partial overlap is collected only where missing
    calib = steps.calibration_set(8, 0, "calib", "toy", root=tmp_path)
    spec = config.spec()
    checkpoint = steps.model_info(spec)["checkpoint"]
    done = steps.collect_stats_shard(spec, calib, checkpoint, 0, 8, 4, tmp_path)
    assert done["reused"] and done["collected"] == 0


def test_duplicated_statistics_from_an_older_version_are_read_once_and_reported(tmp_path):
    """A store where the same samples were written twice (older versions, or two differently sharded
    sweeps racing) still reads each sample once; stats_coverage counts the duplicate rows."""
    from tasks.statistics import read_stats

    config = SweepConfig(budgets=(0.5,), methods=("fitprune",), calib_samples=4, eval_samples=4, batch_size=4, shard_size=4,
                         data_root=str(tmp_path), source="toy")
    compose(config)
    (part,) = _token_parts(tmp_path)
    key = dict(checkpoint=part.parent.parent.name.split("=")[1], calib_id=part.parent.name.split("=")[1])
    stats = read_stats(key["checkpoint"], key["calib_id"], tmp_path)
    for table in ("stats_layer", "stats_token"):  # the whole-set layout of an older version, beside the shard
        rows = store.read_table(table, tmp_path)
        store.write_rows(table, rows, root=tmp_path, write_id=f"{key['checkpoint']}-{key['calib_id']}", partition=key)
    assert store.read_table("stats_token", tmp_path).num_rows == 2 * 4 * LAYERS * VISUAL
    again = read_stats(key["checkpoint"], key["calib_id"], tmp_path)
    assert again.sample_ids == stats.sample_ids
    assert np.array_equal(again.cross, stats.cross, equal_nan=True)
    assert np.array_equal(again.self_, stats.self_, equal_nan=True)
    coverage = catalog.query("SELECT * FROM stats_coverage", root=tmp_path).to_pylist()
    assert [(c["n_samples"], c["n_missing"], c["complete"], c["n_duplicate_rows"]) for c in coverage] == [
        (4, 0, True, 4 * LAYERS * VISUAL)]
    compose(config)  # and a sweep on it runs
    # a writer killed between its two parts leaves a stats_layer part alone: it is not read, even first by name
    layers = store.read_table("stats_layer", tmp_path)
    forged = layers.set_column(layers.schema.get_field_index("cross_mass"), "cross_mass",
                               pa.compute.multiply(layers.column("cross_mass"), 100.0))
    store.write_rows("stats_layer", forged, root=tmp_path, write_id="aaa-killed-before-its-token-part", partition=key)
    assert read_stats(key["checkpoint"], key["calib_id"], tmp_path).sample_ids == stats.sample_ids
    assert np.array_equal(read_stats(key["checkpoint"], key["calib_id"], tmp_path).cross_mass, stats.cross_mass)


def _wait_for(proc, log: Path, ready, what: str) -> None:
    """Poll until ``ready()``; fail if the process ends first. No deadline: a loaded machine is slow."""
    while not ready():
        assert proc.poll() is None, f"sweep ended before {what}:\n" + log.read_text()
        time.sleep(0.005)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_killed_sweep_resumes_without_duplicates(tmp_path):
    root, n, shards = tmp_path / "data", 32, 8
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(_sweep_cmd(root, "--calib-samples", str(n), "--eval-samples", "4"), cwd=REPO,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(proc, log, lambda: _token_parts(root), "any statistics shard")
        finally:
            _kill(proc)
    written = len(_token_parts(root))
    assert 1 <= written < shards, f"{written} of {shards} shards written before the kill"
    killed = store.read_table("runs", root).to_pylist()
    assert [r["status"] for r in killed] == ["running"]  # its start row, and no end: never "completed"

    again = subprocess.run(_sweep_cmd(root, "--calib-samples", str(n), "--eval-samples", "4"), cwd=REPO, env=_env(),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("reused") >= written  # finished shards were not collected again
    assert "Pareto front" in again.stdout and "statistics:" not in again.stdout  # progress on stderr only
    assert len(_token_parts(root)) == shards
    _assert_stats_exact(root, n)
    status = [r["status"] for r in catalog.query("SELECT status FROM runs_latest", root=root).to_pylist()]
    assert sorted(status) == ["completed", "running"]


def test_a_terminated_sweep_records_that_it_was_interrupted(tmp_path):
    """SIGTERM (a scheduler stopping the run) during statistics: exit 143, and the run's end row says
    interrupted with the signal, instead of a start row left running."""
    root = tmp_path / "data"
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(_sweep_cmd(root, "--calib-samples", "32", "--eval-samples", "4"), cwd=REPO,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(proc, log, lambda: _token_parts(root), "any statistics shard")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()
        finally:
            _kill(proc)
    (run,) = catalog.query("SELECT status, error, ended_at FROM runs_latest", root=root).to_pylist()
    assert run["status"] == "interrupted" and "SIGTERM" in run["error"] and run["ended_at"] is not None
    assert "fitprune sweep: stopped by signal SIGTERM" in log.read_text()


def _table_rows(stdout: str) -> dict:
    """The CLI's printed results table: (benchmark, method, budget) -> (FLOPs removed, metric, n)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("benchmark  method"))
    out = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        bench, method, budget, flops, _paper, metric, _pm, _se, n, _failed, _s = line.split()
        out[(bench, method, budget)] = (flops, metric, int(n))
    return out


def test_sweep_killed_during_evaluation_biases_nothing(tmp_path):
    """Issue 16, defect 2: kill a sweep during evaluation, re-run it: the front, the summary view and the
    re-run's printed table agree, none includes the killed run's partial shards, and every front row's
    recipe exists."""
    root = tmp_path / "data"
    cmd = _sweep_cmd(root, "--calib-samples", "8", "--eval-samples", "16", "--budgets", "0.5,0.7")
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:  # the first run's recipes are stored when fitted; wait for some of its evaluation shards
            _wait_for(proc, log, lambda: len(store.list_parts("evaluations", root)) >= 3, "3 evaluation shards")
        finally:
            _kill(proc)
    first = store.read_table("evaluations", root)
    first_run = first.column("run_id")[0].as_py()
    assert 3 <= first.num_rows < 5 * 4, "the kill came after the whole evaluation"
    assert store.read_table("recipes", root, filters={"run_id": first_run}).num_rows == 4  # written when fitted

    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    run_id = re.search(r"run (run-[0-9a-f]+)", again.stdout).group(1)
    printed = _table_rows(again.stdout)
    summary = catalog.query("SELECT * FROM evaluation_summary", root=root).to_pylist()
    assert {r["run_id"] for r in summary} == {run_id}  # the killed run's partial shards are not pooled in
    assert len(summary) == len(printed) == 5  # unpruned + 2 methods x 2 budgets
    for r in summary:  # the printed table is the view
        key = (r["benchmark"], r["method"], "-" if r["budget"] is None else f"{r['budget']:.3f}")
        assert printed[key] == (f"{r['flops_reduction']:.3f}", f"{r['metric']:.3f}", r["n_scored"])
        assert r["n_samples"] == 16 and r["n_runs"] == 1
    partial = catalog.query("SELECT * FROM run_evaluations WHERE run_id = $r", {"r": first_run}, root=root)
    assert partial.num_rows >= 1 and set(partial.column("status").to_pylist()) == {"running"}
    front = catalog.pareto(root).to_pylist()
    recipes = set(store.read_table("recipes", root).column("recipe_id").to_pylist()) | {"none"}
    assert front and all(r["recipe_id"] in recipes and r["run_id"] == run_id for r in front)
    assert all(r["budget"] is not None for r in front if r["recipe_id"] != "none")


def test_two_sweeps_at_once_on_one_data_root(tmp_path):
    root, n = tmp_path / "data", 16
    cmd = _sweep_cmd(root, "--calib-samples", str(n), "--eval-samples", "8")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    run_ids = sorted(re.search(r"run (run-[0-9a-f]+)", out).group(1) for out, _ in outs)
    assert len(set(run_ids)) == 2
    evals = store.read_table("evaluations", root)
    per_run = Counter(evals.column("run_id").to_pylist())
    assert sorted(per_run) == run_ids
    assert all(per_run[r] == 3 * 2 for r in run_ids)  # (none, fitprune, fastv) x 2 shards, each run
    keys = Counter(zip(evals.column("run_id").to_pylist(), evals.column("recipe_id").to_pylist(),
                       evals.column("shard").to_pylist()))
    assert max(keys.values()) == 1
    runs = catalog.query("SELECT run_id, status FROM runs_latest ORDER BY run_id", root=root).to_pylist()
    assert runs == [{"run_id": r, "status": "completed"} for r in run_ids]
    assert store.read_table("calibration_sets", root).num_rows == 2  # calib and eval sets, once each
    tokens = store.read_table("stats_token", root)  # a race may write a sample twice; it is read once
    coverage = catalog.query("SELECT * FROM stats_coverage", root=root).to_pylist()
    assert [(c["n_samples"], c["complete"]) for c in coverage] == [(n, True)]
    assert tokens.num_rows == n * LAYERS * VISUAL + coverage[0]["n_duplicate_rows"]
    # the same questions in two runs are not pooled: each summary row is one run's n samples
    summary = catalog.query("SELECT n_samples, n_runs FROM evaluation_summary", root=root).to_pylist()
    assert summary and all(r["n_samples"] == 8 for r in summary)


def test_each_benchmark_writes_its_own_rows(tmp_path):
    """Two evaluation sets, same run, recipe and sample range: two rows (the write id names the set)."""
    spec = {"kind": "toy", "seed": 0}
    info = steps.model_info(spec)
    rows = [steps.evaluate_shard(spec, info, steps.calibration_set(4, seed, "eval", "toy", root=tmp_path), "none", 0, 4,
                                 4, "run-x", f"toy-{seed}", tmp_path, max_new_tokens=6) for seed in (1, 2)]
    stored = store.read_table("evaluations", tmp_path).to_pylist()
    assert sorted(r["benchmark"] for r in stored) == ["toy-1", "toy-2"] and len(rows) == 2
    assert sorted(r["eval_set"] for r in stored) == ["toy-eval-4-s1", "toy-eval-4-s2"]
    preds = store.read_table("predictions", tmp_path).to_pylist()
    assert len(preds) == 8 and all(p["score"] == 1.0 for p in preds)  # unpruned agrees with itself


def test_evaluating_a_recipe_that_is_not_stored_is_refused(tmp_path):
    spec = {"kind": "toy", "seed": 0}
    eval_set = steps.calibration_set(4, 1, "eval", "toy", root=tmp_path)
    with pytest.raises(ValueError, match="r-0000 is not in the store"):
        steps.evaluate_shard(spec, steps.model_info(spec), eval_set, "r-0000", 0, 4, 4, "run-x", "toy", tmp_path,
                             max_new_tokens=6)
    assert store.read_table("evaluations", tmp_path).num_rows == 0
