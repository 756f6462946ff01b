"""The pipeline through a real Prefect server: prefect.yaml deploys, a process worker runs
``fitprune/sweep``, and the results are readable through DuckDB.

Starts ``prefect server start`` (SQLite, temporary PREFECT_HOME, free loopback port) and
``prefect worker start``; both are stopped by PID at the end (SIGINT twice, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage import catalog

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGINT the process group twice (a worker needs two), then SIGKILL if it still runs."""
    for _ in range(2):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout / 2)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture
def prefect_env(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = _free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        PREFECT_LOGGING_LEVEL="INFO",
        FITPRUNE_DATA=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",
    )
    env.pop("PREFECT_API_KEY", None)
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        proc = subprocess.Popen([PREFECT, *args], cwd=REPO, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=timeout, start_new_session=True)
        assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, "prefect server exited:\n" + logs[0].read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prefect server not healthy in 90 s:\n" + logs[0].read_text()[-3000:]
            time.sleep(0.5)
        yield {"env": env, "start": start, "run": run, "tmp": tmp_path, "logs": logs}
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.mark.slow
def test_sweep_deployment_runs_on_a_worker(prefect_env):
    run, start, tmp = prefect_env["run"], prefect_env["start"], prefect_env["tmp"]
    data_root = tmp / "data"
    run("work-pool", "create", "fitprune-pool", "--type", "process")
    run("concurrency-limit", "create", "gpu", "1")
    deployed = run("deploy", "--all")
    assert "fitprune/sweep" in deployed.stdout
    assert "fitprune-recalibrate/recalibrate" in deployed.stdout
    automations = run("automation", "ls")  # the recalibrate deployment's event trigger
    assert "recalibrate" in automations.stdout, automations.stdout
    start("worker", "worker", "start", "--pool", "fitprune-pool")
    params = ["-p", 'checkpoint={"kind": "toy", "seed": 0}', "-p", "source=toy", "-p", "calib_samples=4", "-p", "eval_samples=4", "-p", "batch_size=4", "-p", "budgets=[0.5]",
              "-p", 'methods=["fitprune","fastv"]', "-p", f"data_root={data_root}"]
    try:
        watched = run("deployment", "run", "fitprune/sweep", *params, "--watch", "--watch-timeout", "240",
                      timeout=270)
    except AssertionError:
        worker_log = (tmp / "worker.log").read_text()[-6000:]
        raise AssertionError(f"flow run failed; worker log:\n{worker_log}") from None
    assert "Completed" in watched.stdout or "successfully" in watched.stdout

    evals = catalog.query("SELECT method, flops_reduction, metric FROM evaluations ORDER BY method", root=data_root)
    assert sorted(evals.column("method").to_pylist()) == ["fastv", "fitprune", "none"]
    front = catalog.query("SELECT * FROM pareto", root=data_root)
    assert front.num_rows >= 1
    assert catalog.pareto(data_root).num_rows == front.num_rows
    recipes = catalog.query("SELECT DISTINCT checkpoint FROM recipes", root=data_root)
    assert recipes.num_rows == 1

    # a bad parameter fails the run before any model loads, with a message saying what is allowed
    bad = subprocess.run([PREFECT, "deployment", "run", "fitprune/sweep", "-p", "budgets=[1.5]", "-p",
                          f"data_root={data_root}", "--watch", "--watch-timeout", "120"],
                         cwd=REPO, env=prefect_env["env"], capture_output=True, text=True, timeout=150,
                         start_new_session=True)
    assert bad.returncode != 0
    assert "budgets must lie in (0, 1)" in (tmp / "worker.log").read_text()
