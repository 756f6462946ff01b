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


TOY_CONFIG = {"source": "toy", "calib_samples": 4, "eval_samples": 4, "batch_size": 4, "budgets": [0.5],
              "methods": ["fitprune", "fastv"]}


def _project_file(tmp: Path, data_root: Path, watch: Path) -> Path:
    """The repository's prefect.yaml with the re-calibration template pointed at the toy sizes, the test's
    data root and watch dir: the same deployments, schedule and trigger, other parameter values."""
    import yaml

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    recal = next(d for d in doc["deployments"] if d["name"] == "recalibrate")
    recal["parameters"] = {"config": {**TOY_CONFIG, "data_root": str(data_root)}, "watch_dir": str(watch)}
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _flow_runs(env: dict, flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _poll(what: str, done, alive, logs, limit_s: float = 900):
    """Wait for ``done()`` while ``alive()`` (the worker runs); the limit only stops a hung CI job."""
    start = time.monotonic()
    while not done():
        assert alive(), f"the worker exited while waiting for {what}:\n" + logs()
        assert time.monotonic() - start < limit_s, f"no {what} after {limit_s:.0f} s:\n" + logs()
        time.sleep(1)


@pytest.mark.slow
def test_sweep_deployment_runs_on_a_worker(prefect_env):
    import json

    from prefect.utilities.callables import parameter_schema

    from flows.sweep_flow import sweep

    run, start, tmp = prefect_env["run"], prefect_env["start"], prefect_env["tmp"]
    data_root, watch = tmp / "data", tmp / "watch"
    run("work-pool", "create", "fitprune-pool", "--type", "process")
    run("concurrency-limit", "create", "gpu", "1")
    deployed = run("deploy", "--all", "--prefect-file", str(_project_file(tmp, data_root, watch)))
    assert "fitprune/sweep" in deployed.stdout
    assert "fitprune-recalibrate/recalibrate" in deployed.stdout
    automations = run("automation", "ls")  # the recalibrate deployment's event trigger
    assert "recalibrate" in automations.stdout, automations.stdout
    # the deployment's parameter schema is the flow's, so the UI form and `-p config=...` validate as the CLI does
    stored = json.loads(run("deployment", "inspect", "fitprune/sweep", "-o", "json").stdout)
    expected = parameter_schema(sweep).model_dump(mode="json")
    if expected.get("required") == []:  # the server drops an empty list
        del expected["required"]
    assert stored["parameter_openapi_schema"] == expected
    worker = start("worker", "worker", "start", "--pool", "fitprune-pool")
    config = {**TOY_CONFIG, "model": {"kind": "toy", "seed": 0}, "data_root": str(data_root)}
    try:
        watched = run("deployment", "run", "fitprune/sweep", "-p", f"config={json.dumps(config)}", "--watch",
                      "--watch-timeout", "240", timeout=270)
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
    log = (tmp / "worker.log").read_text()
    assert "Pareto front:" in log  # the summary is the run's last log lines

    # a bad parameter fails the run before any model loads, with a message saying what is allowed
    bad = subprocess.run([PREFECT, "deployment", "run", "fitprune/sweep", "-p",
                          f"config={json.dumps({**config, 'budgets': [1.5]})}", "--watch", "--watch-timeout", "120"],
                         cwd=REPO, env=prefect_env["env"], capture_output=True, text=True, timeout=150,
                         start_new_session=True)
    assert bad.returncode != 0
    assert "budgets must lie in (0, 1)" in (tmp / "worker.log").read_text()

    # an event naming a new checkpoint sweeps it, with prefect.yaml's re-calibration parameters; a second
    # event for the same checkpoint, right after, does not sweep it again (the fingerprint's guard)
    env = prefect_env["env"]
    ckpt = watch / "new-llava"
    exported = subprocess.run([sys.executable, "-m", "flows.cli", "export-checkpoint", str(ckpt), "--model", "toy",
                               "--emit-event"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    fp = exported.stdout.split("checkpoint ")[1].split()[0]
    run("events", "emit", "fitprune.checkpoint.created", "--resource-id", "fitprune.checkpoint.new-llava")
    logs = lambda: (tmp / "worker.log").read_text()[-6000:]  # noqa: E731
    recal_runs = lambda: [r for r in _flow_runs(env, "fitprune-recalibrate") if not r.auto_scheduled]  # noqa: E731
    _poll("two re-calibration runs", lambda: len(recal_runs()) >= 2, lambda: worker.poll() is None, logs)
    _poll("both re-calibration runs to finish", lambda: all(r.state.is_final() for r in recal_runs()),
          lambda: worker.poll() is None, logs)
    states = sorted(r.state.type.value for r in recal_runs())
    assert states == ["COMPLETED", "COMPLETED"], (states, logs())
    named = sorted((r.parameters["checkpoint"], r.parameters["resource_id"]) for r in recal_runs())
    assert named == [("", "fitprune.checkpoint.new-llava"), (str(ckpt), "fitprune.checkpoint.new-llava")]
    sweeps = catalog.query("SELECT DISTINCT r.run_id FROM recipes r JOIN runs_latest USING (run_id) "
                           "WHERE r.checkpoint = $fp AND runs_latest.status = 'completed'", {"fp": fp},
                           root=data_root).num_rows
    assert sweeps == 1  # recipes for the named checkpoint, from one sweep
    assert "was swept by another run meanwhile" in (tmp / "worker.log").read_text()
