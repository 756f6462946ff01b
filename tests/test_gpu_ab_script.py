"""scripts/gpu_ab.sh end to end on the CPU (bench_gpu --tiny): both sides run, from their own trees, and
everything comes back in one bundle that scripts/compare_bench.py reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_ab_runs_old_and_new_and_bundles_them(tmp_path):
    tree = tmp_path / "tree"
    for part in ("fitprune", "scripts"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    old = tree / ".baseline"
    shutil.copytree(tree, old)
    init = old / "fitprune" / "__init__.py"
    init.write_text(init.read_text() + '__version__ = "old-side"\n')  # bench_gpu records the version it imported
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GEOMETRIES": "llava-1.5-7b", "BATCHES": "1",
           "ORDER": "old-first", "BENCH_ARGS": "--tiny --device cpu --parts prefill --fused-scores off "
                                               "--cuda-graphs off --budgets 60"}
    proc = subprocess.run(["bash", str(tree / "scripts" / "gpu_ab.sh")], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[:2] == ["old llava-1.5-7b exit 0", "new llava-1.5-7b exit 0"]
    assert sorted(p.name for p in out.iterdir()) == ["ab.tgz"]  # the folder went into the bundle
    with tarfile.open(out / "ab.tgz") as bundle:
        bundle.extractall(tmp_path / "back", filter="data")
    back = tmp_path / "back" / "ab"
    results = {side: json.loads((back / f"llava-1.5-7b-{side}.json").read_text()) for side in ("old", "new")}
    assert all(r["rows"] and not r["errors"] for r in results.values())
    assert results["old"]["meta"]["fitprune"] == "old-side"  # each side imported its own tree
    assert results["new"]["meta"]["fitprune"] != "old-side"
    cmp = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_bench.py"),
                          str(back / "llava-1.5-7b-old.json"), str(back / "llava-1.5-7b-new.json")],
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0 and "pair 1: llava-1.5-7b batch 1: pruned new/old" in cmp.stdout


def test_gpu_ab_refuses_to_run_without_the_old_tree(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_ab.sh")], cwd=tmp_path,
                          env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no .baseline/scripts/bench_gpu.py" in proc.stderr
