"""The ``fitprune`` command line. Library errors become messages and exit codes here, nowhere else.

    fitprune [--data-root DIR] sweep [--budgets 0.3,0.5,0.7] [--methods fitprune,fastv,random] [--shard-size 64] ...
    fitprune pareto [--checkpoint FP] [--benchmark NAME]
    fitprune sql "SELECT ..."
    fitprune presets
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE, EXIT_FAILED = 2, 1


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.3,0.5,0.7; got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _cmd_sweep(args) -> int:
    from flows.sweep import SweepConfig, run_sweep
    from storage.catalog import format_table

    config = SweepConfig(budgets=args.budgets, methods=args.methods, n_calib=args.calib_samples,
                         n_eval=args.eval_samples, batch_size=args.batch_size, seed=args.seed, root=args.data_root,
                         shard_size=args.shard_size, source=args.source)
    result = run_sweep(config, progress=True)  # progress on stderr; stdout keeps the result table
    print(f"run {result['run_id']} — Pareto front (checkpoint {result['checkpoint']}):")
    print(format_table(result["pareto"].select(
        ["method", "recipe_id", "flops_reduction", "metric_name", "metric", "n_samples"])))
    return 0


def _cmd_pareto(args) -> int:
    from storage.catalog import format_table, pareto

    print(format_table(pareto(args.data_root, checkpoint=args.checkpoint, benchmark=args.benchmark)))
    return 0


def _cmd_sql(args) -> int:
    import duckdb

    from storage.catalog import format_table, query, view_names

    try:
        table = query(args.query, root=args.data_root)
    except duckdb.Error as err:
        print(f"fitprune sql: {err}\nviews: {', '.join(view_names())}", file=sys.stderr)
        return EXIT_FAILED
    print(format_table(table, max_rows=args.max_rows))
    return 0


def _cmd_presets(args) -> int:
    from fitprune.flops import recipe_reduction
    from fitprune.presets import list_presets, model_info, preset, reference_dims

    for name in list_presets():
        recipe = preset(name)
        model_key = name.split("/")[0]
        info = model_info(model_key)
        n = info.get("visual_tokens") or info.get("visual_tokens_reference")
        red = recipe_reduction(recipe, reference_dims(model_key), n, 0, convention="fitprune-paper")
        print(f"{name:22s} family={recipe.family:11s} removes {100 * red:6.2f} % (paper convention, {n} visual)")
    return 0


def _cmd_import_benchmarks(args) -> int:
    from storage.benchmarks import import_benchmarks

    for path in args.files:
        run_id, n = import_benchmarks(path, root=args.data_root)
        print(f"{path}: {n} rows as {run_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitprune", description="Fit and apply FitPrune visual-token pruning recipes.")
    parser.add_argument("--data-root", default=None,
                        help="data root (default: $FITPRUNE_DATA, else ~/.cache/fitprune)")
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="calibrate, fit a budget grid for each method, evaluate, print the Pareto front")
    sweep.add_argument("--budgets", type=_floats, default=(0.3, 0.5, 0.7), help="FLOPs fractions to remove (default 0.3,0.5,0.7)")
    sweep.add_argument("--methods", type=_names, default=("fitprune", "fastv", "random"))
    sweep.add_argument("--calib-samples", type=int, default=32)
    sweep.add_argument("--eval-samples", type=int, default=64)
    sweep.add_argument("--batch-size", type=int, default=16)
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--shard-size", type=int, default=64,
                       help="samples per statistics/evaluation shard; finished shards are reused on a re-run (default 64)")
    sweep.add_argument("--source", default="demo-synthetic",
                       help="sample source: 'demo' (synthetic inputs, default) or 'hf:/path/to/dataset' "
                            "(a local Hugging Face datasets directory or file of processed inputs; needs `datasets`)")
    sweep.set_defaults(func=_cmd_sweep)

    pareto = sub.add_parser("pareto", help="print the Pareto-best recipes per checkpoint and benchmark")
    pareto.add_argument("--checkpoint")
    pareto.add_argument("--benchmark")
    pareto.set_defaults(func=_cmd_pareto)

    sql = sub.add_parser("sql", help="run a SQL query against the DuckDB catalog and print the result")
    sql.add_argument("query")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=_cmd_sql)

    bench = sub.add_parser("import-benchmarks", help="load scripts/bench_gpu.py result files into the benchmarks table")
    bench.add_argument("files", nargs="+")
    bench.set_defaults(func=_cmd_import_benchmarks)

    presets = sub.add_parser("presets", help="list the published recipes and their FLOPs reduction")
    presets.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fitprune sql ... | head`: the reader left; stay quiet like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"fitprune {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
