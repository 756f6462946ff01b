"""The ``fitprune`` command line. Library errors become messages and exit codes here, nowhere else.

    fitprune [--data-root DIR] sweep [--budgets 0.5,0.7] [--methods fitprune,fitprune-paper,fastv,random] [--device cuda] ...
    fitprune pareto [--checkpoint FP] [--benchmark NAME]
    fitprune sql "SELECT ..."
    fitprune import-benchmarks FILE.json ...
    fitprune export-checkpoint DIR [--model demo|toy|DIR] [--emit-event]
    fitprune presets

``--data-root`` goes before the subcommand or after it (the latter wins).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

EXIT_USAGE, EXIT_FAILED = 2, 1


def _cmd_sweep(args) -> int:
    import time

    from flows.checks import check_sweep
    from flows.cli_config import config_from_args
    from flows.sweep import run_sweep
    from storage.root import data_root
    from tasks.report import pareto_text, plot_front, summary_text

    start = time.perf_counter()
    config = config_from_args(args).resolved()
    check_sweep(config)
    result = run_sweep(config, progress=True)  # progress on stderr; results on stdout
    print(f"run {result['run_id']} — checkpoint {result['checkpoint']}")
    print(f"calibration: {config.calib_samples} samples of {config.source}; evaluation: {config.eval_samples} samples each of "
          f"{', '.join(config.benchmarks)}; budgets {', '.join(f'{b:g}' for b in config.budgets)}")
    print(summary_text(result))
    print("\nPareto front:")
    print(pareto_text(result))
    png = plot_front(result, str(data_root(args.data_root) / "reports"))
    print(f"\nplot: {png}" if png else "\nplot: skipped (pip install matplotlib)")
    print(f"took {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_pareto(args) -> int:
    from storage.catalog import format_table, pareto
    from storage.root import check_root

    root = check_root(args.data_root, create=False, writable=False)  # never create a root to read it
    print(format_table(pareto(root, checkpoint=args.checkpoint, benchmark=args.benchmark)))
    return 0


def _cmd_sql(args) -> int:
    import duckdb

    from storage.catalog import ReadOnlyQueryError, format_table, query, view_names
    from storage.root import check_root

    check_root(args.data_root, create=False, writable=False)  # never create a root to read it
    try:
        table = query(args.query, root=args.data_root)
    except ReadOnlyQueryError as err:  # not one SELECT: nothing ran
        print(f"fitprune sql: {err}", file=sys.stderr)
        return EXIT_FAILED
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
    from storage.benchmarks import import_benchmark_files
    from storage.root import check_root

    check_root(args.data_root)
    imported, skipped = import_benchmark_files(args.files, root=args.data_root)  # skips non-result files
    for _, why in skipped:
        print(f"fitprune import-benchmarks: warning: {why}; skipped", file=sys.stderr)
    for path, run_id, n in imported:
        print(f"{path}: {n} rows as {run_id}")
    return 0


def _cmd_export_checkpoint(args) -> int:
    from flows.config import DemoModel, PathModel, ToyModel
    from tasks.export import emit_created, export_checkpoint

    name = args.model
    model = ToyModel(seed=0) if name == "toy" else DemoModel(dtype=args.dtype) if name == "demo" else \
        PathModel(path=name, dtype=args.dtype)
    done = export_checkpoint(model.model_dump(), args.dir, root=args.data_root)
    print(f"{done['path']}: checkpoint {done['checkpoint']}" +
          ("" if done["processor"] else " (no processor: sweep it with --source toy or hf:/path)"))
    if args.emit_event:
        print(f"emitted fitprune.checkpoint.created for {emit_created(done['path'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flows.cli_config import add_config_options
    from tasks.models import DEFAULT_DTYPE, DTYPES

    parser = argparse.ArgumentParser(prog="fitprune", description="Fit and apply FitPrune visual-token pruning recipes.")
    parser.add_argument("--data-root", default=None,
                        help="data root (default: $FITPRUNE_DATA, else ~/.cache/fitprune)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name, **kw):  # --data-root after the subcommand too; given there, it wins
        command = sub.add_parser(name, **kw)
        command.add_argument("--data-root", default=argparse.SUPPRESS,
                             help="data root (default: $FITPRUNE_DATA, else ~/.cache/fitprune)")
        return command

    sweep = add_parser("sweep", help="calibrate, fit a budget grid for each method, evaluate, print the Pareto front")
    add_config_options(sweep)  # one option per SweepConfig field (flows.cli_config)
    sweep.set_defaults(func=_cmd_sweep)

    pareto = add_parser("pareto", help="print the Pareto-best recipes per checkpoint and benchmark")
    pareto.add_argument("--checkpoint")
    pareto.add_argument("--benchmark")
    pareto.set_defaults(func=_cmd_pareto)

    sql = add_parser("sql", help="run a SQL query against the DuckDB catalog and print the result")
    sql.add_argument("query")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=_cmd_sql)

    bench = add_parser("import-benchmarks", help="load scripts/bench_gpu.py result files into the benchmarks table "
                       "(other files are skipped with a warning)")
    bench.add_argument("files", nargs="+")
    bench.set_defaults(func=_cmd_import_benchmarks)

    export = add_parser("export-checkpoint", help="write a model (default the demo model) as a checkpoint directory "
                        "the pipeline loads, processor files included")
    export.add_argument("dir", help="a new (or empty) directory; written beside it, then renamed into place")
    export.add_argument("--model", default="demo", help="demo (default), toy, or a checkpoint directory")
    export.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES),
                        help="weights to write (demo or checkpoint; default bfloat16)")
    export.add_argument("--emit-event", action="store_true",
                        help="then emit fitprune.checkpoint.created naming it (needs PREFECT_API_URL)")
    export.set_defaults(func=_cmd_export_checkpoint)

    presets = sub.add_parser("presets", help="list the published recipes and their FLOPs reduction")
    presets.set_defaults(func=_cmd_presets)
    return parser


class Terminated(BaseException):
    """SIGTERM (a scheduler or ``kill`` stopping the run): unwinds like Ctrl-C, so the run's end row
    says ``interrupted`` instead of leaving it ``running``."""


def _terminate(signum, frame):
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except Terminated as err:
        print(f"fitprune {args.command}: {err}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fitprune sql ... | head`: the reader left; stay quiet like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"fitprune {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
