"""How close to the FLOPs-ideal speed-up a schedule can get at all: measured layer latency against
measured pruned prefills.

Reads ``bench_layer_latency.py``'s curves and ``bench_gpu.py`` result files (the same GPU, ideally the
same call) and prints, per geometry and batch, for every measured configuration:

* ``meas/ideal``: the measured LM-prefill speed-up ÷ the FLOPs-ideal one (``bench_gpu``'s column);
* ``pred ms`` and ``left ms``: Σ over layers of the isolated stock layer's time at the schedule's token
  counts, times κ = the measured unpruned LM prefill ÷ its Σ over layers (the whole model runs its layers
  5-10 % slower than the isolated chain, H100, session 33), and the measured time left over: the pruner's
  own cost (scoring, selection, compaction) and the model's error;
* ``sched/ideal``: Σ_unpruned ÷ Σ_schedule × FLOPs×: the speed-up ÷ ideal of the schedule with no pruner
  cost, the bound for any implementation of that schedule on these layers;
* ``best/ideal``: the same for the fastest schedule at that FLOPs reduction
  (:func:`fitprune.latency.time_bound`'s ``bound_ms``: all tokens in layer 0, never adds tokens
  back, counts on a grid of ``--step`` tokens), and a schedule at the budget found from the bound's
  programme (its shape, the FLOPs it removes, its own speed-up ÷ ideal; a greedy descent, so it can fall
  short of the bound and of FastV's schedule): the kind of shape time alone favours, accuracy aside.

No GPU needed::

    python scripts/latency_ceilings.py --curves benchmarks/h100-2026-12-06-s33-layer-latency-b1.json \\
        benchmarks/h100-2026-12-06-s33-controls-b1-*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import Method, _fastv_match  # noqa: E402
from bench_layer_latency import text_config  # noqa: E402

from fitprune.flops import ModelDims  # noqa: E402
from fitprune.latency import LatencyCurve, schedule_ms, time_bound  # noqa: E402
from fitprune.recipe import Recipe  # noqa: E402

LM = {"llava-1.5-7b": "llama-7b", "llava-next-7b": "llama-7b", "qwen2-vl-7b": "qwen2-7b"}
FAMILY = {"llava-1.5-7b": "llava", "llava-next-7b": "llava_next", "qwen2-vl-7b": "qwen2_vl"}


def dims_of(model: str) -> ModelDims:
    return ModelDims.from_config(text_config(model))


def shape(visual: tuple[int, ...], n_visual: int) -> str:
    """``"2928 ×3 → 304 ×29"``: runs of equal counts left after each layer."""
    runs, last = [], None
    for v in visual:
        if runs and v == last:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
        last = v
    text = " → ".join(f"{v} ×{k}" for v, k in runs[:6])
    return text + (" → …" if len(runs) > 6 else "") + f" (of {n_visual})"


def recipes(geo: str, info: dict) -> dict[str, Recipe]:
    """Each measured label's schedule: FitPrune recipes from the file, FastV (and ``oneshot``, FitPrune's scores
    on FastV's schedule) rebuilt as bench_gpu builds it, random twins with their original's schedule."""
    out = {}
    ns = SimpleNamespace(dims=dims_of(LM[geo]), n_visual=info["n_visual"], n_other=info["n_other"],
                         family=FAMILY[geo], name=geo)
    for label, r in info["recipes"].items():
        recipe = Recipe(drop_fractions=tuple(r["drop_fractions"]), family=FAMILY[geo])
        out[label] = recipe
        fastv = _fastv_match(ns, Method(label, "fitprune", None, recipe, ""))
        out[fastv.label] = out[fastv.label.replace("fastv", "oneshot")] = fastv.recipe  # oneshot: FastV's schedule
    for label in list(out):
        out[f"{label}/random"] = out[label]
    return out


def report(curves: dict, path: Path, step: int) -> list[str]:
    data = json.loads(path.read_text())
    if data["meta"].get("tiny"):
        raise SystemExit(f"{path}: a --tiny run; the curves are of the 7B layers, so its times do not compare")
    unknown = sorted(set(data["meta"]["geometries"]) - set(LM))
    if unknown:
        raise SystemExit(f"{path}: geometries {unknown} have no layer model here; known: {', '.join(LM)}")
    lines = []
    for geo, info in data["meta"]["geometries"].items():
        dims = dims_of(LM[geo])
        schedules = recipes(geo, info)
        n_vis, n_oth = info["n_visual"], info["n_other"]
        by = {}
        for r in data["rows"]:
            if r["geometry"] == geo and r["metric"] == "lm_prefill_ms" and r["cuda_graphs"]:
                by.setdefault(r["batch"], {})[r["label"].removesuffix("+graphs")] = r
        for batch, rows in sorted(by.items()):
            curve = curves.get((LM[geo], batch))
            if curve is None or "unpruned" not in rows:
                lines.append(f"{geo} b{batch}: no curve for {LM[geo]} at batch {batch}, or no unpruned row; skipped")
                continue
            full_pred = schedule_ms(curve, dims, None, n_vis, n_oth)
            kappa = rows["unpruned"]["value"] / full_pred
            lines.append(f"\n== {geo} batch {batch} ({n_vis} visual + {n_oth} other): unpruned LM {rows['unpruned']['value']:.1f} ms "
                         f"measured, Σ layers {full_pred:.1f} ms, κ = {kappa:.3f}")
            lines.append(f"{'method':<22} {'FLOPs×':>7} {'meas ms':>8} {'meas/ideal':>10} {'pred ms':>8} {'left ms':>8} "
                         f"{'sched/ideal':>11} {'best/ideal':>10}  a schedule at the budget, accuracy aside (visual tokens left)")
            best_cache = {}
            for label, r in rows.items():
                if label == "unpruned" or label not in schedules:
                    continue
                fx = r["flops_ratio"]
                meas = rows["unpruned"]["value"] / r["value"] * fx
                pred = schedule_ms(curve, dims, schedules[label], n_vis, n_oth)
                sched = full_pred / pred * fx
                key = round(fx, 4)
                if key not in best_cache:
                    best_cache[key] = time_bound(curve, dims, n_vis, n_oth, 1 - fx, step=step)
                best = best_cache[key]
                bound = full_pred / best.bound_ms * fx
                lines.append(f"{label:<22} {fx:>7.3f} {r['value']:>8.1f} {meas:>10.3f} {kappa * pred:>8.1f} "
                             f"{r['value'] - kappa * pred:>8.1f} {sched:>11.3f} {bound:>10.3f}  "
                             f"{shape(best.visual, n_vis)}: removes {best.reduction:.3f}, "
                             f"{full_pred / best.ms * fx:.3f} of ideal")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--curves", required=True, action="append", help="a bench_layer_latency.py JSON file (repeat for more)")
    p.add_argument("results", nargs="+", help="bench_gpu.py JSON files (graphed rows are read)")
    p.add_argument("--step", type=int, default=8, help="token grid of the fastest-schedule search")
    args = p.parse_args(argv)
    curves, gpus = {}, set()
    for f in args.curves:
        d = json.loads(Path(f).read_text())
        gpus.add(d["meta"]["gpu"])
        for c in d["curves"]:
            curves[(c["model"], c["batch"])] = LatencyCurve.from_json(c)
    for f in args.results:
        gpus.add(json.loads(Path(f).read_text())["meta"]["gpu"])
    if len(gpus) > 1:
        print(f"warning: the files come from different GPUs: {sorted(gpus)}", file=sys.stderr)
    for f in args.results:
        print("\n".join(report(curves, Path(f), args.step)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
