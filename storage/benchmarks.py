"""Load GPU benchmark results (``scripts/bench_gpu.py --out FILE.json``) into the ``benchmarks`` table."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path

from .store import write_rows

__all__ = ["benchmark_rows", "import_benchmarks"]

# what identifies the measured configuration (goes to the `config` JSON column)
_CONFIG_KEYS = ("geometry", "batch", "method", "label", "budget", "recipe", "dtype", "attn", "sdpa_backends",
                "tiny", "unit", "fused_scores", "cuda_graphs")
_VERSION_KEYS = ("torch", "transformers", "fitprune")


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def benchmark_rows(data: dict, run_id: str) -> list[dict]:
    """Rows of the ``benchmarks`` table from a bench_gpu result document ({"meta", "rows", ...})."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError("not a bench_gpu result: expected a JSON object with a 'rows' list (scripts/bench_gpu.py --out)")
    rows = []
    for i, r in enumerate(data["rows"]):
        missing = [k for k in ("gpu", "metric", "value", "date") if k not in r]
        if missing:
            raise ValueError(f"benchmark row {i} lacks {missing}")
        value = _number(r["value"])
        if math.isnan(value):
            continue
        rows.append({
            "run_id": run_id,
            "gpu": r["gpu"],
            "config": {k: r.get(k) for k in _CONFIG_KEYS},
            "metric": r["metric"],
            "value": value,
            "ratio_vs_unpruned": _number(r.get("ratio_vs_unpruned")),
            "flops_ratio": _number(r.get("flops_ratio")),
            "created_at": datetime.fromisoformat(r["date"]),
            "versions": {k: r.get(k) for k in _VERSION_KEYS},
        })
    return rows


def import_benchmarks(path, root=None) -> tuple[str, int]:
    """Append a bench_gpu JSON file to the store; idempotent (the run id is the file's hash)."""
    raw = Path(path).read_bytes()
    run_id = "bench-" + hashlib.sha256(raw).hexdigest()[:12]
    rows = benchmark_rows(json.loads(raw), run_id)
    if not rows:
        raise ValueError(f"{path} holds no measured rows")
    write_rows("benchmarks", rows, root=root, write_id=run_id)
    return run_id, len(rows)
