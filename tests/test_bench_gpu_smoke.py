"""Smoke test of the GPU speed benchmark (scripts/bench_gpu.py) in its --tiny mode, on the CPU.

The numbers mean nothing here; the test checks that every part runs end to end and that the rows
carry what the benchmark promises (ratios against the unpruned model, FLOPs ratios, all metrics).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--geometries", "llava-1.5-7b",
           "--batches", "1", "--budgets", "60", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _rows(data, label, metric):
    return [r for r in data["rows"] if r["label"] == label and r["metric"] == metric]


@pytest.mark.slow
def test_tiny_benchmark_measures_every_part(tiny_run):
    stdout, data = tiny_run
    assert not data["errors"]
    assert "== llava-1.5-7b  batch 1" in stdout and "collect_stats on this batch" in stdout
    for key in ("gpu", "torch", "transformers", "date"):
        assert data["meta"][key] and all(r[key] == data["meta"][key] for r in data["rows"])
    labels = {r["label"] for r in data["rows"]}
    assert labels == {"unpruned", "fitprune@60", "fastv@60", "fitprune@60/random", "fastv@60/random", "collect_stats"}

    (base,) = _rows(data, "unpruned", "prefill_ms")
    assert base["ratio_vs_unpruned"] == pytest.approx(1.0) and base["flops_ratio"] == 1.0
    for budget in (60,):
        (fit,) = _rows(data, f"fitprune@{budget}", "prefill_ms")
        (fv,) = _rows(data, f"fastv@{budget}", "prefill_ms")
        assert 0 < fit["flops_ratio"] < 1 and fit["ratio_vs_unpruned"] > 0
        assert fv["flops_ratio"] == pytest.approx(fit["flops_ratio"], abs=0.01)  # FastV at the same FLOPs
        (kv,) = _rows(data, f"fitprune@{budget}", "kv_cache_bytes")
        assert 0 < kv["ratio_vs_unpruned"] < 1
        for metric in ("lm_prefill_ms", "decode_tok_s", "scoring_share_synced", "scoring_share_vs_random",
                       "flops_reduction_full", "flops_reduction_paper", "prefill_cold_ms"):
            assert _rows(data, f"fitprune@{budget}", metric), metric
    (stats,) = _rows(data, "collect_stats", "stats_ms")
    assert stats["value"] > 0 and stats["ratio_vs_unpruned"] > 0


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_every_configuration_is_saved_even_when_it_fails():
    """A run cut short (a device time-out) keeps every configuration it finished: ``guarded`` saves
    after each one, the failing ones included, and records the failure."""
    import types

    import torch

    script = _load_script()
    saved = []
    bench = types.SimpleNamespace(errors=[], device=torch.device("cpu"), rows=[])
    bench.saved = lambda: saved.append((len(bench.rows), list(bench.errors)))
    geo = types.SimpleNamespace(name="g", model=torch.nn.Linear(2, 2))
    method = types.SimpleNamespace(label="fitprune@60")

    script.guarded(bench, geo, 8, method, lambda: bench.rows.append({"metric": "prefill_ms"}))

    def fails():
        raise RuntimeError("kernel launch failed")

    script.guarded(bench, geo, 8, method, fails)
    assert saved == [(1, []), (1, ["g b8 fitprune@60: RuntimeError: kernel launch failed"])]


@pytest.mark.slow
def test_rows_also_write_as_parquet(tiny_run, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    bench = _load_script()
    _, data = tiny_run
    path = tmp_path / "bench.parquet"
    bench.write_rows(path, data["rows"], data["meta"], data["errors"])
    table = pq.read_table(path)
    assert table.num_rows == len(data["rows"])
    assert {"gpu", "geometry", "batch", "method", "budget", "metric", "value", "ratio_vs_unpruned",
            "flops_ratio"} <= set(table.column_names)


@pytest.mark.slow
def test_compare_bench_reads_real_results(tiny_run, tmp_path, capsys):
    """scripts/compare_bench.py on bench_gpu's own output: a copy whose pruned LM prefills take 0.9 × as long
    compares as 0.9 over every pruned configuration."""
    _, data = tiny_run
    spec = importlib.util.spec_from_file_location("compare_bench", ROOT / "scripts" / "compare_bench.py")
    compare_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_bench)
    faster = json.loads(json.dumps(data))
    pruned = [r for r in faster["rows"] if r["metric"] == "lm_prefill_ms" and r["method"] != "unpruned"]
    for r in pruned:
        r["value"] *= 0.9
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(data))
    new.write_text(json.dumps(faster))
    assert compare_bench.main([str(old), str(new)]) == 0
    assert f"pruned new/old 0.9000 ± 0.0000 (n = {len(pruned)}, new faster in {len(pruned)})" in capsys.readouterr().out


def test_oneshot_is_fastvs_schedule_scored_by_fitprune_and_only_on_request():
    from types import SimpleNamespace

    from fitprune import preset
    from fitprune.flops import ModelDims

    bench = _load_script()
    geo = SimpleNamespace(dims=ModelDims.from_config(bench._llama_text(False, 32000)), n_visual=576, n_other=75,
                          family="llava", name="llava-1.5-7b")
    fitted = bench.Method("fitprune@70", "fitprune", 0.7, preset("llava-1.5-7b/70"), "preset llava-1.5-7b/70")
    fastv = bench._fastv_match(geo, fitted)
    one = bench._oneshot(fastv)
    assert (one.label, one.method, one.of) == ("oneshot@70", "oneshot", "fitprune@70")
    assert one.recipe.drop_fractions == fastv.recipe.drop_fractions  # one pruning layer, FastV's K and R
    assert (one.recipe.scoring, fastv.recipe.scoring) == ("fitprune", "fastv")
    assert "oneshot" in bench.PARTS and "oneshot" not in bench.DEFAULT_PARTS
