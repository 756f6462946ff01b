"""The ``fitprune`` command line. Library errors become messages and exit codes here, nowhere else.

    fitprune [--data-root DIR] sweep [--budgets 0.5,0.7] [--methods fitprune,fitprune-paper,fastv,random] [--device cuda] ...
    fitprune pareto [--checkpoint FP] [--benchmark NAME]
    fitprune sql "SELECT ..."
    fitprune import-benchmarks FILE.json ...
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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.3,0.5,0.7; got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


_CUDA_SCALE = {"n_calib": 64, "n_eval": 500, "batch_size": 32}  # --device cuda without explicit counts


def _sweep_config(args):
    from flows.sweep import SweepConfig

    given = {"budgets": args.budgets, "methods": args.methods, "n_calib": args.calib_samples,
             "n_eval": args.eval_samples, "batch_size": args.batch_size, "seed": args.seed,
             "shard_size": args.shard_size, "source": args.source, "benchmarks": args.benchmarks,
             "max_new_tokens": args.max_new_tokens, "search": args.search}
    if args.device.startswith("cuda"):
        given = {**_CUDA_SCALE, **{k: v for k, v in given.items() if v is not None}}
    return SweepConfig(root=args.data_root, **{k: v for k, v in given.items() if v is not None})


def _model_spec(args, config) -> dict:
    from flows.sweep import default_spec

    if args.model is None:
        spec = default_spec(config)
    elif args.model in ("demo", "toy"):
        spec = {"kind": args.model}
    else:
        spec = {"kind": "path", "path": args.model}
    if spec["kind"] == "toy":
        spec["seed"] = config.seed
    else:
        spec["dtype"] = args.dtype
    return {**spec, "device": args.device}


def _cmd_sweep(args) -> int:
    import time

    from flows.checks import check_sweep
    from flows.sweep import run_sweep
    from storage.root import data_root
    from tasks.report import pareto_text, plot_front, summary_text

    start = time.perf_counter()
    config = _sweep_config(args)
    spec = _model_spec(args, config)
    check_sweep(config, spec)
    result = run_sweep(config, spec, progress=True)  # progress on stderr; results on stdout
    print(f"run {result['run_id']} — checkpoint {result['checkpoint']}")
    print(f"calibration: {config.n_calib} samples of {config.source}; evaluation: {config.n_eval} samples each of "
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


def build_parser() -> argparse.ArgumentParser:
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
    sweep.add_argument("--budgets", type=_floats, default=None, help="FLOPs fractions to remove (default 0.5,0.7)")
    sweep.add_argument("--methods", type=_names, default=None,
                       help="of fitprune,fitprune-paper,fastv,pyramid,dart,divprune,visionzip,random (visionzip: "
                            "LLaVA-1.5 layout only); default fitprune,fitprune-paper,fastv,random")
    sweep.add_argument("--search", choices=("auto", "small", "full"), default=None,
                       help="width of fitprune's divergence search (default auto: small on a CPU, full on a GPU)")
    sweep.add_argument("--calib-samples", type=int, default=None, help="default 16 (64 with --device cuda)")
    sweep.add_argument("--eval-samples", type=int, default=None,
                       help="per benchmark; default 40 (500 with --device cuda)")
    sweep.add_argument("--batch-size", type=int, default=None, help="default 8 (32 with --device cuda)")
    sweep.add_argument("--seed", type=int, default=None)
    sweep.add_argument("--shard-size", type=int, default=None,
                       help="samples per statistics/evaluation shard; finished shards are reused on a re-run (default 64)")
    sweep.add_argument("--source", default=None,
                       help="calibration samples (default easy-vqa:train): easy-vqa:train|test, synthetic:train|val|test, "
                            "<loader>:/path (pope, gqa, textvqa, vqav2, mme, mmbench, scienceqa, parquet), "
                            "toy, or hf:/path (processed inputs; needs `datasets`)")
    sweep.add_argument("--benchmarks", type=_names, default=None,
                       help="evaluation sources, comma list (default easy-vqa:test,synthetic:test; for toy/hf: sources "
                            "the source itself, scored by agreement with the unpruned model)")
    sweep.add_argument("--model", default=None,
                       help="demo (default), toy (random-weight tiny LLaVA, default for --source toy), "
                            "or a local checkpoint directory")
    sweep.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    sweep.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="weights of the demo or local model (default bfloat16)")
    sweep.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default 6)")
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
