"""Benchmark the statistical fit: a budget grid on synthetic LLaVA-1.5-sized statistics.

    python scripts/bench_fit.py                      # 655 samples x 32 layers x 576 tokens, 10 budgets
    python scripts/bench_fit.py --samples 64 --tol 0.001

Prints, per FLOPs convention, the wall time of each budget (the time since the previous one
finished: the first budget also pays for sorting the statistics, and later budgets reuse the walks
of earlier ones), α, the predicted reduction and the drops; then the total. Also times the Arrow
round trip of the statistics (the storage format). The issue's acceptance figure: a 10-budget grid
on 655 x 32 x 576 in under 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

from fitprune.calibration import CalibrationStats, synthetic_stats
from fitprune.fit import STOP_RULES, fit
from fitprune.flops import CONVENTIONS
from fitprune.presets import reference_dims
BUDGETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=655)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (other widths stay LLaVA-1.5-7B's)")
    p.add_argument("--visual", type=int, default=576)
    p.add_argument("--system", type=int, default=35)
    p.add_argument("--text", type=int, default=40)
    p.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    p.add_argument("--conventions", nargs="+", default=["fitprune-paper", "full"], choices=sorted(CONVENTIONS))
    p.add_argument("--stop", default="mean", choices=STOP_RULES)
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--no-trim", action="store_true")
    p.add_argument("--no-arrow", action="store_true", help="skip timing the Arrow round trip")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    # LLaVA-1.5-7B's language model: hidden 4096, 32 heads (no GQA), head 128, MLP 11008, vocab 32000
    dims = dataclasses.replace(reference_dims("llava-1.5-7b"), num_layers=args.layers)
    t0 = time.perf_counter()
    stats = synthetic_stats(args.samples, args.layers, args.visual, args.system, args.text, seed=args.seed)
    print(f"synthetic stats {args.samples} x {args.layers} x {args.visual}: {time.perf_counter() - t0:.2f} s")

    if not args.no_arrow:
        t0 = time.perf_counter()
        tokens, layers = stats.to_arrow()
        t1 = time.perf_counter()
        CalibrationStats.from_arrow(tokens, layers)
        t2 = time.perf_counter()
        print(f"arrow: to_arrow {t1 - t0:.2f} s, from_arrow {t2 - t1:.2f} s ({tokens.num_rows:,} token rows)")
        del tokens, layers

    grand = 0.0
    for convention in args.conventions:
        print(f"\nconvention {convention!r}, stop={args.stop!r}, tol={args.tol}, trim={not args.no_trim}")
        print(f"{'budget':>7} {'wall s':>7} {'alpha':>8} {'reduction':>9} {'feasible':>8} {'walks':>5} {'dropped':>7}  first layers")
        last = [time.perf_counter()]

        def report(done, total, r, last=last):
            now = time.perf_counter()
            counts = r.recipe.drop_counts(args.visual)
            print(
                f"{r.budget:7.2f} {now - last[0]:7.2f} {r.alpha:8.5f} {r.predicted_reduction:9.4f} {str(r.feasible):>8} "
                f"{r.iterations:5d} {sum(counts):7d}  {counts[:8]}"
            )
            last[0] = now

        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(stats, args.budgets, dims, convention=convention, stop=args.stop, tol=args.tol, trim=not args.no_trim, progress=report)
        total = time.perf_counter() - start
        grand += total
        for w in caught:
            print(f"  warning: {w.message}")
        print(f"total {total:.2f} s for {len(args.budgets)} budgets ({convention})")
    print(f"\nall conventions: {grand:.2f} s")


if __name__ == "__main__":
    main()
