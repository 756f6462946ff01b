"""Every refusal of the command line is one line ``fitprune CMD: ...`` on stderr and exit code 1.

Each case: the message names the file or value at fault, there is no traceback, and (where the
CLI can check first) nothing was loaded or written. No sweep runs to completion here: the sweep
cases fail in their pre-checks, before any model is built.
"""

from __future__ import annotations

from datetime import datetime, timezone

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from storage import catalog, store

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--calib-samples", "4", "--eval-samples", "2", "--budgets", "0.5", "--methods", "fitprune"]
TOY = ["--model", "toy", "--source", "toy", *SMALL]
# as root a 0o555 directory is writable anyway: drop the capabilities that allow it, for one child process
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def _bench_doc() -> dict:
    return {"meta": {}, "rows": [{"gpu": "H100", "date": "2026-11-24T14:23:26+00:00", "method": "unpruned",
                                  "metric": "lm_prefill_ms", "value": 160.0, "ratio_vs_unpruned": 1.0,
                                  "flops_ratio": 1.0}]}


def _eval_row(**kw) -> dict:
    row = dict(run_id="run1", recipe_id="r1", checkpoint="ckA", method="fitprune", benchmark="toy", n_samples=4,
               n_failed=0, metric_name="agreement", metric=0.5, flops_reduction=0.5, prefill_flops=1e9, wall_s=1.0,
               shard="0-4", versions={"fitprune": "0.1.0"})
    return {**row, **kw}


def _failure(capsys, argv: list[str], command: str) -> str:
    """Run ``main(argv)``; assert exit 1, one stderr line ``fitprune <command>: ...``, no traceback; return it."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fitprune {command}: "), lines[0]
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Building any model (toy, demo or a checkpoint) fails the test: the pre-checks come first."""
    import tasks.models

    def refuse(spec):
        raise AssertionError(f"a model was built for {spec}: the sweep's checks should have refused first")

    monkeypatch.setattr(tasks.models, "_build", refuse)


@pytest.fixture
def populated(tmp_path) -> Path:
    """A data root with two evaluation parts (two writes) and one recipe, and a built catalog."""
    root = tmp_path / "data"
    store.write_rows("evaluations", [_eval_row()], root=root, write_id="first")
    store.write_rows("evaluations", [_eval_row(recipe_id="r2", flops_reduction=0.3, metric=0.8)], root=root,
                     write_id="second")
    store.write_rows("recipes", [dict(recipe_id="r1", checkpoint="ckA", family="llava", method="fitprune",
                                      scoring="fitprune", budget=0.5, flops_convention="full", alpha=0.03,
                                      predicted_reduction=0.5, drop_fractions=[0.0, 0.5], recipe_json="{}",
                                      run_id="run1")], root=root, write_id="recipe")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)  # a completed run: only those count in the summary views
    store.write_rows("runs", [dict(run_id="run1", flow="sweep", parameters={}, status="completed", started_at=t0,
                                   ended_at=t0, versions="{}")], root=root, write_id="run1-end")
    catalog.build_catalog(root)
    return root


# --- 1. a truncated or empty checkpoint weight file ----------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from fitprune.demo.toy import toy_model

    path = tmp_path_factory.mktemp("ckpt") / "toy-ckpt"
    toy_model(0).save_pretrained(path)
    return path


@pytest.mark.parametrize("size", [0, 100_000], ids=["empty", "truncated"])
def test_truncated_checkpoint_names_the_weight_file(capsys, tmp_path, checkpoint, size, no_model):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    assert weights.stat().st_size > size
    os.truncate(weights, size)
    root = tmp_path / "data"
    line = _failure(capsys, ["sweep", "--data-root", str(root), "--model", str(ckpt), "--source", "toy", *SMALL],
                    "sweep")
    assert str(weights) in line and "truncated or corrupt" in line and "re-save" in line and "re-download" in line
    assert not root.exists()  # refused before the data root was even created
    # the loader itself says the same (library users, and a file damaged after the check)
    import torch

    from tasks.models import _load_local

    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        _load_local(str(ckpt), torch.float32)
    assert str(weights) in str(info.value)


def test_intact_checkpoint_passes_the_weight_check(checkpoint):
    from tasks.models import check_weight_files

    check_weight_files(str(checkpoint))  # the check must not refuse what save_pretrained wrote


# --- 2. the data root is a regular file ------------------------------------------------------------


@pytest.mark.parametrize("command", ["sweep", "pareto", "sql", "import-benchmarks"])
def test_data_root_that_is_a_file(capsys, tmp_path, command, no_model):
    root = tmp_path / "not-a-dir"
    root.write_text("a file")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench_doc()))
    extra = {"sweep": TOY, "pareto": [], "sql": ["SELECT 1"], "import-benchmarks": [str(bench)]}[command]
    line = _failure(capsys, ["--data-root", str(root), command, *extra], command)
    assert f"data root {root} is a file, not a directory" in line
    assert root.read_text() == "a file"


# --- 3. a read-only data root --------------------------------------------------------------------------


def _writable_anyway(directory: Path, argv_prefix: list[str]) -> bool:
    probe = subprocess.run([*argv_prefix, sys.executable, "-c", "import sys; open(sys.argv[1], 'w')",
                            str(directory / "probe")], capture_output=True)
    (directory / "probe").unlink(missing_ok=True)
    return probe.returncode == 0


def _run_unprivileged(argv: list[str]) -> tuple[int, str, str]:
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def run_read_only(tmp_path, capsys):
    """``run(argv) -> (rc, out, err)`` under which a 0o555 directory is really read-only: in process
    for a normal user; as root, in a child process without the capabilities that bypass modes."""
    probe = tmp_path / "probe-dir"
    probe.mkdir(mode=0o555)
    if not _writable_anyway(probe, []):
        def run(argv):
            capsys.readouterr()
            rc = main(argv)
            return (rc, *capsys.readouterr())
    elif shutil.which("setpriv") and not _writable_anyway(probe, UNPRIVILEGED):
        run = _run_unprivileged
    else:
        pytest.skip("running as root, which writes into a 0o555 directory anyway, and setpriv cannot drop that")
    yield run
    probe.chmod(0o755)


@pytest.mark.parametrize("command", ["sweep", "import-benchmarks", "pareto"])
def test_read_only_data_root(tmp_path, run_read_only, command):
    root = tmp_path / "read-only"
    root.mkdir()
    root.chmod(0o555)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench_doc()))
    extra = {"sweep": TOY, "import-benchmarks": [str(bench)], "pareto": []}[command]
    try:
        rc, out, err = run_read_only([command, "--data-root", str(root), *extra])
    finally:
        root.chmod(0o755)
    assert rc == 1, (out, err)
    assert "Traceback" not in out + err
    assert len(err.splitlines()) == 1 and err.startswith(f"fitprune {command}: "), err
    assert f"{root} is not writable" in err  # pareto: the catalog's first write, into <root>/tables
    assert list(root.iterdir()) == []


def test_read_only_data_root_with_a_current_catalog_still_reads(populated, run_read_only):
    for path in [populated, *populated.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        rc, out, err = run_read_only(["pareto", "--data-root", str(populated)])
    finally:
        for path in [populated, *populated.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    assert rc == 0, err
    assert "(2 rows)" in out


def test_a_failed_cleanup_does_not_hide_the_write_error(tmp_path, monkeypatch):
    """A read-only file system fails the temp file's removal too (EROFS); the error that surfaces is the
    write's, naming the directory."""
    root = tmp_path / "data"
    store.write_rows("evaluations", [_eval_row()], root=root, write_id="first")  # directories exist

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store.pq, "write_table", read_only)
    monkeypatch.setattr(store.Path, "unlink", read_only)
    with pytest.raises(ValueError, match="is not writable") as info:
        store.write_rows("evaluations", [_eval_row()], root=root, write_id="second")
    assert str(root / "tables" / "evaluations") in str(info.value)


# --- 4. a corrupt Parquet part under pareto and sql -----------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
@pytest.mark.parametrize("command", ["pareto", "sql"])
def test_corrupt_part_is_named(capsys, populated, command, damage):
    extra = ["SELECT count(*) AS n FROM evaluations"] if command == "sql" else []
    argv = [command, "--data-root", str(populated), *extra]
    assert main(argv) == 0  # readable before the damage
    part = store.list_parts("evaluations", populated)[0]
    data = part.read_bytes()
    part.write_bytes({"garbage": b"not parquet " * 20, "empty": b"", "truncated": data[: len(data) // 2]}[damage])
    line = _failure(capsys, argv, command)
    assert str(part) in line and "corrupt" in line and "move it out of the data root" in line
    assert "one file per write" in line


# --- 5. a corrupt part while the catalog is rebuilt: other tables still answer ----------------------------


@pytest.mark.parametrize("stale", ["deleted", "garbage"])
def test_corrupt_part_with_a_stale_catalog_breaks_only_its_table(capsys, populated, stale):
    part = store.list_parts("evaluations", populated)[0]
    part.write_bytes(b"not parquet " * 20)
    path = populated / "catalog.duckdb"
    path.unlink()
    if stale == "garbage":
        path.write_bytes(b"not a duckdb file")
    capsys.readouterr()
    assert main(["sql", "--data-root", str(populated), "SELECT count(*) AS n FROM recipes"]) == 0
    assert "(1 row)" in capsys.readouterr().out  # the rebuild read no evaluations file
    line = _failure(capsys, ["pareto", "--data-root", str(populated)], "pareto")
    assert str(part) in line
    with pytest.raises(store.CorruptPartError) as info:
        store.read_table("evaluations", populated)
    assert info.value.path == part
    part.rename(populated.parent / part.name)  # what the message says to do
    capsys.readouterr()
    assert main(["pareto", "--data-root", str(populated)]) == 0
    assert "(1 row)" in capsys.readouterr().out  # the other part's recipe


def test_a_broken_view_still_fails_the_build(tmp_path, monkeypatch):
    """The build binds no data file, yet still checks every view (over the zero-row files)."""
    sql_dir = tmp_path / "sql"
    shutil.copytree(catalog.SQL_DIR, sql_dir)
    (sql_dir / "broken.sql").write_text("SELECT no_such_column FROM evaluations")
    monkeypatch.setattr(catalog, "SQL_DIR", sql_dir)
    with pytest.raises(ValueError, match="'broken'.*does not build"):
        catalog.build_catalog(tmp_path / "data")


# --- 6. import-benchmarks: a directory, a file that is not a result, the README's glob ---------------------


def test_import_benchmarks_of_a_directory(capsys, tmp_path):
    line = _failure(capsys, ["import-benchmarks", "--data-root", str(tmp_path / "data"), str(REPO / "benchmarks")],
                    "import-benchmarks")
    assert f"{REPO / 'benchmarks'} is a directory" in line and "*.json" in line


@pytest.mark.parametrize("content", ['{"divergence": [1, 2]}', "[1, 2, 3]", "not json at all", '{"rows": []}'],
                         ids=["object", "list", "not-json", "no-rows"])
def test_import_benchmarks_of_a_file_that_is_not_a_result(capsys, tmp_path, content):
    path = tmp_path / "other.json"
    path.write_text(content)
    root = tmp_path / "data"
    line = _failure(capsys, ["import-benchmarks", "--data-root", str(root), str(path)], "import-benchmarks")
    assert str(path) in line and "nothing imported" in line
    assert store.read_table("benchmarks", root).num_rows == 0


def test_import_benchmarks_with_a_malformed_result_writes_nothing(capsys, tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_bench_doc()))
    doc = _bench_doc()
    del doc["rows"][0]["date"]
    bad.write_text(json.dumps(doc))
    root = tmp_path / "data"
    line = _failure(capsys, ["import-benchmarks", "--data-root", str(root), str(good), str(bad)],
                    "import-benchmarks")
    assert str(bad) in line and "lacks ['date']" in line
    assert store.read_table("benchmarks", root).num_rows == 0  # every file is read before any is written


def test_import_benchmarks_of_the_readme_glob_skips_other_json(capsys, tmp_path):
    files = sorted(str(p) for p in (REPO / "benchmarks").glob("*.json"))  # `benchmarks/*.json`, as the README says
    results = [f for f in files if isinstance(json.loads(Path(f).read_text()), dict)
               and isinstance(json.loads(Path(f).read_text()).get("rows"), list)]
    others = sorted(set(files) - set(results))
    assert results and others  # the folder holds both kinds, which is what this test is about
    root = tmp_path / "data"
    capsys.readouterr()
    assert main(["import-benchmarks", "--data-root", str(root), *files]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    warnings = err.splitlines()
    assert len(warnings) == len(others)
    for path, line in zip(others, warnings):
        assert line.startswith(f"fitprune import-benchmarks: warning: {path} is not a bench_gpu result")
        assert line.endswith("; skipped")
    assert [line.split(":")[0] for line in out.splitlines()] == results
    imported = store.read_table("benchmarks", root)
    assert imported.num_rows > 0 and len(set(imported.column("run_id").to_pylist())) == len(results)


# --- 7. glob characters in the data root: refused before anything runs ----------------------------------


@pytest.mark.parametrize("name", ["data*", "data?", "data[1]", "data{a,b}"])
@pytest.mark.parametrize("command", ["sweep", "import-benchmarks", "pareto"])
def test_glob_characters_in_the_data_root(capsys, tmp_path, name, command, no_model):
    root = tmp_path / name
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench_doc()))
    extra = {"sweep": TOY, "import-benchmarks": [str(bench)], "pareto": []}[command]
    line = _failure(capsys, [command, "--data-root", str(root), *extra], command)
    assert f"data root {root} contains" in line and "file pattern" in line
    assert not root.exists()  # nothing written under it (today the sweep ran and wrote, then the catalog refused)


# --- 8. sweep pre-checks: device, source and model, a root that cannot be created ----------------------


@pytest.mark.parametrize("args, named", [
    (["--model", "toy", "--source", "toy", "--device", "gpu"], "--device 'gpu' is not known"),
    (["--model", "toy", "--source", "toy", "--device", "cuda:x"], "--device 'cuda:x' is not known"),
    (["--model", "toy", "--source", "easy-vqa:train"], "--source easy-vqa:train holds questions"),
    (["--model", "toy", "--source", "toy", "--benchmarks", "synthetic:test"], "--benchmarks synthetic:test holds"),
    (["--model", "demo", "--source", "toy"], "--source toy holds random inputs made for the toy model"),
    (["--model", "toy", "--source", "toy", "--cluster", "local"], "cluster 'local' is not understood; use local:N"),
    (["--model", "toy", "--source", "toy", "--cluster", "local:2?timeout=0"], "the only option is timeout=SECONDS"),
], ids=["device-gpu", "device-cuda-x", "question-source-toy-model", "question-benchmark-toy-model",
        "toy-source-demo-model", "cluster-form", "cluster-timeout"])
def test_sweep_refuses_before_any_work(capsys, tmp_path, args, named, no_model):
    root = tmp_path / "data"
    line = _failure(capsys, ["sweep", "--data-root", str(root), *args, *SMALL], "sweep")
    assert named in line
    assert not root.exists()


def test_sweep_refuses_questions_for_a_checkpoint_without_processor(capsys, tmp_path, checkpoint, no_model):
    root = tmp_path / "data"
    line = _failure(capsys, ["sweep", "--data-root", str(root), "--model", str(checkpoint), "--source",
                             "easy-vqa:train", *SMALL], "sweep")
    assert f"--source easy-vqa:train holds questions and images, but {checkpoint} has no processor" in line
    assert not root.exists()


def test_sweep_refuses_cuda_when_there_is_none(capsys, tmp_path, no_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    root = tmp_path / "data"
    line = _failure(capsys, ["sweep", "--data-root", str(root), *TOY, "--device", "cuda"], "sweep")
    assert "--device cuda: CUDA is not available" in line and "--device cpu" in line
    assert not root.exists()


def test_sweep_refuses_a_data_root_it_cannot_create(capsys, tmp_path, no_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    root = blocker / "data"
    line = _failure(capsys, ["sweep", "--data-root", str(root), *TOY], "sweep")
    assert f"cannot create the data root {root}" in line


# --- --data-root after the subcommand; reading a data root that does not exist -----------------------------


def test_data_root_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["--data-root", "A", "pareto"]).data_root == "A"
    assert parser.parse_args(["pareto", "--data-root", "B"]).data_root == "B"
    assert parser.parse_args(["--data-root", "A", "sweep", "--data-root", "B"]).data_root == "B"
    assert parser.parse_args(["sql", "SELECT 1"]).data_root is None
    for command in (["sweep"], ["sql", "SELECT 1"], ["import-benchmarks", "x.json"]):
        assert parser.parse_args([*command, "--data-root", "B"]).data_root == "B"


def test_the_subcommands_data_root_wins(capsys, populated, tmp_path):
    missing = tmp_path / "missing"
    line = _failure(capsys, ["--data-root", str(populated), "pareto", "--data-root", str(missing)], "pareto")
    assert str(missing) in line


@pytest.mark.parametrize("command", [["pareto"], ["sql", "SELECT 1"]])
def test_reading_a_data_root_that_does_not_exist(capsys, tmp_path, command):
    root = tmp_path / "never-written"
    line = _failure(capsys, [command[0], "--data-root", str(root), *command[1:]], command[0])
    assert f"no data root at {root}; run a sweep first or pass --data-root" in line
    assert not root.exists()  # not silently created
