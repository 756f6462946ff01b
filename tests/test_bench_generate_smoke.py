"""Smoke test of the end-to-end generate benchmark (scripts/bench_generate.py) in its --tiny mode, on the CPU.

The numbers mean nothing here; the test checks that the run completes, that its rows carry what the
benchmark promises (ratios against stock, FLOPs and KV ratios, the time split) in the format the
``benchmarks`` table imports, and that the pruned run with a static cache is measured with the
pruned (shorter) cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage.benchmarks import read_benchmark_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_generate.py"


@pytest.mark.slow
def test_tiny_generate_benchmark(tmp_path):
    out = tmp_path / "generate.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--geometries", "llava-1.5-7b", "--batches", "1",
           "--budgets", "60", "--new-tokens", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["errors"]
    rows = {(r["label"], r["metric"]): r for r in data["rows"]}
    assert {label for label, _ in rows} == {"unpruned", "fitprune@60", "unpruned+static-eager",
                                            "fitprune@60+static-eager"}

    base = rows[("unpruned", "ttft_ms")]
    assert base["ratio_vs_unpruned"] == pytest.approx(1.0) and base["flops_ratio"] == 1.0
    pruned = {metric: r for (label, metric), r in rows.items() if label == "fitprune@60"}
    assert 0 < pruned["ttft_ms"]["flops_ratio"] < 1
    assert 0 < pruned["kv_cache_bytes"]["ratio_vs_unpruned"] < 1  # the pruned cache is shorter
    for metric in ("ttft_ms", "decode_tok_s", "decode_step_ms", "generate_ms", "split_vision_ms",
                   "split_lm_prefill_ms", "split_decode_ms"):
        assert pruned[metric]["value"] > 0 and pruned[metric]["ratio_vs_unpruned"] > 0, metric
    for metric in ("split_scoring_ms", "split_prune_other_ms", "split_decode_reslice_ms"):  # fitprune's own
        assert pruned[metric]["value"] > 0 and pruned[metric]["ratio_vs_unpruned"] is None, metric
    assert ("unpruned", "split_scoring_ms") not in rows  # the stock model runs no fitprune stage
    static = rows[("unpruned+static-eager", "decode_tok_s")]
    assert static["method"] == "stock-static" and static["ratio_vs_unpruned"] > 0
    pruned_static = {metric: r for (label, metric), r in rows.items() if label == "fitprune@60+static-eager"}
    assert pruned_static["decode_tok_s"]["method"] == "fitprune" and pruned_static["decode_tok_s"]["value"] > 0
    # the static buffers are laid out at the pruned lengths: smaller than the stock static cache's
    stock_kv = rows[("unpruned+static-eager", "kv_cache_bytes")]["value"]
    assert 0 < pruned_static["kv_cache_bytes"]["value"] < stock_kv
    assert pruned_static["ttft_ms"]["flops_ratio"] == pytest.approx(pruned["ttft_ms"]["flops_ratio"])
    assert "== llava-1.5-7b  batch 1" in proc.stdout

    run_id, imported = read_benchmark_file(out)  # what `fitprune import-benchmarks` would load
    assert len(imported) == len(data["rows"]) and run_id
