"""Benchmark one sweep spread over Dask workers (flows/fanout.py) against the same sweep run serially.

    python scripts/bench_scaleout.py                 # toy model, CPU, serial vs 1 and 2 worker processes
    python scripts/bench_scaleout.py --workers 1 2 4 --eval-samples 128 --out bench.json

Every figure is measured in this run and printed with its ratio to a baseline of the same run:

1. ``sweep``: wall time of one toy sweep (``--calib-samples``, ``--eval-samples``, ``--shard-size``)
   serial in this process (one torch thread, as each worker has; the model already built), on a
   cold ``--cluster local:N`` (starting the cluster and loading the model in every worker counted)
   and on a warm one (a running cluster whose workers hold the model: ``--cluster tcp://...``);
   speed-up against serial. Each run on a fresh data root; the stored metrics of every run are
   checked equal to the serial run's.
2. ``overhead``: per-shard cost of no-op shards through the same path (``Fanout.submit`` /
   ``wait``: a key, the gpu resource, a round trip to a worker), for growing shard counts.
3. ``shards``: the same evaluation cut into more and more shards (``--eval-shard-sizes``), serial
   and on the warm cluster: how the cost grows with the number of shards.
4. ``store``: the cost of a statistics shard that finds its samples stored (a re-run), against the
   number of parts those statistics were written in: the store's share of a shard.
5. ``writes``: what an evaluation shard writes (a predictions part, an evaluations part), timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout (the workers inherit sys.path)

SPEC = {"kind": "toy", "seed": 0}


def _noop(i: int) -> int:
    return i


def _config(root, cluster=None, **kw):
    from flows.config import SweepConfig

    return SweepConfig(data_root=str(root), cluster=cluster, source="toy", model=SPEC, **kw)


def _metrics(result: dict) -> list[tuple]:
    """What must be equal across runs: per benchmark and recipe, metric, FLOPs and sample count."""
    return sorted((r["benchmark"], r["recipe_id"], r["metric"], r["flops_reduction"], r["n_samples"])
                  for r in result["summary"])


def _timed_sweep(config) -> tuple[float, dict]:
    from flows.sweep import run_sweep

    t0 = time.perf_counter()
    result = run_sweep(config)
    return time.perf_counter() - t0, result


class _Warm:
    """A running LocalCluster of ``n`` 1-thread worker processes (resource gpu=1), the model loaded in each."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import distributed

        from flows.fanout import local_cluster

        self.cluster = local_cluster(self.n)  # as --cluster local:N starts it
        self.client = distributed.Client(self.cluster)
        self.client.run(lambda: __import__("tasks.models", fromlist=["load_model"]).load_model(SPEC) and None)
        self.address = self.cluster.scheduler_address
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.cluster.close()


def bench_sweep(args, scratch: Path) -> list[dict]:
    from tasks.models import load_model

    sizes = dict(calib_samples=args.calib_samples, eval_samples=args.eval_samples, shard_size=args.shard_size,
                 batch_size=args.batch_size, budgets=tuple(args.budgets))
    load_model(SPEC)  # serial is warm too: the model already built in this process
    base, serial = _timed_sweep(_config(scratch / "serial", **sizes))
    rows = [dict(mode="serial", workers=0, seconds=base, speedup=1.0, same=True)]
    for n in args.workers:
        seconds, result = _timed_sweep(_config(scratch / f"cold-{n}", f"local:{n}", **sizes))
        rows.append(dict(mode="cold", workers=n, seconds=seconds, speedup=base / seconds,
                         same=_metrics(result) == _metrics(serial)))
        with _Warm(n) as warm:
            seconds, result = _timed_sweep(_config(scratch / f"warm-{n}", warm.address, **sizes))
        rows.append(dict(mode="warm", workers=n, seconds=seconds, speedup=base / seconds,
                         same=_metrics(result) == _metrics(serial)))
    return rows


def bench_overhead(args, warm: _Warm) -> list[dict]:
    from flows.fanout import Fanout, connect, parse_cluster
    from tasks import steps

    spec = parse_cluster(warm.address)
    rows = []
    with connect(spec) as client:
        fanout = Fanout(client, steps, spec)
        for n in args.noop_shards:
            t0 = time.perf_counter()
            futures = [fanout.submit(_noop, f"noop {i}", {"i": i}) for i in range(n)]
            assert [fanout.wait(f) for f in futures] == list(range(n))
            seconds = time.perf_counter() - t0
            rows.append(dict(shards=n, seconds=seconds, ms_per_shard=1000 * seconds / n))
    for row in rows:
        row["vs_first"] = row["ms_per_shard"] / rows[0]["ms_per_shard"]
    return rows


def bench_shards(args, scratch: Path, warm: _Warm) -> list[dict]:
    from tasks.steps import shard_ranges

    rows = []
    sizes = dict(calib_samples=8, eval_samples=args.eval_samples, batch_size=args.batch_size, budgets=(0.5,),
                 methods=("fastv",))
    for shard in args.eval_shard_sizes:
        n_shards = 2 * len(shard_ranges(args.eval_samples, shard))  # unpruned + fastv
        row = dict(shard_size=shard, eval_shards=n_shards)
        for mode, cluster in (("serial", None), ("cluster", warm.address)):
            seconds, _ = _timed_sweep(_config(scratch / f"shards-{mode}-{shard}", cluster, shard_size=shard, **sizes))
            row[f"{mode}_s"] = seconds
        rows.append(row)
    for row in rows:
        row["serial_vs_first"] = row["serial_s"] / rows[0]["serial_s"]
        row["cluster_vs_first"] = row["cluster_s"] / rows[0]["cluster_s"]
    return rows


def bench_store(args, scratch: Path) -> list[dict]:
    from storage import store
    from tasks import steps

    info = steps.model_info(SPEC)
    rows = []
    for shard in args.stats_shard_sizes:
        root = scratch / f"store-{shard}"
        calib = steps.calibration_set(args.store_samples, 0, "calib", "toy", root)
        ranges = steps.shard_ranges(calib["n"], shard)
        for s, e in ranges:
            steps.collect_stats_shard(SPEC, calib, info["checkpoint"], s, e, args.batch_size, root)
        t0 = time.perf_counter()
        again = [steps.collect_stats_shard(SPEC, calib, info["checkpoint"], s, e, args.batch_size, root)
                 for s, e in ranges]
        seconds = time.perf_counter() - t0
        assert all(r["reused"] for r in again)
        rows.append(dict(parts=len(store.list_parts("stats_layer", root)), shards=len(ranges),
                         ms_per_reused_shard=1000 * seconds / len(ranges)))
    for row in rows:
        row["vs_first"] = row["ms_per_reused_shard"] / rows[0]["ms_per_reused_shard"]
    return rows


def bench_writes(args, scratch: Path) -> list[dict]:
    """What one evaluation shard writes (its predictions part, then its evaluations row), again and again."""
    import pyarrow.parquet as pq

    from storage import store

    rows = []
    for table in ("predictions", "evaluations"):
        part = max(scratch.glob(f"*/tables/{table}/part-*.parquet"), key=lambda p: pq.read_metadata(p).num_rows)
        data = pq.read_table(part).drop_columns(["created_at"])
        root = scratch / f"writes-{table}"
        t0 = time.perf_counter()
        for i in range(args.writes):
            store.write_rows(table, data, root=root, write_id=f"bench-{i}")
        rows.append(dict(table=table, rows_per_write=data.num_rows, writes=args.writes,
                         ms_per_write=1000 * (time.perf_counter() - t0) / args.writes))
    return rows


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--noop-shards", type=int, nargs="+", default=[50, 200, 800])
    p.add_argument("--eval-shard-sizes", type=int, nargs="+", default=[64, 16, 4, 1])
    p.add_argument("--stats-shard-sizes", type=int, nargs="+", default=[16, 4, 1])
    p.add_argument("--store-samples", type=int, default=32)
    p.add_argument("--writes", type=int, default=100)
    p.add_argument("--skip", nargs="*", default=[], choices=["sweep", "overhead", "shards", "store", "writes"])
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # serial runs get one thread, as each worker process has (OMP_NUM_THREADS=1)
    scratch = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    print(f"toy model, CPU ({os.cpu_count()} cores); serial: this process, 1 torch thread; workers: processes of "
          f"1 thread, resource gpu=1; data roots under {scratch}")
    results: dict = {}
    try:
        if "sweep" not in args.skip:
            results["sweep"] = bench_sweep(args, scratch)
            _print(f"1. one sweep: calib {args.calib_samples}, eval {args.eval_samples}, shards of {args.shard_size}, "
                   f"budgets {args.budgets}, default methods (speed-up: serial seconds / seconds; same: metrics = "
                   "serial's)",
                   results["sweep"])
        with _Warm(2) as warm:
            if "overhead" not in args.skip:
                results["overhead"] = bench_overhead(args, warm)
                _print("2. no-op shards on 2 warm workers (vs_first: ms per shard / the first row's)",
                       results["overhead"])
            if "shards" not in args.skip:
                results["shards"] = bench_shards(args, scratch, warm)
                _print(f"3. the same evaluation ({args.eval_samples} samples, unpruned + fastv) in more shards, serial "
                       "and on 2 warm workers (vs_first: seconds / the first row's)", results["shards"])
        if "store" not in args.skip:
            results["store"] = bench_store(args, scratch)
            _print(f"4. a re-run's statistics shard finding its samples stored ({args.store_samples} samples), by "
                   "the parts they were written in (vs_first: ms / the first row's)", results["store"])
        if "writes" not in args.skip and list(scratch.glob("*/tables/predictions/part-*.parquet")):
            results["writes"] = bench_writes(args, scratch)
            _print("5. the store's work per evaluation shard: its largest stored part written again under new write "
                   "ids", results["writes"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
