"""Load GPU benchmark results (``scripts/bench_gpu.py --out FILE.json``) into the ``benchmarks`` table."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path

from .store import write_rows

__all__ = ["NothingToImport", "benchmark_rows", "import_benchmark_files", "import_benchmarks", "read_benchmark_file"]

# what identifies the measured configuration (goes to the `config` JSON column)
_CONFIG_KEYS = ("geometry", "batch", "method", "label", "budget", "recipe", "dtype", "attn", "sdpa_backends",
                "tiny", "unit", "fused_scores", "cuda_graphs")
_VERSION_KEYS = ("torch", "transformers", "fitprune")
_WHAT = "a JSON object with a 'rows' list, as scripts/bench_gpu.py --out writes"


class NothingToImport(ValueError):
    """A file with nothing to import: not JSON, not a bench_gpu result, or no measured row.

    ``import_benchmark_files`` skips such files (and fails only if every file is one)."""


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def benchmark_rows(data: dict, run_id: str) -> list[dict]:
    """Rows of the ``benchmarks`` table from a bench_gpu result document ({"meta", "rows", ...})."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise NothingToImport(f"not a bench_gpu result: expected {_WHAT}")
    rows = []
    for i, r in enumerate(data["rows"]):
        if not isinstance(r, dict):
            raise ValueError(f"benchmark row {i} is a {type(r).__name__}, not a JSON object")
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


def read_benchmark_file(path) -> tuple[str, list[dict]]:
    """The run id (the file's hash) and ``benchmarks`` rows of a bench_gpu result file.

    ``NothingToImport`` for a file that is not JSON, not a result or holds no measured row;
    ``ValueError`` for a directory or a result with a malformed row; each message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the result files in it, e.g. {path / '*.json'}")
    raw = path.read_bytes()  # FileNotFoundError names a missing file
    run_id = "bench-" + hashlib.sha256(raw).hexdigest()[:12]
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NothingToImport(f"{path} is not JSON ({exc}); expected {_WHAT}") from None
    try:
        rows = benchmark_rows(data, run_id)
    except NothingToImport as exc:
        raise NothingToImport(f"{path} is {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{path}: {exc}; fix or regenerate the file (scripts/bench_gpu.py --out)") from None
    if not rows:
        raise NothingToImport(f"{path} holds no measured rows (every value is null)")
    return run_id, rows


def import_benchmarks(path, root=None) -> tuple[str, int]:
    """Append a bench_gpu JSON file to the store; idempotent (the run id is the file's hash)."""
    run_id, rows = read_benchmark_file(path)
    write_rows("benchmarks", rows, root=root, write_id=run_id)
    return run_id, len(rows)


def import_benchmark_files(paths, root=None) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """Import many files, as ``fitprune import-benchmarks benchmarks/*.json`` does.

    Every file is read before any is written: a directory, a missing file or a result file with
    a malformed row raises (nothing is written). Files with nothing to import (``NothingToImport``:
    other JSON, such as profiles) are skipped; if every file is skipped, that raises. Returns
    ``(imported, skipped)``: ``[(path, run_id, n_rows)]`` and ``[(path, why)]``.
    """
    paths = list(paths)
    if not paths:
        raise ValueError(f"no files given; pass bench_gpu result files ({_WHAT})")
    parsed, skipped = [], []
    for path in paths:
        try:
            parsed.append((str(path), *read_benchmark_file(path)))
        except NothingToImport as exc:
            skipped.append((str(path), str(exc)))
    if not parsed:
        if len(skipped) == 1:
            raise NothingToImport(f"{skipped[0][1]}; nothing imported")
        raise NothingToImport(f"none of the {len(skipped)} files holds bench_gpu results ({_WHAT}): "
                              f"{', '.join(p for p, _ in skipped)}; nothing imported")
    imported = []
    for path, run_id, rows in parsed:
        write_rows("benchmarks", rows, root=root, write_id=run_id)
        imported.append((path, run_id, len(rows)))
    return imported, skipped
