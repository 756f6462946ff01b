"""Plain reporting of a sweep result: a markdown table and an optional matplotlib plot."""

from __future__ import annotations

import os
from pathlib import Path

_COLUMNS = ("method", "recipe_id", "flops_reduction", "metric_name", "metric", "n_samples")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_report(result: dict) -> str:
    """Pareto front and every evaluated recipe of a sweep result, as markdown."""
    lines = [f"# FitPrune sweep {result['run_id']}", "", f"Checkpoint `{result['checkpoint']}`", "",
             "## Pareto front", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in result["pareto_rows"]:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in _COLUMNS) + " |")
    cols = ("method", "recipe_id", "flops_reduction", "metric", "n_samples", "wall_s")
    lines += ["", "## All evaluations", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_front(result: dict, out_dir: str) -> str | None:
    """``<out_dir>/<run_id>-pareto.png`` (metric vs measured FLOPs reduction per method), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in result["rows"]:
        by_method.setdefault(row["method"], []).append((row["flops_reduction"], row["metric"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in sorted(by_method.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("measured prefill FLOPs reduction")
    ax.set_ylabel("agreement with the unpruned model")
    ax.set_title(result["checkpoint"])
    ax.legend()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(out_dir, f"{result['run_id']}-pareto.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
