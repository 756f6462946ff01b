"""The 'hf:' sample source (a local Hugging Face datasets directory) and the plot artifact."""

from __future__ import annotations

import pytest

from flows.cli import main
from fitprune.demo.toy import toy_batches
from storage import store

datasets = pytest.importorskip("datasets", reason="the 'hf:' source needs the `datasets` package")


def _save_processed_inputs(path, n: int, uneven: bool) -> None:
    rows = []
    for batch in toy_batches(n, n, 7, "x"):
        for i, name in enumerate(batch["sample_ids"]):
            ids = batch["input_ids"][i].tolist()
            if uneven and i % 2:  # a shorter question: the source must left-pad
                ids = ids[:-3]
            rows.append({"id": name, "input_ids": ids, "pixel_values": batch["pixel_values"][i].tolist()})
    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def test_sweep_on_a_local_datasets_directory(tmp_path, capsys):
    _save_processed_inputs(tmp_path / "ds", 12, uneven=True)
    args = ["--data-root", str(tmp_path / "root"), "sweep", "--model", "toy", "--source", f"hf:{tmp_path / 'ds'}",
            "--budgets", "0.5", "--methods", "fitprune,fastv", "--calib-samples", "6", "--eval-samples", "6",
            "--batch-size", "3", "--shard-size", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out
    calib = store.read_table("calibration_sets", tmp_path / "root").to_pylist()
    assert any(row["source"].startswith("hf:") and row["n_samples"] == 6 for row in calib)
    evals = store.read_table("evaluations", tmp_path / "root").to_pylist()
    base = [r for r in evals if r["method"] == "none"]
    assert base and all(r["metric"] == 1.0 for r in base)  # unpruned agrees with itself: padding is handled


def test_missing_columns_are_a_clear_error(tmp_path, capsys):
    datasets.Dataset.from_list([{"text": "hi"}]).save_to_disk(str(tmp_path / "bad"))
    args = ["--data-root", str(tmp_path / "root"), "sweep", "--model", "toy", "--source", f"hf:{tmp_path / 'bad'}",
            "--calib-samples", "4", "--eval-samples", "1"]
    assert main(args) == 1
    assert "lacks column(s)" in capsys.readouterr().err


def test_plot_artifact_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    from tasks.report import plot_front

    def row(benchmark, method, budget, red, metric):
        return {"benchmark": benchmark, "method": method, "budget": budget, "flops_reduction": red,
                "metric_name": "exact_match", "metric": metric, "stderr": 0.05, "n_samples": 40, "n_failed": 0,
                "wall_s": 1.0}

    result = {"run_id": "run-x", "checkpoint": "fp-test", "summary": [
        row(b, m, budget, red, metric) for b in ("easy-vqa:test", "synthetic:test")
        for m, budget, red, metric in (("none", None, 0.0, 1.0), ("fitprune", 0.5, 0.5, 0.6), ("fastv", 0.5, 0.5, 0.5))
    ]}
    result["pareto_rows"] = [r for r in result["summary"] if r["method"] != "fastv"]
    path = plot_front(result, str(tmp_path))
    assert path and path.endswith(".png")
    assert (tmp_path / "run-x-pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
