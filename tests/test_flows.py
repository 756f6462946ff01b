"""The pipeline's plain functions without a server, and the flows under one session-scoped
``prefect_test_harness`` (a temporary local server): the sweep flow, and re-calibration running
it as a subflow for a new local checkpoint."""

from __future__ import annotations

import json
import re

import pytest

from fitprune.demo import toy
from flows.checks import check_sweep
from flows.config import SweepConfig
from flows.sweep import compose
from tasks import steps
from tasks.report import markdown_report, plot_front

TINY = dict(calib_samples=4, eval_samples=4, budgets=[0.5], methods=["fitprune", "fastv"], batch_size=4, source="toy")


def test_steps_compose_without_prefect(tmp_path):
    config = SweepConfig(budgets=(0.5,), methods=("fitprune", "random"), calib_samples=4, eval_samples=4, batch_size=4,
                         data_root=str(tmp_path), source="toy")
    result = compose(config)
    assert {r["method"] for r in result["summary"]} == {"none", "fitprune", "random"}
    assert all(r["run_id"] == result["run_id"] and r["status"] == "completed" for r in result["summary"])
    assert result["pareto_rows"] and all(r["checkpoint"] == result["checkpoint"] for r in result["pareto_rows"])
    json.dumps(result)  # only plain data crosses step boundaries
    md = markdown_report(result)
    assert "## Pareto front" in md and result["run_id"] in md
    png = plot_front(result, str(tmp_path / "reports"))  # None without matplotlib
    assert png is None or png.endswith(".png")
    if png is not None:  # the plot shows each method, the unpruned point and the front it was given
        from tasks.report import front_figure

        fig = front_figure(result)
        (ax,) = fig.axes
        labels = ax.get_legend_handles_labels()[1]
        assert {"fitprune", "random", "unpruned", "Pareto front"} <= set(labels)
        (step,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
        front = sorted((r["flops_reduction"], r["metric"]) for r in result["pareto_rows"])
        assert list(zip(step.get_xdata(), step.get_ydata())) == front
        assert result["checkpoint"] in fig._suptitle.get_text() and "toy model" in fig._suptitle.get_text()
    calib = steps.calibration_set(4, 0, source="toy", root=tmp_path)
    again = steps.collect_stats_shard({"kind": "toy"}, calib, result["checkpoint"], 0, 4, 4, tmp_path)
    assert again["reused"] is True and again["collected"] == 0


def test_a_failed_run_records_why_and_counts_nowhere(tmp_path):
    """A step that raises mid-evaluation: the run's end row says failed with the error, the error reaches
    the caller, and the summary view and front hold nothing of it."""
    from types import SimpleNamespace

    from storage import catalog, store

    calls = []

    def failing_shard(**kw):
        calls.append(kw["recipe_id"])
        if len(calls) == 2:
            raise RuntimeError("GPU fell off the bus")
        return steps.evaluate_shard(**kw)

    namespace = SimpleNamespace(**{name: getattr(steps, name) for name in steps.__all__})
    namespace.evaluate_shard = failing_shard
    config = SweepConfig(budgets=(0.5,), methods=("fitprune",), calib_samples=4, eval_samples=4, batch_size=4,
                         data_root=str(tmp_path), source="toy")
    with pytest.raises(RuntimeError, match="fell off the bus"):
        compose(config, namespace)
    runs = catalog.query("SELECT status, error, ended_at FROM runs_latest", root=tmp_path).to_pylist()
    assert len(runs) == 1 and runs[0]["status"] == "failed" and runs[0]["ended_at"] is not None
    assert runs[0]["error"] == "RuntimeError: GPU fell off the bus"
    assert store.read_table("evaluations", tmp_path).num_rows == 1  # the unpruned shard ran
    assert store.read_table("recipes", tmp_path).num_rows == 1  # written when fitted, before the failure
    assert catalog.query("SELECT * FROM evaluation_summary", root=tmp_path).num_rows == 0
    assert catalog.pareto(tmp_path).num_rows == 0
    partial = catalog.query("SELECT status, n_samples FROM run_evaluations", root=tmp_path).to_pylist()
    assert partial == [{"status": "failed", "n_samples": 4}]  # partial work, visible with its status


def test_an_interrupted_run_says_so(tmp_path):
    from types import SimpleNamespace

    from storage import catalog

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    namespace = SimpleNamespace(**{name: getattr(steps, name) for name in steps.__all__})
    namespace.fit_budgets = interrupt
    config = SweepConfig(budgets=(0.5,), methods=("fitprune",), calib_samples=4, eval_samples=4, batch_size=4,
                         data_root=str(tmp_path), source="toy")
    with pytest.raises(KeyboardInterrupt):
        compose(config, namespace)
    (run,) = catalog.query("SELECT status, error FROM runs_latest", root=tmp_path).to_pylist()
    assert run == {"status": "interrupted", "error": "KeyboardInterrupt: "}


def test_parameters_are_validated_with_clear_messages(tmp_path):
    """What the flow validates (its ``config`` parameter, then ``check_sweep``) before any model loads."""
    args = dict(model={"kind": "toy"}, calib_samples=4, eval_samples=4, budgets=[0.5], methods=["fitprune"],
                batch_size=4, device="cpu", data_root=str(tmp_path), seed=3, source="toy")
    config = SweepConfig(**args).resolved()
    check_sweep(config)
    assert config.budgets == (0.5,) and config.spec() == {"kind": "toy", "seed": 3, "device": "cpu"}
    assert config.benchmarks == ("toy",)

    def validate(**change):
        check_sweep(SweepConfig(**{**args, **change}))

    for change, message in [
        (dict(budgets=[1.5]), "budgets must lie in (0, 1)"),
        (dict(budgets=[]), "budgets is empty"),
        (dict(methods=["magic"]), "unknown method"),
        (dict(calib_samples=0), "calib_samples must be a positive integer"),
        (dict(calib_samples=3), "needs at least 4 samples"),
        (dict(model={"kind": "hub"}), "'demo', 'toy', 'path'"),
        (dict(model={"kind": "path", "path": str(tmp_path / "nope")}), "not a checkpoint directory"),
        (dict(model={"kind": "toy", "sede": 1}), "sede"),
        (dict(model={"kind": "demo", "dtype": "int8"}), "'bfloat16' or 'float32'"),
        (dict(source="easy-vqa:dev"), "easy-vqa has splits"),
        (dict(benchmarks=["nope"]), "not known"),
        (dict(source="easy-vqa:train"), "which the toy model cannot read"),  # the CLI's checks, before any model
        (dict(device="gpu"), "--device 'gpu' is not known"),
        (dict(data_root=str(tmp_path / "a[1]")), "which DuckDB reads as a file pattern"),
        (dict(convention="fitprune-paper"), "Input should be 'full'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            validate(**change)


def test_tasks_wrap_the_plain_steps():
    from tasks import sweep as sweep_tasks

    for name in steps.__all__:  # every step is there, as a task wrapping the plain function or as itself
        wrapped = getattr(sweep_tasks, name)
        assert getattr(wrapped, "fn", wrapped) is getattr(steps, name), name
    for name in ("model_info", "collect_stats_shard", "fit_budgets", "evaluate_shard"):  # they run the model
        assert "gpu" in getattr(sweep_tasks, name).tags, name
    assert sweep_tasks.fit_budgets.name == "fit-budget-grid"


def test_recalibrate_finds_new_checkpoints(tmp_path):
    from flows.recalibrate import checkpoints_without_recipes, find_checkpoints

    watch = tmp_path / "watch"
    (watch / "not-a-checkpoint").mkdir(parents=True)
    toy.toy_model(0).save_pretrained(watch / "ckpt-a")
    toy.toy_model(0).save_pretrained(watch / ".ckpt-b.staging")  # an export still being written
    paths = find_checkpoints(str(watch))
    assert paths == [str(watch / "ckpt-a")]
    todo = checkpoints_without_recipes(paths, str(tmp_path / "data"))
    assert [t["path"] for t in todo] == paths and todo[0]["checkpoint"].startswith("fp-")
    with pytest.raises(ValueError, match="not a directory"):
        find_checkpoints(str(tmp_path / "missing"))


@pytest.mark.slow
def test_flows_in_a_test_harness(harness, tmp_path):
    from flows.recalibrate import recalibrate
    from flows.sweep_flow import sweep
    from storage import catalog

    data = str(tmp_path / "data")
    result = sweep(config=SweepConfig(**TINY, model={"kind": "toy", "seed": 0}, data_root=data))
    assert result["pareto_rows"]
    assert sorted(r["method"] for r in result["summary"]) == ["fastv", "fitprune", "none"]  # what --watch users see

    watch = tmp_path / "watch"
    toy.toy_model(1).save_pretrained(watch / "ckpt-b")  # a "new checkpoint" on disk
    (watch / "ckpt-a-broken").mkdir()  # sorted first: its failure must not stop the scan
    (watch / "ckpt-a-broken" / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"1 of 2 checkpoint\(s\) failed, 1 swept: .*ckpt-a-broken"):
        recalibrate(config=SweepConfig(data_root=data, **TINY), watch_dir=str(watch))
    swept = catalog.query("SELECT DISTINCT checkpoint FROM recipes", root=data).column("checkpoint").to_pylist()
    assert len(swept) == 2 and result["checkpoint"] in swept  # ckpt-b was swept after the broken one failed
    (watch / "ckpt-a-broken" / "config.json").unlink()  # no longer a checkpoint
    assert recalibrate(config=SweepConfig(data_root=data, **TINY), watch_dir=str(watch)) == []  # nothing new: nothing run
    fresh = tmp_path / "fresh"
    assert recalibrate(config=SweepConfig(data_root=str(fresh), **TINY)) == [] and (fresh / "checkpoints").is_dir()  # default created
