"""Smoke tests of the two profiling scripts on the CPU: scripts/profile_prefill.py --tiny (stage times read
from the profiler's host events) and scripts/bench_row_gather.py --device cpu (rows the benchmarks table
imports). The times mean nothing here; the tests check what the scripts report and in what form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fitprune.kernels import fused_scores, fused_select
from storage.benchmarks import read_benchmark_file

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_row_gather  # noqa: E402
import profile_prefill  # noqa: E402


def test_triton_kernels_named_for_their_stages_exist():
    # the names profile_prefill adds to the ranges must be the kernels the library launches
    modules = {"_row_stats": fused_scores, "_cross_self": fused_scores, "_select_compact": fused_select}
    assert set(profile_prefill.TRITON_STAGES) == set(modules)
    for name, module in modules.items():
        assert hasattr(module, name), f"{module.__name__} has no {name}"
    assert set(profile_prefill.TRITON_STAGES.values()) <= set(profile_prefill.RANGES)


@pytest.mark.slow
def test_tiny_profile_reports_each_stages_own_ops(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_prefill.main(["--tiny", "--batches", "1", "--recipes", "70", "--repeats", "1",
                                 "--out", str(out)]) == 0
    results = {r["label"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"unpruned", "fitprune@70"}
    assert not any(results["unpruned"]["fitprune_ranges_ms"].values())  # the stock model runs no stage
    pruned = results["fitprune@70"]
    for stage in ("scoring", "selection", "compaction", "reslice"):
        assert pruned["fitprune_ranges_ms"][stage] > 0, stage
        top = pruned["range_kernels"][stage]
        assert top and all(name.startswith("aten::") for name, _, _ in top)
        assert sum(ms for _, ms, _ in top) <= pruned["fitprune_ranges_ms"][stage] + 1e-9
    assert any(name == "aten::gather" for name, _, _ in pruned["range_kernels"]["compaction"])
    assert sum(pruned["fitprune_ranges_ms"].values()) < pruned["kernel_ms"]  # stages are part of the forward
    assert "compaction" in capsys.readouterr().out


def test_row_gather_benchmark_rows_import(tmp_path):
    out = tmp_path / "rows.json"
    assert bench_row_gather.main(["--device", "cpu", "--iters", "1", "--out", str(out)]) == 0
    _, rows = read_benchmark_file(out)
    ways = {r["config"]["label"] for r in rows}
    assert ways == set(bench_row_gather.WAYS)
    assert {r["metric"] for r in rows} == {"row_gather_ms"}
    for r in rows:
        if r["config"]["label"] == "gather":
            assert r["ratio_vs_unpruned"] == 1.0  # the baseline of each geometry
        assert r["value"] > 0
