"""Plain reporting of a sweep result: text and markdown tables, and an optional matplotlib plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

_PARETO = ("benchmark", "method", "budget", "flops_reduction", "metric_name", "metric", "stderr", "n_scored",
           "recipe_id")


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)


def _stderr(row: dict) -> float:
    return math.nan if row.get("stderr") is None else float(row["stderr"])


def _summary_rows(result: dict) -> list[list[str]]:
    rows = []
    for r in sorted(result["summary"], key=lambda r: (r["benchmark"], r["budget"] or 0.0, r["method"])):
        rows.append([r["benchmark"], r["method"], _cell(r["budget"]), f"{r['flops_reduction']:.3f}",
                     _cell(r.get("flops_reduction_paper")), f"{r['metric']:.3f} ± {_cell(_stderr(r))}", str(r["n_scored"]), str(r["n_failed"]),
                     f"{r['wall_s']:.1f}"])
    return rows


_SUMMARY = ("benchmark", "method", "budget", "FLOPs removed", "(paper conv.)", "metric ± stderr", "n", "failed",
            "seconds")


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def summary_text(result: dict) -> str:
    """Every (benchmark, method, budget) of the run, aligned for a terminal (the run_evaluations view)."""
    return _aligned([list(_SUMMARY)] + _summary_rows(result))


def pareto_text(result: dict) -> str:
    """The checkpoint's Pareto front (the pareto view), aligned for a terminal."""
    rows = [[_cell(r.get(c)) for c in _PARETO] for r in result["pareto_rows"]]
    return _aligned([list(_PARETO)] + rows) + f"\n({len(rows)} row{'s' if len(rows) != 1 else ''})"


def markdown_report(result: dict) -> str:
    """Pareto front and every evaluated recipe of a sweep result, as markdown."""
    lines = [f"# FitPrune sweep {result['run_id']}", "", f"Checkpoint `{result['checkpoint']}`", "",
             "## Pareto front", "", "| " + " | ".join(_PARETO) + " |", "|" + "---|" * len(_PARETO)]
    for row in result["pareto_rows"]:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in _PARETO) + " |")
    lines += ["", "## All evaluations of this run (metric ± standard error of the per-sample scores)", "",
              "| " + " | ".join(_SUMMARY) + " |", "|" + "---|" * len(_SUMMARY)]
    for row in _summary_rows(result):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_MARKERS = "osD^vP*X<>"
_LINES = ("-", "--", "-.", ":")


def _model_label(result: dict) -> str:
    spec = (result.get("config") or {}).get("model") or {}
    kind = spec.get("kind")
    name = {"demo": "demo LLaVA", "toy": "toy model"}.get(kind, spec.get("path", "model"))
    return f"{name} ({result['checkpoint']})"


def front_figure(result: dict):
    """The figure of ``plot_front`` (matplotlib, Agg): one panel per benchmark.

    Per method a line of metric vs measured FLOPs reduction with standard-error bars, each method with
    its own marker and line style and drawn slightly offset in FLOPs so overlapping methods stay
    visible; the unpruned model as a black star at 0; the Pareto front (``pareto_rows``) as a grey
    step line with ringed points. Titles name the model and the benchmark.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = sorted({r["benchmark"] for r in result["summary"]})
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5.5 * len(benchmarks), 4.2), squeeze=False)
    methods = sorted({r["method"] for r in result["summary"]} - {"none"})
    for ax, benchmark in zip(axes[0], benchmarks):
        rows = [r for r in result["summary"] if r["benchmark"] == benchmark]
        for k, method in enumerate(methods):
            points = sorted((r["flops_reduction"], r["metric"], _stderr(r)) for r in rows if r["method"] == method)
            if not points:
                continue
            xs, ys, es = zip(*points)
            shift = 0.004 * (k - (len(methods) - 1) / 2)  # a small offset keeps coinciding methods apart
            ax.errorbar([x + shift for x in xs], ys, yerr=[0 if math.isnan(e) else e for e in es],
                        marker=_MARKERS[k % len(_MARKERS)], linestyle=_LINES[k % len(_LINES)], capsize=3,
                        label=method)
        for r in rows:
            if r["method"] == "none":
                ax.errorbar([r["flops_reduction"]], [r["metric"]], yerr=[0 if math.isnan(_stderr(r)) else _stderr(r)],
                            marker="*", markersize=12, color="black", linestyle="none", capsize=3, label="unpruned")
        front = sorted((r["flops_reduction"], r["metric"]) for r in result["pareto_rows"] if r["benchmark"] == benchmark)
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="grey", alpha=0.6, linewidth=3, zorder=0, label="Pareto front")
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="grey", linewidths=1.5, zorder=3)
        ax.set_xlabel("measured prefill FLOPs reduction")
        ax.set_ylabel(rows[0]["metric_name"] if rows else "metric")
        ax.set_title(f"{benchmark}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{_model_label(result)}, run {result['run_id']}", fontsize=9)
    return fig


def plot_front(result: dict, out_dir: str) -> str | None:
    """``<out_dir>/<run_id>-pareto.png`` of ``front_figure``; None without matplotlib."""
    try:
        import matplotlib.pyplot as plt

        fig = front_figure(result)
    except ImportError:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(out_dir, f"{result['run_id']}-pareto.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
