"""scripts/compare_bench.py: paired old/new ratios of bench_gpu results, on hand-made result files."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_bench", ROOT / "scripts" / "compare_bench.py")
compare_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_bench)


def _row(label, value, *, graphs=False, method=None, flops=1.0, ratio=1.0, metric="lm_prefill_ms", geometry="g",
         batch=8):
    return {"geometry": geometry, "batch": batch, "label": label, "metric": metric, "value": value,
            "cuda_graphs": graphs, "method": method or label.split("@")[0], "flops_ratio": flops,
            "ratio_vs_unpruned": ratio}


def _write(path, rows):
    path.write_text(json.dumps({"meta": {}, "errors": [], "rows": rows}))
    return str(path)


def _run(tmp_path, old_values, new_values):
    """Files of one pair: unpruned 100 ms, three pruned labels, eager and graphed, plus a row of another metric."""
    def rows(values):
        out = [_row("unpruned", values[0], method="unpruned"),
               _row("unpruned", values[0], graphs=True, method="unpruned"),
               _row("fitprune@40", 1.0, metric="prefill_ms")]
        for i, v in enumerate(values[1:]):
            out.append(_row(f"fitprune@{40 + 10 * i}", v, graphs=i % 2 == 1, flops=0.5, ratio=v / values[0]))
        return out
    return _write(tmp_path / "old.json", rows(old_values)), _write(tmp_path / "new.json", rows(new_values))


def test_paired_ratios_and_their_standard_error(tmp_path, capsys):
    old, new = _run(tmp_path, [100.0, 60.0, 50.0, 40.0], [101.0, 57.0, 50.0, 38.0])
    pairs = compare_bench.compare([(compare_bench.load_rows(old, "lm_prefill_ms"),
                                    compare_bench.load_rows(new, "lm_prefill_ms"))])
    assert len(pairs) == 5  # 2 unpruned + 3 pruned rows of the metric; the prefill_ms row is another metric
    (summary,) = compare_bench.summarise(pairs)
    ratios = [57 / 60, 50 / 50, 38 / 40]  # the unpruned pair (101 / 100) is left out
    assert summary["n"] == 3 and summary["faster"] == 2
    assert summary["new_over_old"] == pytest.approx(statistics.mean(ratios))
    assert summary["se"] == pytest.approx(statistics.stdev(ratios) / math.sqrt(3))
    graphed = next(p for p in pairs if p.key == ("g", 8, "fitprune@50+graphs"))
    assert compare_bench.Pair.of_ideal(graphed.old) == pytest.approx(0.5 / 0.5)

    out_json = tmp_path / "cmp.json"
    assert compare_bench.main([old, new, "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "pruned new/old 0.9667" in printed and "new faster in 2" in printed
    written = json.loads(out_json.read_text())
    assert len(written["pairs"]) == 5 and written["summary"][0]["n"] == 3


def test_each_pair_is_summarised_on_its_own(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    files = [*_run(a, [100.0, 60.0, 50.0, 40.0], [100.0, 54.0, 45.0, 36.0]),
             *_run(b, [100.0, 60.0, 50.0, 40.0], [100.0, 66.0, 55.0, 44.0])]
    maps = [compare_bench.load_rows(f, "lm_prefill_ms") for f in files]
    summary = compare_bench.summarise(compare_bench.compare([(maps[0], maps[1]), (maps[2], maps[3])]))
    assert [(s["pair"], round(s["new_over_old"], 6), s["faster"]) for s in summary] == [(1, 0.9, 3), (2, 1.1, 0)]
    assert summary[0]["se"] == pytest.approx(0.0, abs=1e-12)


def test_graphed_rows_are_told_apart_from_eager_ones_without_the_suffix(tmp_path):
    path = _write(tmp_path / "r.json", [_row("fitprune@40", 50.0), _row("fitprune@40", 45.0, graphs=True)])
    rows = compare_bench.load_rows(path, "lm_prefill_ms")
    assert set(rows) == {("g", 8, "fitprune@40"), ("g", 8, "fitprune@40+graphs")}


def test_mismatched_runs_and_wrong_files_are_errors(tmp_path, capsys):
    old, new = _run(tmp_path, [100.0, 60.0, 50.0, 40.0], [100.0, 60.0, 50.0, 40.0])
    fewer = _write(tmp_path / "fewer.json", [_row("unpruned", 100.0, method="unpruned")])
    assert compare_bench.main([old, fewer]) == 1
    assert "pair 1: old and new differ in configurations" in capsys.readouterr().err
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps([{"metric": "kernels_ms"}]))
    assert compare_bench.main([old, str(profile)]) == 1
    assert "expected a JSON object with a 'rows' list" in capsys.readouterr().err
    assert compare_bench.main([old, new, "--metric", "decode_tok_s"]) == 1
    assert "no 'decode_tok_s' rows" in capsys.readouterr().err
    dup = _write(tmp_path / "dup.json", [_row("fitprune@40", 50.0), _row("fitprune@40", 51.0)])
    assert compare_bench.main([dup, dup]) == 1
    assert "two lm_prefill_ms rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        compare_bench.main([old, new, old])
    assert exit_.value.code == 2 and "(old, new) pairs; got 3 files" in capsys.readouterr().err
