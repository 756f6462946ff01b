"""The main job end to end (small sizes): store rows, DuckDB Pareto front, statistics reuse, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import main
from storage import catalog, store


def test_sweep_writes_results_and_reuses_statistics(tmp_path, capsys):
    args = ["--data-root", str(tmp_path), "sweep", "--source", "toy", "--budgets", "0.4,0.7", "--calib-samples", "8",
            "--eval-samples", "8", "--batch-size", "8"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "Pareto front" in out and "none" in out
    assert "model: toy" in err and "8 samples each of toy" in err  # says what it ran
    evals = store.read_table("evaluations", tmp_path)
    assert sorted(set(evals.column("method").to_pylist())) == ["fastv", "fitprune", "fitprune-paper", "none", "random"]
    recipes = store.read_table("recipes", tmp_path).to_pylist()
    calib_ids = set(store.read_table("calibration_sets", tmp_path).column("calib_id").to_pylist())
    for r in recipes:  # every recipe carries its divergence on the calibration set it was measured on
        assert r["divergence"] is not None and r["divergence"] >= 0 and r["divergence_calib_id"] in calib_ids
        assert r["budget"] - 1e-9 <= r["measured_reduction"] <= r["budget"] + 0.01
        assert abs(r["predicted_reduction"] - r["measured_reduction"]) < 1e-6  # the fit's prediction, not the budget
        assert r["feasible"] is True
    for budget in (0.4, 0.7):  # the search's seeds include FastV and the authors' fit: it is never worse on them
        kl = {r["method"]: r["divergence"] for r in recipes if r["budget"] == budget}
        assert kl["fitprune"] <= min(kl["fastv"], kl["fitprune-paper"])
    for row in evals.to_pylist():
        if row["method"] != "none":  # measured FLOPs land within a point of the budget (feasible side)
            recipe = [r for r in store.read_table("recipes", tmp_path).to_pylist() if r["recipe_id"] == row["recipe_id"]][0]
            assert recipe["budget"] - 0.01 <= row["flops_reduction"] <= recipe["budget"] + 0.03
    front = catalog.query("SELECT * FROM pareto", root=tmp_path)
    assert front.num_rows >= 2
    assert main(args) == 0
    _, err = capsys.readouterr()
    assert "reusing" in err
    assert store.read_table("stats_layer", tmp_path).num_rows == 8 * 8  # not written twice


def test_an_infeasible_fit_is_recorded_as_infeasible(tmp_path):
    """Issue 16, defect 3: the recipes row says what the fit said. The toy model's prefill cannot lose 90 %
    (dropping every visual token after layer 0 removes about 84 %): feasible is false, and the predicted
    reduction is the fit's, below the budget. The row is written before any evaluation."""
    from flows.sweep import SweepConfig, compose
    from tasks import steps

    rows_seen = []

    def record_then_evaluate(**kw):
        rows_seen.append(store.read_table("recipes", tmp_path).num_rows)
        return steps.evaluate_shard(**kw)

    from types import SimpleNamespace

    namespace = SimpleNamespace(**{name: getattr(steps, name) for name in steps.__all__})
    namespace.evaluate_shard = record_then_evaluate
    methods = ("fitprune", "fitprune-paper", "fastv", "pyramid")
    config = SweepConfig(budgets=(0.5, 0.9), methods=methods, calib_samples=4, eval_samples=4,
                         batch_size=4, data_root=str(tmp_path), source="toy")
    with pytest.warns(UserWarning, match="no candidate meets it|out of reach for"):
        compose(config, namespace)  # the baselines too: the run goes on
    assert rows_seen and all(n == 8 for n in rows_seen)  # every recipe stored before the first evaluation
    recipes = {(r["method"], r["budget"]): r for r in store.read_table("recipes", tmp_path).to_pylist()}
    for method in methods:
        assert recipes[method, 0.5]["feasible"] is True
        hard = recipes[method, 0.9]
        assert hard["feasible"] is False and hard["predicted_reduction"] < 0.9, hard
    summary = catalog.query("SELECT method, budget, feasible FROM evaluation_summary WHERE budget = 0.9",
                            root=tmp_path).to_pylist()
    assert sorted((r["method"], r["feasible"]) for r in summary) == [(m, False) for m in sorted(methods)]


def test_bad_arguments_exit_nonzero(tmp_path, capsys):
    assert main(["--data-root", str(tmp_path), "sweep", "--budgets", "1.5"]) == 1
    assert "budgets must lie in (0, 1)" in capsys.readouterr().err
    assert main(["--data-root", str(tmp_path), "sweep", "--methods", "magic"]) == 1
    assert main(["--data-root", str(tmp_path), "sweep", "--calib-samples", "3"]) == 1  # too few to hold any out
    assert "at least 4 samples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--budgets", "abc"])
    assert exc.value.code == 2


def test_sql_and_presets_commands(tmp_path, capsys):
    assert main(["--data-root", str(tmp_path), "sql", "SELECT 41 + 1 AS answer"]) == 0
    assert "42" in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "llava-1.5-7b/60" in capsys.readouterr().out
    assert main(["--data-root", str(tmp_path), "sql", "SELECT * FROM no_such_view"]) == 1


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "flows.cli", "presets"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "59.70" in result.stdout
