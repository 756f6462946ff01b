"""fitprune.latency: schedule time from a layer-latency curve, and the time bound at a FLOPs budget (CPU,
numpy); the two scripts around it."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fitprune.cost import LayerCost
from fitprune.flops import ModelDims
from fitprune.latency import LatencyCurve, attention_share, time_bound, schedule_ms
from fitprune.recipe import Recipe
from storage.benchmarks import benchmark_rows

TINY = ModelDims(hidden_size=8, num_layers=3, num_heads=2, num_kv_heads=2, head_dim=4, intermediate_size=16,
                 vocab_size=0)
LLAMA_7B = ModelDims(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                     intermediate_size=11008, vocab_size=32000)


@pytest.mark.parametrize("tokens, ms, match", [
    ((1,), (1.0,), "two or more"),
    ((1, 2), (1.0,), "two or more"),
    ((4, 2), (1.0, 2.0), "ascending"),
    ((0, 2), (1.0, 2.0), "positive integers"),
    ((1.5, 2), (1.0, 2.0), "positive integers"),
    ((1, 2), (1.0, 0.0), "finite and positive"),
    ((1, 2), (1.0, float("nan")), "finite and positive"),
])
def test_curve_rejects_bad_points_and_says_what_it_got(tokens, ms, match):
    with pytest.raises(ValueError, match=match):
        LatencyCurve(tokens, ms)


def test_curve_interpolates_clamps_below_and_refuses_past_the_last_point():
    curve = LatencyCurve((16, 48, 80), (0.25, 0.45, 0.85))
    assert curve(32) == pytest.approx(0.35)
    assert curve(64) == pytest.approx(0.65)
    assert curve(1) == pytest.approx(0.25)  # below the first point: its time
    np.testing.assert_allclose(curve(np.array([16, 80])), [0.25, 0.85])
    with pytest.raises(ValueError, match="measured up to 80 tokens, asked for 81"):
        curve(81)


def test_curve_reads_the_benchmark_json_entry():
    curve = LatencyCurve.from_json({"model": "llama-7b", "batch": 1, "tokens": [16, 48], "ms": [0.3, 0.4]})
    assert curve.tokens == (16, 48) and curve.ms == (0.3, 0.4)


def test_attention_share_of_llama_7b_is_its_weight_split():
    # LLaMA-7B's layer: q, k, v, o 4 × 4096² = 67,108,864 weights; gated MLP 3 × 4096 × 11008 = 135,266,304
    assert attention_share(LLAMA_7B) == pytest.approx(67_108_864 / (67_108_864 + 135_266_304))
    gqa = ModelDims(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                    intermediate_size=18944, vocab_size=0)
    assert attention_share(gqa) < attention_share(LLAMA_7B)  # grouped keys: smaller k and v projections


def test_schedule_time_charges_attention_and_mlp_their_shares():
    curve = LatencyCurve((1, 1000), (1.0, 1000.0))  # t(n) = n ms: sums are easy to write by hand
    n_visual, n_other = 100, 10
    assert schedule_ms(curve, TINY, None, n_visual, n_other) == pytest.approx(3 * 110)
    recipe = Recipe(drop_fractions=(0.5, 0.0, 0.25))  # 50 tokens go after layer 0's attention, 25 after layer 2's
    w = attention_share(TINY)
    want = (w * 110 + (1 - w) * 60) + 60 + (w * 60 + (1 - w) * 35)
    assert schedule_ms(curve, TINY, recipe, n_visual, n_other) == pytest.approx(want)
    assert schedule_ms(curve, TINY, Recipe(drop_fractions=(0.0,) * 3), n_visual, n_other) == pytest.approx(330)


def _all_schedules(n_visual: int, layers: int):
    """Every non-increasing sequence of visual counts left after each layer."""
    for seq in itertools.product(range(n_visual + 1), repeat=layers):
        if all(a >= b for a, b in zip(seq, seq[1:])):
            yield seq


@pytest.mark.parametrize("ms", [
    (0.5, 0.5, 0.6, 1.0, 1.6, 2.4, 3.4),  # a floor, then steeper: few tokens cost little less than some
    (0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3),  # linear
    (0.2, 1.0, 1.1, 1.2, 2.5, 2.6, 2.7),  # steps, as GEMM tiles make them
])
@pytest.mark.parametrize("budget", [0.2, 0.45, 0.7])
def test_time_bound_bound_holds_against_every_schedule(ms, budget):
    n_visual, n_other = 5, 1
    curve = LatencyCurve(tuple(range(1, 8)), ms)
    cost = LayerCost(TINY, "full")
    w = attention_share(TINY)
    full_f = 3 * float(cost(np.float64(6), np.float64(6)))
    target = (1 - budget) * full_f
    best = np.inf
    for seq in _all_schedules(n_visual, 3):
        n_in = np.array((n_visual,) + seq[:-1]) + n_other
        n_out = np.array(seq) + n_other
        if cost(n_in, n_out).sum() >= target - 1e-9:  # keeps at least the budget's FLOPs
            best = min(best, float((w * curve(n_in) + (1 - w) * curve(n_out)).sum()))
    got = time_bound(curve, TINY, n_visual, n_other, budget, step=1)
    assert got.bound_ms <= best + 1e-9  # no schedule beats the bound
    assert got.ms >= best - 1e-9  # and the returned schedule is one of them: feasible, not faster than the best
    assert got.reduction <= budget + 1e-9
    assert list(got.visual) == sorted(got.visual, reverse=True)
    recipe = got.recipe(n_visual)
    assert list(n_visual - np.cumsum(recipe.drop_counts(n_visual))) == list(got.visual)
    assert schedule_ms(curve, TINY, recipe, n_visual, n_other) == pytest.approx(got.ms)
    # nearest the budget: no single schedule step lower keeps the budget's FLOPs (the descent ran to its end)
    for layer in range(3):
        lower = list(got.visual)
        lower[layer] -= 1
        if lower[layer] >= 0 and (layer == 2 or lower[layer] >= lower[layer + 1]):
            n_in = np.array([n_visual] + lower[:-1]) + n_other
            assert cost(n_in, np.array(lower) + n_other).sum() < target - 1e-9
    assert got.full_ms == pytest.approx(schedule_ms(curve, TINY, None, n_visual, n_other))


def test_time_bound_at_zero_budget_keeps_every_token_and_checks_its_inputs():
    curve = LatencyCurve((1, 100), (1.0, 2.0))
    got = time_bound(curve, TINY, 50, 5, 0.0, step=5)
    assert got.visual == (50, 50, 50) and got.reduction == pytest.approx(0.0)
    assert got.bound_ms == pytest.approx(got.full_ms)
    with pytest.raises(ValueError, match=r"in \[0, 1\); got 1.0"):
        time_bound(curve, TINY, 50, 5, 1.0)
    with pytest.raises(ValueError, match="n_visual >= 1"):
        time_bound(curve, TINY, 0, 5, 0.5)


# --- the scripts: scripts/bench_layer_latency.py (CUDA only: its parser and rows) and scripts/latency_ceilings.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_layer_latency  # noqa: E402
import latency_ceilings  # noqa: E402

RUN = REPO / "benchmarks" / "h100-2026-12-06-s33"


def test_layer_latency_parses_token_grids_and_refuses_bad_ones():
    assert bench_layer_latency._tokens("16:80:32") == [16, 48, 80]
    assert bench_layer_latency._tokens("5,7") == [5, 7]
    for bad in ("16:80", "0,4", "a:b:c", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="A:B:STEP"):
            bench_layer_latency._tokens(bad)


def test_layer_latency_rows_load_into_the_benchmarks_table():
    meta = {"gpu": "G", "torch": "t", "transformers": "x", "date": "2026-12-06T10:00:00+0000", "dtype": "bfloat16",
            "attn": "sdpa", "chain": 8}
    rows = bench_layer_latency.rows_of(meta, [{"model": "llama-7b", "batch": 1, "tokens": [16, 48], "ms": [0.3, 0.4]}])
    table = benchmark_rows({"rows": rows}, "run")
    assert [(r["metric"], r["config"]["label"], r["value"]) for r in table] == [("layer_ms", "16 tokens", 0.3),
                                                                                   ("layer_ms", "48 tokens", 0.4)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_layer_latency_needs_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_layer_latency.main(["--out", str(tmp_path / "x.json")])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_ceilings_of_the_committed_batch_1_run(capsys):
    files = [f"{RUN}-controls-b1-{g}.json" for g in ("llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b")]
    assert latency_ceilings.main(["--curves", f"{RUN}-layer-latency-b1.json", *files]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        if line.startswith("== "):
            geo = line.split()[1]
        elif line[:1].isalpha() and not line.startswith("method"):
            label, fx, meas_ms, meas, pred, left, sched, best = line.split()[:8]
            rows[geo, label] = float(meas), float(sched), float(best)
    assert {g for g, _ in rows} == {"llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b"}
    assert len(rows) == 36  # 3 geometries × 3 budgets × (FitPrune, FastV, two random twins)
    for (geo, label), (meas, sched, best) in rows.items():
        # the bound over every schedule at these FLOPs covers this one's (up to the search's 8-token grid)
        assert best >= sched - 0.01, (geo, label, sched, best)


def test_ceilings_refuse_a_tiny_run(tmp_path):
    tiny = tmp_path / "tiny.json"
    tiny.write_text('{"meta": {"tiny": true, "gpu": "cpu", "geometries": {}}, "rows": []}')
    with pytest.raises(SystemExit, match="a --tiny run"):
        latency_ceilings.main(["--curves", f"{RUN}-layer-latency-b1.json", str(tiny)])
