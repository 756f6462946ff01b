"""bench_gpu result files land in the benchmarks table, once."""

import json

import pytest

from flows.cli import main
from storage import catalog, store
from storage.benchmarks import benchmark_rows


def _doc():
    base = {"gpu": "H100", "torch": "2.11", "transformers": "5.17", "fitprune": "0.1.0",
            "date": "2026-11-24T14:23:26+00:00", "geometry": "llava-1.5-7b", "batch": 8, "unit": "ms"}
    return {"meta": {}, "rows": [
        dict(base, method="unpruned", label="unpruned", budget=None, metric="lm_prefill_ms", value=160.0,
             ratio_vs_unpruned=1.0, flops_ratio=1.0),
        dict(base, method="fitprune", label="fitprune@60", budget=0.6, metric="lm_prefill_ms", value=108.5,
             ratio_vs_unpruned=0.678, flops_ratio=0.472),
        dict(base, method="fitprune", label="fitprune@60", budget=0.6, metric="peak_mem_mb", value=None,
             ratio_vs_unpruned=None, flops_ratio=0.472),
    ]}


def test_import_is_idempotent_and_queryable(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_doc()))
    assert main(["--data-root", str(tmp_path / "root"), "import-benchmarks", str(path)]) == 0
    assert main(["--data-root", str(tmp_path / "root"), "import-benchmarks", str(path)]) == 0
    assert "2 rows" in capsys.readouterr().out  # the unmeasured row is skipped
    table = store.read_table("benchmarks", tmp_path / "root")
    assert table.num_rows == 2
    got = catalog.query(
        "SELECT ratio_vs_unpruned FROM benchmarks WHERE json_extract_string(config, '$.label') = $label",
        params={"label": "fitprune@60"}, root=tmp_path / "root")
    assert got.column(0).to_pylist() == [pytest.approx(0.678)]


def test_not_a_bench_file_is_a_clear_error():
    with pytest.raises(ValueError, match="rows"):
        benchmark_rows({"something": 1}, "r")
    with pytest.raises(ValueError, match="lacks"):
        benchmark_rows({"rows": [{"gpu": "x"}]}, "r")


def test_graph_rows_are_told_apart_in_the_config(tmp_path):
    doc = _doc()
    doc["rows"].append(dict(doc["rows"][1], label="fitprune@60+graphs", cuda_graphs=True, value=84.3,
                            ratio_vs_unpruned=0.548))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    assert main(["--data-root", str(tmp_path / "root"), "import-benchmarks", str(path)]) == 0
    got = catalog.query(
        "SELECT json_extract_string(config, '$.label') FROM benchmarks "
        "WHERE json_extract(config, '$.cuda_graphs')::BOOLEAN", root=tmp_path / "root")
    assert got.column(0).to_pylist() == ["fitprune@60+graphs"]
