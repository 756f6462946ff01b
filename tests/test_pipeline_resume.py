"""Sharded statistics and evaluation: calibration sets recorded, a killed ``fitprune sweep`` resumes
without duplicates, and two sweeps on one data root at once lose nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.sweep import SweepConfig, compose
from storage import catalog, store
from tasks import steps

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
    for tmp in root.rglob("*.tmp"):  # a killed writer's temp file is hidden from readers
        assert tmp.name.startswith("."), tmp
    coverage = catalog.query("SELECT * FROM stats_coverage", root=root).to_pylist()
    assert [(c["n_samples"], c["complete"]) for c in coverage] == [(n, True)]


def test_calibration_set_is_recorded_once_with_a_content_hash(tmp_path):
    a = steps.calibration_set(6, 0, source="toy", root=tmp_path)
    b = steps.calibration_set(6, 0, "calib", "demo-synthetic", root=tmp_path)  # the toy source's former name
    assert a == b and a["id"] == "toy-calib-6-s0" and re.fullmatch(r"[0-9a-f]{64}", a["content_hash"])
    rows = store.read_table("calibration_sets", tmp_path).to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert (row["source"], row["split"], row["n_samples"], row["seed"]) == ("toy", "calib", 6, 0)
    assert row["sample_ids"] == [f"calib-{i}" for i in range(6)]
    assert steps.calibration_set(6, 1, source="toy", root=tmp_path)["content_hash"] != a["content_hash"]
    assert steps.content_hash(a, batch_size=4)[0] == a["content_hash"]  # independent of batching


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
    config = SweepConfig(budgets=(0.5,), methods=("fitprune",), n_calib=6, n_eval=6, batch_size=2, shard_size=4,
                         root=str(tmp_path), source="toy")
    result = compose(config, {"kind": "toy", "seed": 0})
    assert steps.shard_ranges(6, 4) == [[0, 4], [4, 6]]
    assert len(_token_parts(tmp_path)) == 2
    assert sorted(r["shard"] for r in result["rows"]) == ["0-4", "0-4", "4-6", "4-6"]
    assert len(store.list_parts("evaluations", tmp_path)) == 4  # one file per (run, recipe, shard)
    summary = catalog.query("SELECT method, n_samples, n_shards FROM evaluation_summary ORDER BY method", root=tmp_path)
    assert summary.to_pylist() == [{"method": "fitprune", "n_samples": 6, "n_shards": 2},
                                   {"method": "none", "n_samples": 6, "n_shards": 2}]
    _assert_stats_exact(tmp_path, 6)


def test_killed_sweep_resumes_without_duplicates(tmp_path):
    root, n, shards = tmp_path / "data", 32, 8
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_sweep_cmd(root, "--calib-samples", str(n), "--eval-samples", "4"), cwd=REPO, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 50
        while not _token_parts(root):
            assert proc.poll() is None, "sweep ended before any statistics shard:\n" + (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no statistics shard within 50 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    written = len(_token_parts(root))
    assert 1 <= written < shards, f"{written} of {shards} shards written before the kill"

    again = subprocess.run(_sweep_cmd(root, "--calib-samples", str(n), "--eval-samples", "4"), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=55)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("reused") >= written  # finished shards were not collected again
    assert "Pareto front" in again.stdout and "statistics:" not in again.stdout  # progress on stderr only
    assert len(_token_parts(root)) == shards
    _assert_stats_exact(root, n)
    front = catalog.query("SELECT * FROM pareto", root=root)
    assert front.num_rows >= 1
    assert catalog.pareto(root).num_rows == front.num_rows


def test_two_sweeps_at_once_on_one_data_root(tmp_path):
    root, n = tmp_path / "data", 16
    cmd = _sweep_cmd(root, "--calib-samples", str(n), "--eval-samples", "8")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    outs = [p.communicate(timeout=55) for p in procs]
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
    assert sorted(store.read_table("runs", root).column("run_id").to_pylist()) == run_ids
    assert store.read_table("calibration_sets", root).num_rows == 2  # calib and eval sets, once each
    _assert_stats_exact(root, n)


def test_each_benchmark_writes_its_own_rows(tmp_path):
    """Two evaluation sets, same run, recipe and sample range: two rows (the write id names the set)."""
    spec = {"kind": "toy", "seed": 0}
    info = steps.model_info(spec)
    rows = [steps.evaluate_shard(spec, info, steps.calibration_set(4, seed, "eval", "toy", root=tmp_path), None, 0, 4,
                                 4, "run-x", "none", f"toy-{seed}", tmp_path) for seed in (1, 2)]
    stored = store.read_table("evaluations", tmp_path).to_pylist()
    assert sorted(r["benchmark"] for r in stored) == ["toy-1", "toy-2"] and len(rows) == 2
