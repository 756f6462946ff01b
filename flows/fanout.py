"""One sweep spread over Dask workers: its statistics shards, recipe fits and evaluation shards.

``cluster`` (``flows.config.SweepConfig.cluster``: ``fitprune sweep --cluster``, the flow's ``config``):

==============================  ==================================================================
``None``                        serial, in this process (the default)
``local:N``                     a ``distributed.LocalCluster`` of N worker processes on this host
``local-cuda`` / ``local-cuda:N``  ``dask_cuda.LocalCUDACluster``: one worker per GPU (the first N)
``tcp://HOST:PORT``             a running Dask scheduler and its workers (any number of hosts)
==============================  ==================================================================

optionally followed by ``?timeout=SECONDS``: how long the sweep waits without any shard finishing
before it fails, naming the missing shards (default 3600). ``compose_on`` runs ``compose``
unchanged with a steps namespace (``Fanout``) whose model steps (``REMOTE``) run on the workers
through prefect-dask's client: the plain functions of ``tasks.steps`` (the CLI), or the Prefect
tasks of ``tasks.sweep`` (the flow: each shard is then a task run on a worker). The other steps
(run rows, sample sets, summary) stay in this process.

* Every worker is a process with one thread and the resource ``gpu=1``; every remote step asks
  for ``gpu=1``. So a worker runs one shard at a time and holds one model (``tasks.models``
  caches it per process): the per-device guard, in place of Prefect's ``gpu`` tag limit, which
  counts task runs across the whole server (``gpu`` = 1 would run one shard at a time on the
  whole cluster). Tasks sent to the cluster carry the tag ``cluster`` instead of ``gpu``.
* A worker that dies: Dask runs its shard again on another worker (up to 3 deaths per shard).
  Every write has a write id fixed by the shard (``storage.store``), so a shard run twice writes
  once. A worker that hangs or never comes back: after ``timeout`` seconds without progress the
  sweep raises ``ShardTimeout`` naming the missing shards, and the run ends ``failed``.
* With two workers or more, recipes are fitted per method group (``method_groups``), not per
  budget: one call's budgets share the α-walk's envelope (``fitprune.fit``, ``monotone``) and the
  search's divergence cache, so splitting budgets could change the stored recipes.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

__all__ = ["DEFAULT_TIMEOUT_S", "HOLD_ENV", "REMOTE", "RESOURCE", "ClusterSpec", "Fanout", "ShardTimeout",
           "check_cluster", "compose_on", "connect", "local_cluster", "method_groups", "parse_cluster"]

DEFAULT_TIMEOUT_S = 3600.0
RESOURCE = "gpu"  # one per worker; one per remote step
REMOTE = ("model_info", "collect_stats_shard", "fit_budgets", "evaluate_shard")
HOLD_ENV = "FITPRUNE_TEST_HOLD_DIR"  # tests only: hold one shard on its worker (``_hold_for_test``)
_FORMS = ("local:N (N worker processes on this host), local-cuda[:N] (one worker per GPU of this host; needs "
          "dask-cuda) or tcp://HOST:PORT (a running Dask scheduler), optionally followed by ?timeout=SECONDS")


class ShardTimeout(TimeoutError):
    """No shard of the sweep finished for ``timeout`` seconds; ``missing`` names those not finished."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``cluster`` value: ``kind`` is ``local``, ``local-cuda`` or ``address``."""

    text: str
    kind: str
    workers: int | None = None
    address: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


def parse_cluster(text: str | None) -> ClusterSpec | None:
    """``None`` (serial) or the ``ClusterSpec`` of ``text``; ValueError naming the accepted forms."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        raise ValueError(f"cluster must be a string such as 'local:2', got {text!r}; use {_FORMS}")
    head, _, query = text.strip().partition("?")
    timeout = DEFAULT_TIMEOUT_S
    if query:
        options = parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(options) - {"timeout"})
        try:
            timeout = float(options.get("timeout", [DEFAULT_TIMEOUT_S])[-1])
        except ValueError:
            timeout = -1.0
        if unknown or not timeout > 0:
            raise ValueError(f"cluster {text!r}: the only option is timeout=SECONDS (a positive number: how long "
                             f"to wait without any shard finishing), got {query!r}")
    if re.fullmatch(r"tcp://[^\s/?]+:[0-9]+", head):
        return ClusterSpec(text, "address", address=head, timeout_s=timeout)
    m = re.fullmatch(r"(local|local-cuda)(?::([0-9]+))?", head)
    if m is None or (m.group(1) == "local" and m.group(2) is None) or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"cluster {text!r} is not understood; use {_FORMS}")
    return ClusterSpec(text, m.group(1), workers=None if m.group(2) is None else int(m.group(2)), timeout_s=timeout)


def check_cluster(cluster: str | None, device: str) -> ClusterSpec | None:
    """The parsed cluster, refused where the model's ``device`` breaks one-device-per-worker."""
    spec = parse_cluster(cluster)
    if spec is None:
        return None
    if re.fullmatch(r"cuda:[0-9]+", device):
        raise ValueError(f"--device {device} with --cluster {spec.text}: on a cluster each worker runs on its own "
                         "GPU, so name no index; use --device cuda (each worker sees its GPU as cuda)")
    if spec.kind == "local" and device != "cpu":
        raise ValueError(f"--cluster {spec.text} starts CPU worker processes, which would share one GPU; use "
                         f"--cluster local-cuda for one worker per GPU, or --device cpu")
    if spec.kind == "local-cuda" and device != "cuda":
        raise ValueError(f"--cluster {spec.text} starts one worker per GPU; run it with --device cuda "
                         f"(got --device {device}), or use --cluster local:N for CPU workers")
    return spec


def _cluster_modules():
    try:
        import distributed
        from prefect_dask.client import PrefectDaskClient
    except ImportError as err:
        raise RuntimeError(f"--cluster needs dask's distributed and prefect-dask ({err}); install them with "
                           "pip install -e '.[cluster]' (README, 'One sweep on many GPUs')") from None
    return distributed, PrefectDaskClient


def _workers_with_resource(client) -> dict[str, dict]:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {a: w for a, w in workers.items() if (w.get("resources") or {}).get(RESOURCE, 0) >= 1}


def local_cluster(n_workers: int | None = None, cuda: bool = False):
    """A ``LocalCluster`` (``LocalCUDACluster`` with ``cuda``: one worker per GPU) of 1-thread worker
    processes offering ``gpu=1``, started without Dask's ``MALLOC_TRIM_THRESHOLD_``: any fixed value
    turns off glibc's dynamic mmap threshold, so torch's CPU tensors are mapped and unmapped at
    every allocation (measured: the same shards took 2.2x as long on a worker; README)."""
    distributed, _ = _cluster_modules()
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"), MALLOC_TRIM_THRESHOLD_=None)
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":  # left in this process by an earlier Dask nanny
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    options = dict(n_workers=n_workers, threads_per_worker=1, resources={RESOURCE: 1}, dashboard_address=None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        if not cuda:
            return distributed.LocalCluster(processes=True, **options)
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise RuntimeError("--cluster local-cuda needs dask-cuda: pip install -e '.[cluster-cuda]' on the GPU "
                               "host, or start the workers yourself and pass tcp://HOST:PORT") from None
        return LocalCUDACluster(**options)


@contextmanager
def connect(spec: ClusterSpec):
    """A prefect-dask client of the cluster ``spec`` names (started here, or at its address), once at
    least one worker offers the resource ``gpu``; the cluster started here is closed on exit."""
    _, PrefectDaskClient = _cluster_modules()
    with ExitStack() as stack:
        if spec.kind in ("local", "local-cuda"):
            target = stack.enter_context(local_cluster(spec.workers, cuda=spec.kind == "local-cuda"))
        else:
            target = spec.address
        try:
            client = stack.enter_context(PrefectDaskClient(target, set_as_default=False))
        except OSError as err:
            raise RuntimeError(f"cannot reach the Dask scheduler at {spec.address} ({err}); start one there "
                               "(dask scheduler) and its workers (README, 'One sweep on many GPUs'), or check "
                               "the address") from None
        deadline = time.monotonic() + spec.timeout_s
        while not _workers_with_resource(client):
            if time.monotonic() > deadline:
                n = len(client.scheduler_info(n_workers=-1)["workers"])
                raise RuntimeError(f"cluster {spec.text}: none of its {n} worker(s) offers the resource {RESOURCE} "
                                   f"after {spec.timeout_s:g} s; start workers with --nthreads 1 --resources "
                                   f"{RESOURCE}=1 (README, 'One sweep on many GPUs')")
            time.sleep(0.2)
        yield client


def method_groups(methods) -> list[tuple[str, ...]]:
    """The fit's independent calls: ``random`` prunes ``fitprune``'s schedule, so they share one (the
    longest, first); every other method is its own."""
    methods = list(methods)
    searched = tuple(m for m in ("fitprune", "random") if m in methods)
    return ([searched] if searched else []) + [(m,) for m in methods if m not in searched]


def _label(name: str, kw: dict) -> str:
    """What a remote call is called in errors: its task run's name (``tasks.sweep``)."""
    if name == "collect_stats_shard":
        return f"statistics {kw['calib']['id']} samples {kw['start']}-{kw['end']}"
    if name == "evaluate_shard":
        return f"eval {kw['benchmark']} {kw.get('label') or kw['recipe_id']} samples {kw['start']}-{kw['end']}"
    if name == "fit_budgets":
        return f"fit {','.join(kw['methods'])} at {','.join(f'-{float(b):.0%}' for b in kw['budgets'])}"
    return "inspect-checkpoint" if name == "model_info" else name.replace("_", "-")


def _hold_for_test(label: str) -> None:
    """Tests only (``HOLD_ENV`` names a directory holding a file ``prefix``): the first shard whose
    label starts with that prefix writes ``held`` (its worker's pid and label) once its step has
    run and waits, before returning, until ``release`` appears there. Its rows are written, its
    result not yet sent: what a worker killed mid-shard leaves behind."""
    directory = os.environ.get(HOLD_ENV)
    if not directory or not (Path(directory) / "prefix").is_file():
        return
    if not label.startswith((Path(directory) / "prefix").read_text().strip()):
        return
    try:
        fd = os.open(Path(directory) / "held", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # held once already: a retry runs through
        return
    os.write(fd, f"{os.getpid()} {label}".encode())
    os.close(fd)
    while not (Path(directory) / "release").exists():
        time.sleep(0.05)


def _call(fn, label: str, kwargs: dict):
    """A plain step on a worker (the test hold after it)."""
    result = fn(**kwargs)
    _hold_for_test(label)
    return result


class _Handle:
    """A submitted remote call; ``result()`` waits for it under the sweep's timeout."""

    def __init__(self, fanout: Fanout, future):
        self.fanout, self.future = fanout, future

    def result(self):
        return self.fanout.wait(self.future)


class _Remote:
    """A step run on the cluster: ``submit(**kw)`` returns a handle (``compose._run_all`` submits
    all shards at once), a call waits for its result."""

    def __init__(self, fanout: Fanout, name: str, step):
        self.fanout, self.name, self.step = fanout, name, step
        self.signature = inspect.signature(getattr(step, "fn", step))

    def submit(self, *args, **kwargs) -> _Handle:
        kw = self.signature.bind(*args, **kwargs).arguments
        return _Handle(self.fanout, self.fanout.submit(self.step, _label(self.name, kw), kw))

    def __call__(self, *args, **kwargs):
        return self.submit(*args, **kwargs).result()


class Fanout:
    """``steps`` (``tasks.steps`` or ``tasks.sweep``) with the model steps (``REMOTE``) run on ``client``'s
    workers; ``fit_budgets`` runs one call per method group and merges their grids."""

    def __init__(self, client, steps, spec: ClusterSpec):
        from prefect import Task

        self.client, self.base, self.spec = client, steps, spec
        self.pending: dict[str, tuple[str, object]] = {}  # key -> (label, future): submitted, not finished
        self.lock = threading.Lock()
        self.last_progress = time.monotonic()
        for name in REMOTE:
            step = getattr(steps, name)
            if isinstance(step, Task):  # per-device guard: the gpu resource, not the server-wide tag
                step = step.with_options(tags=(set(step.tags) - {"gpu"}) | {"cluster"})
            setattr(self, f"_{name}", _Remote(self, name, step))
        self.model_info, self.collect_stats_shard = self._model_info, self._collect_stats_shard
        self.evaluate_shard = self._evaluate_shard

    def __getattr__(self, name):  # the local steps (run rows, sample sets, summary) as they are
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def submit(self, step, label: str, kw: dict):
        from prefect import Task

        key = re.sub(r"[^A-Za-z0-9._-]+", "-", label) + "-" + uuid.uuid4().hex[:8]
        common = dict(key=key, resources={RESOURCE: 1}, pure=False)
        if isinstance(step, Task):
            future = self.client.submit(step, **kw, **common)
        else:
            future = self.client.submit(_call, getattr(step, "fn", step), label, kw, **common)
        with self.lock:
            if not self.pending:
                self.last_progress = time.monotonic()
            self.pending[key] = (label, future)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future) -> None:
        with self.lock:
            self.pending.pop(future.key, None)
            self.last_progress = time.monotonic()

    def wait(self, future):
        """``future``'s result; ``ShardTimeout`` once no shard has finished for the cluster's timeout."""
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        while not done.is_set():
            with self.lock:
                stalled = time.monotonic() - self.last_progress
            if stalled > self.spec.timeout_s:
                raise self._timeout()
            done.wait(min(1.0, max(0.05, self.spec.timeout_s - stalled)))
        return future.result()

    def _timeout(self) -> ShardTimeout:
        with self.lock:
            missing = sorted(label for label, _ in self.pending.values())
        workers = len(self.client.scheduler_info(n_workers=-1)["workers"])
        shown = "; ".join(missing[:12]) + (f"; and {len(missing) - 12} more" if len(missing) > 12 else "")
        return ShardTimeout(f"no shard finished for {self.spec.timeout_s:g} s on cluster {self.spec.text} "
                            f"({workers} worker(s) connected); {len(missing)} shard(s) missing: {shown}. A worker "
                            "running them is lost or hung: restart or replace it and run the sweep again "
                            "(stored statistics are reused), or allow longer shards with ?timeout=SECONDS",
                            missing)

    def cancel_pending(self) -> None:
        """Cancel what this sweep submitted and has not finished (other sweeps' work is untouched)."""
        with self.lock:
            futures = [f for _, f in self.pending.values()]
        if futures:
            self.client.cancel(futures)

    def fit_budgets(self, info, stats_ref, budgets, methods, convention, root, **kw) -> dict:
        """One call per method group with two workers or more; with one, the serial run's one call
        (every group repeats the statistics read, the calibration references and the α-walk)."""
        if len(_workers_with_resource(self.client)) < 2:
            return self._fit_budgets(info, stats_ref, budgets, list(methods), convention, root, **kw)
        handles = [self._fit_budgets.submit(info, stats_ref, budgets, list(group), convention, root,
                                            part=".".join(group), **kw) for group in method_groups(methods)]
        grid: dict = {}
        for handle in handles:
            grid.update(handle.result())
        return {m: grid[m] for m in methods}


def compose_on(config, steps, progress: bool = False, flow: str = "sweep") -> dict:
    """``flows.sweep.compose`` serially (``config.cluster`` None) or with the model steps on the cluster."""
    from flows.sweep import compose

    cluster = check_cluster(config.cluster, config.device)
    if cluster is None:
        return compose(config, steps, progress=progress, flow=flow)
    with connect(cluster) as client:
        fanout = Fanout(client, steps, cluster)
        try:
            return compose(config, fanout, progress=progress, flow=flow)
        finally:
            fanout.cancel_pending()
