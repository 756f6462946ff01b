"""One sweep on a real Dask cluster (2 worker processes, CPU, toy model): the same stored rows as a
serial run, through the CLI path, the Prefect flow and two sweeps sharing the workers; a worker
killed mid-shard (its rows written, its result not sent) is replaced and its shard run again
without duplicate rows; a worker that hangs ends the run ``failed`` naming the missing shards.

The cluster is a module fixture, reached by its scheduler address, as ``--cluster tcp://...``
users do. ``flows.fanout``'s test hold (``HOLD_ENV``) stops one shard on its worker, so a test can
kill or freeze that worker while the shard is in flight; waits poll, bounded by the sweep's own
``?timeout=``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import distributed
import pytest

from flows.fanout import HOLD_ENV, ShardTimeout, check_cluster, local_cluster, method_groups, parse_cluster
from flows.config import SweepConfig
from flows.sweep import run_sweep
from storage import catalog, store
from storage.compare import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SPEC = {"kind": "toy", "seed": 0}
SIZES = dict(model=SPEC, budgets=(0.5,), methods=("fitprune", "fastv", "random"), calib_samples=4, eval_samples=4,
             batch_size=4, shard_size=2, source="toy")
N_EVAL_SHARDS = 4 * 2  # (unpruned + 3 methods) x 2 shards of 2 samples


@pytest.fixture(scope="module")
def serial(one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("serial")
    run_sweep(SweepConfig(data_root=str(root), **SIZES))
    return snapshot(root)


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def cluster(hold_dir):
    """A scheduler and two worker processes (1 thread, resource gpu=1 each), as ``--cluster local:2`` starts them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOLD_ENV, str(hold_dir))  # workers inherit it; it does nothing until a test arms it
        mp.setenv("OMP_NUM_THREADS", "1")
        with local_cluster(2) as c, distributed.Client(c) as client:
            _warm(client)
            yield c.scheduler_address, client


def _warm(client) -> None:
    """Each worker imports the steps and builds the toy model, as its first shard would: waits on a
    cold worker then do not count against a test's short timeout."""
    client.run(lambda: __import__("tasks.models", fromlist=["load_model"]).load_model(SPEC) and None)


def _models(client) -> dict[str, list[str]]:
    return client.run(lambda: sorted(__import__("tasks.models", fromlist=["_MODELS"])._MODELS))


def _transitions(client) -> dict[str, int]:
    return client.run(lambda dask_worker: dask_worker.state.transition_counter)


def _arm(hold_dir: Path, prefix: str) -> None:
    for name in ("held", "release"):
        (hold_dir / name).unlink(missing_ok=True)
    (hold_dir / "prefix").write_text(prefix)


def _disarm(hold_dir: Path) -> None:
    (hold_dir / "release").write_text("")
    (hold_dir / "prefix").unlink(missing_ok=True)


def _in_thread(fn):
    """Run ``fn`` in a thread; returns (thread, box) with box["result"] or box["error"] when it ends."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 (handed to the test)
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for_hold(hold_dir: Path, thread: threading.Thread, box: dict) -> tuple[int, str]:
    """Poll until a worker holds a shard (its pid and label); fail if the sweep ended first."""
    held = hold_dir / "held"
    while not (held.exists() and held.read_text()):
        assert thread.is_alive(), f"the sweep ended before any shard was held: {box}"
        time.sleep(0.05)
    pid, label = held.read_text().split(" ", 1)
    return int(pid), label


def _pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def _assert_no_duplicates(root) -> None:
    evals = store.read_table("evaluations", root)
    keys = Counter(zip(*(evals.column(c).to_pylist() for c in ("run_id", "eval_set", "recipe_id", "shard"))))
    assert max(keys.values()) == 1, "an evaluation shard was stored twice"
    preds = store.read_table("predictions", root)
    keys = Counter(zip(*(preds.column(c).to_pylist() for c in ("run_id", "eval_set", "recipe_id", "sample_id"))))
    assert max(keys.values()) == 1, "a prediction was stored twice"


def test_cluster_values_are_parsed_or_refused_with_the_forms():
    assert parse_cluster(None) is None and parse_cluster("") is None
    local = parse_cluster("local:2")
    assert (local.kind, local.workers, local.timeout_s) == ("local", 2, 3600.0)
    remote = parse_cluster("tcp://10.0.0.5:8786?timeout=90")
    assert (remote.kind, remote.address, remote.timeout_s) == ("address", "tcp://10.0.0.5:8786", 90.0)
    assert parse_cluster("local-cuda").workers is None and parse_cluster("local-cuda:4").workers == 4
    for bad, message in [("local", "is not understood"), ("local:0", "is not understood"), ("ray://x", "tcp://HOST"),
                         ("local:2?timeout=-1", "only option is timeout"), ("local:2?retries=2", "only option")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_cluster(bad)
    for cluster, device, message in [("local:2", "cuda", "would share one GPU"), ("local-cuda", "cpu", "--device cuda"),
                                     ("tcp://h:1", "cuda:1", "name no index")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_cluster(cluster, device)
    assert method_groups(["fastv", "random", "fitprune-paper", "fitprune"]) == [
        ("fitprune", "random"), ("fastv",), ("fitprune-paper",)]


def test_a_sweep_on_the_cluster_stores_what_a_serial_one_does(serial, cluster, tmp_path):
    address, client = cluster
    before = _transitions(client)
    run_sweep(SweepConfig(data_root=str(tmp_path), cluster=address, **SIZES))
    assert snapshot(tmp_path) == serial
    after = _transitions(client)
    assert sorted(after) == sorted(before) and all(after[w] > before[w] for w in after), (before, after)  # both worked
    models = _models(client)
    assert len(models) == 2 and all(len(m) == 1 for m in models.values()), models  # one model per worker process
    trim = client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert set(trim.values()) == {None}, trim  # glibc's dynamic mmap threshold left on (flows.fanout.local_cluster)
    parts = [p.name for p in store.list_parts("recipes", tmp_path)]
    assert len(parts) == 2 and all(re.search(r"-recipes-(fitprune\.random|fastv)\.parquet$", p) for p in parts)


def test_a_worker_killed_mid_shard_is_replaced_and_nothing_is_stored_twice(serial, cluster, hold_dir, tmp_path):
    address, client = cluster
    _arm(hold_dir, "eval ")
    config = SweepConfig(data_root=str(tmp_path), cluster=f"{address}?timeout=300", **SIZES)
    thread, box = _in_thread(lambda: run_sweep(config))
    try:
        pid, label = _wait_for_hold(hold_dir, thread, box)
        assert pid in _pids(client).values()
        os.kill(pid, signal.SIGKILL)  # the shard's rows are written; its result never leaves the worker
    finally:
        _disarm(hold_dir)
    thread.join()
    assert "error" not in box, box.get("error")
    assert snapshot(tmp_path) == serial
    _assert_no_duplicates(tmp_path)
    assert label.startswith("eval toy ")  # an evaluation shard was in flight; its rows are stored once (above)
    while len(_pids(client)) < 2 or pid in _pids(client).values():  # the nanny starts a new worker process
        time.sleep(0.1)
    _warm(client)


def test_two_sweeps_sharing_the_workers_lose_nothing(serial, cluster, tmp_path):
    address, _ = cluster
    cmd = [sys.executable, "-m", "flows.cli", "--data-root", str(tmp_path), "sweep", "--source", "toy", "--budgets",
           "0.5", "--methods", "fitprune,fastv,random", "--calib-samples", "4", "--eval-samples", "4",
           "--batch-size", "4", "--shard-size", "2", "--cluster", f"{address}?timeout=300"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    runs = catalog.query("SELECT run_id, status FROM runs_latest", root=tmp_path).to_pylist()
    assert len(runs) == 2 and {r["status"] for r in runs} == {"completed"}
    _assert_no_duplicates(tmp_path)
    mine = snapshot(tmp_path)
    for table in ("calibration_sets", "stats_layer", "stats_token"):  # shared by both runs, stored once
        assert mine[table] == serial[table], table
    for table in ("recipes", "evaluations", "predictions"):  # each run has all of its rows, as a serial run
        assert sorted(mine[table]) == sorted(serial[table] * 2), table
    per_run = Counter(store.read_table("evaluations", tmp_path).column("run_id").to_pylist())
    assert sorted(per_run.values()) == [N_EVAL_SHARDS, N_EVAL_SHARDS]


def test_a_random_checkpoint_with_processed_inputs_shards_its_statistics_over_the_workers(cluster, tmp_path):
    """scripts/random_checkpoint.py (the 7B geometry's tiny twin): a path checkpoint and an hf: input set
    that a sweep reads as it stands; its statistics, fit and evaluation on the cluster equal a serial run."""
    made = tmp_path / "random"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "random_checkpoint.py"), str(made), "--tiny",
                           "--samples", "6", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--source hf:{made / 'inputs'}" in proc.stdout and "256 visual tokens" in proc.stdout
    spec = {"kind": "path", "path": str(made / "model"), "dtype": "float32"}
    inputs = f"hf:{made / 'inputs'}"
    sizes = dict(model=spec, source=inputs, benchmarks=(inputs,), budgets=(0.5,), methods=("fastv",),
                 calib_samples=6, eval_samples=6, batch_size=2, shard_size=2)
    run_sweep(SweepConfig(data_root=str(tmp_path / "serial"), **sizes))
    address, client = cluster
    before = _transitions(client)
    run_sweep(SweepConfig(data_root=str(tmp_path / "cluster"), cluster=address, **sizes))
    serial, spread = snapshot(tmp_path / "serial"), snapshot(tmp_path / "cluster")
    assert spread == serial
    after = _transitions(client)
    assert all(after[w] > before[w] for w in after), (before, after)  # both workers took shards
    samples = set(store.read_table("stats_token", tmp_path / "cluster").column("sample").to_pylist())
    assert len(samples) == 6 and all(s.startswith("r0-") for s in samples)  # the script's ids
    evals = store.read_table("evaluations", tmp_path / "cluster").to_pylist()
    assert len(evals) == 2 * 3 and {r["benchmark"] for r in evals} == {inputs}


@pytest.mark.slow
def test_the_flow_runs_its_task_runs_on_the_cluster(serial, cluster, harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags

    from flows.sweep_flow import sweep

    address, _ = cluster
    result = sweep(config=SweepConfig(data_root=str(tmp_path), cluster=address, **SIZES))
    assert snapshot(tmp_path) == serial
    assert sorted(r["method"] for r in result["summary"]) == ["fastv", "fitprune", "none", "random"]
    with get_client(sync_client=True) as prefect:  # each shard a task run on a worker, guarded there, not by tag
        runs = prefect.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=["cluster"])))
    evals = [r for r in runs if r.name.startswith("eval ")]
    assert len(evals) == N_EVAL_SHARDS and all(r.state_type.value == "COMPLETED" for r in evals)
    assert all("gpu" not in r.tags for r in runs) and {r.name.split(" ")[0] for r in runs} >= {"eval", "statistics"}


def test_a_worker_that_never_answers_ends_the_run_failed_naming_the_shard(cluster, hold_dir, tmp_path):
    address, client = cluster
    _arm(hold_dir, "eval ")
    config = SweepConfig(data_root=str(tmp_path), cluster=f"{address}?timeout=10", **SIZES)
    thread, box = _in_thread(lambda: run_sweep(config))
    pid = None
    try:
        pid, label = _wait_for_hold(hold_dir, thread, box)
        os.kill(pid, signal.SIGSTOP)  # hung: connected, silent, never finishing
        thread.join()
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        _disarm(hold_dir)
    err = box.get("error")
    assert isinstance(err, ShardTimeout), box
    missing = set(err.missing)  # the held shard, and any the scheduler had queued on that worker
    assert label in missing and all(m.startswith("eval toy ") for m in missing) and len(missing) == len(err.missing)
    assert f"{len(missing)} shard(s) missing" in str(err) and all(m in str(err) for m in missing)
    (run,) = catalog.query("SELECT status, error FROM runs_latest", root=tmp_path).to_pylist()
    assert run["status"] == "failed" and run["error"].startswith("ShardTimeout") and label in run["error"]
    recipes = store.read_table("recipes", tmp_path).to_pylist()
    names = {r["recipe_id"]: f"{r['method']} -{r['budget']:.0%}" for r in recipes}
    names["none"] = "unpruned"  # as flows.sweep names the shards (and the task runs)
    stored = {f"eval {r['benchmark']} {names[r['recipe_id']]} samples {r['shard']}"
              for r in store.read_table("evaluations", tmp_path).to_pylist()}
    assert len(stored | missing) == N_EVAL_SHARDS  # every shard is stored or named missing: none lost unsaid
    assert label in stored  # the held shard wrote its rows before it hung (a result in flight may have too)
