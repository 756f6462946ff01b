"""One sweep configuration (``flows.config.SweepConfig``): the CLI's options, the flows' parameter and the
deployments' parameters are the same schema with the same defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.cli import build_parser
from flows.cli_config import config_from_args, option_fields
from flows.config import DEVICE_DEFAULTS, DemoModel, PathModel, SweepConfig, ToyModel
from tasks.models import default_dtype

REPO = Path(__file__).resolve().parents[1]


def _config_schema_of(flow_fn, parameter: str = "config") -> dict:
    """The JSON schema Prefect derives for one flow parameter, its definitions inlined the pydantic way."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow_fn).model_dump(mode="json")
    text = json.dumps(schema).replace("#/definitions/", "#/$defs/")
    schema = json.loads(text)
    assert schema["properties"][parameter]["$ref"] == "#/$defs/SweepConfig"
    return {"defs": schema["definitions"], "config": schema["definitions"]["SweepConfig"]}


def test_the_flows_parameter_is_the_config_schema():
    from flows.recalibrate import recalibrate
    from flows.sweep_flow import sweep

    expected = SweepConfig.model_json_schema()
    for flow_fn in (sweep, recalibrate):
        got = _config_schema_of(flow_fn)
        assert got["config"]["properties"] == expected["properties"], flow_fn.name
        for name in ("DemoModel", "ToyModel", "PathModel"):
            assert got["defs"][name] == expected["$defs"][name], (flow_fn.name, name)


def test_every_config_field_is_a_cli_option_and_nothing_else():
    parser = build_parser()
    sweep = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["sweep"]
    options = {opt for action in sweep._actions for opt in action.option_strings} - {"-h", "--help"}
    expected = set(option_fields().values()) | {"--model", "--dtype", "--data-root"}
    assert options == expected
    assert set(option_fields()) | {"model", "data_root"} == set(SweepConfig.model_fields)


def test_no_options_give_the_flows_default_config():
    from flows.sweep_flow import sweep

    from_cli = config_from_args(build_parser().parse_args(["sweep"]))
    flow_default = sweep.parameters.properties["config"]["default"]  # what the UI and a bare deployment run use
    assert from_cli == SweepConfig() == SweepConfig(**flow_default)
    resolved = from_cli.resolved()
    assert from_cli.model is None and DemoModel().dtype == "auto"
    assert resolved.model == DemoModel(dtype=default_dtype("cpu")) and resolved.max_new_tokens == 6
    assert (resolved.calib_samples, resolved.eval_samples, resolved.batch_size) == (12, 16, 8)
    assert resolved.convention == "full" and resolved.benchmarks == ("easy-vqa:test", "synthetic:test")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_cpus_bf16_support(monkeypatch, native):
    """auto is bf16 on CUDA and on a CPU with native bf16, float32 on an emulating CPU; explicit dtypes stay."""
    from tasks import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: native)
    cpu = "bfloat16" if native else "float32"
    assert SweepConfig().resolved().model == DemoModel(dtype=cpu)
    assert SweepConfig(device="cuda").resolved().model == DemoModel(dtype="bfloat16")
    assert SweepConfig(model={"kind": "demo", "dtype": "bfloat16"}).resolved().model.dtype == "bfloat16"
    assert SweepConfig(model={"kind": "demo", "dtype": "float32"}, device="cuda").resolved().model.dtype == "float32"
    assert SweepConfig().spec() == {"kind": "demo", "dtype": cpu, "device": "cpu"}
    assert models.normalize_spec({"kind": "demo"})["dtype"] == cpu
    assert models.normalize_spec({"kind": "demo", "dtype": "auto"})["dtype"] == cpu
    assert models.normalize_spec({"kind": "demo", "dtype": "bfloat16"})["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="'half': use auto or one of float32, bfloat16"):
        models.normalize_spec({"kind": "demo", "dtype": "half"})


_CPUINFO = {  # the lines that matter of /proc/cpuinfo, one core each
    "epyc-avx2": "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n",
    "xeon-avx512": "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                   "flags\t\t: avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni\n",
    "sapphire-rapids": "flags\t\t: avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n",
    "zen4": "flags\t\t: avx2 avx512f avx512_bf16\n",
    "graviton3": "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n",
    "neoverse-n1": "processor\t: 0\nFeatures\t: fp asimd aes crc32 atomics\n",
    "no-flags": "processor\t: 0\nmodel name\t: unknown\n",
}


@pytest.mark.parametrize("cpu, native", [("epyc-avx2", False), ("xeon-avx512", False), ("sapphire-rapids", True),
                                         ("zen4", True), ("graviton3", True), ("neoverse-n1", False),
                                         ("no-flags", None), ("", None)])
def test_native_bf16_reads_the_cpus_flags(cpu, native):
    """bf16 is native only with AVX512-BF16 / AMX-BF16 (x86) or BF16 (Arm): AVX-512 alone emulates it
    (oneDNN's check says yes there); no flag lines at all is 'unknown' (None), not 'no'."""
    from tasks.models import native_bf16

    assert native_bf16(_CPUINFO.get(cpu, cpu)) is native


def test_each_option_reaches_its_field(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    argv = ["sweep", "--budgets", "0.3,0.6", "--methods", "fastv,dart", "--search", "full", "--calib-samples", "12",
            "--eval-samples", "7", "--batch-size", "3", "--seed", "5", "--source", "synthetic:train",
            "--benchmarks", "synthetic:val", "--max-new-tokens", "9", "--shard-size", "11", "--convention",
            "full", "--device", "cuda:1", "--model", str(ckpt), "--dtype", "float32", "--data-root", "R"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config == SweepConfig(budgets=(0.3, 0.6), methods=("fastv", "dart"), search="full", calib_samples=12,
                                 eval_samples=7, batch_size=3, seed=5, source="synthetic:train",
                                 benchmarks=("synthetic:val",), max_new_tokens=9, shard_size=11,
                                 convention="full", device="cuda:1", data_root="R",
                                 model=PathModel(path=str(ckpt), dtype="float32"))
    assert config_from_args(build_parser().parse_args(["sweep", "--model", "toy", "--seed", "4"])).resolved().model \
        == ToyModel(seed=4)


def test_device_scales_only_the_counts_left_unset():
    cuda = SweepConfig(device="cuda", eval_samples=100).resolved()
    assert (cuda.calib_samples, cuda.eval_samples, cuda.batch_size) == (DEVICE_DEFAULTS["cuda"]["calib_samples"], 100,
                                                                       DEVICE_DEFAULTS["cuda"]["batch_size"])
    assert cuda.resolved() == cuda  # resolving twice changes nothing


def test_the_deployments_parameters_validate_as_configs():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    params = {d["name"]: d["parameters"] for d in doc["deployments"]}
    sweep = SweepConfig(**params["sweep"]["config"])
    recal = SweepConfig(**params["recalibrate"]["config"])
    assert sweep.model == DemoModel() and recal.model is None  # the checkpoint found is recalibrate's model
    assert sweep.model_copy(update={"model": None}) == recal  # one template, shared by both (a YAML anchor)
    (trigger,) = next(d for d in doc["deployments"] if d["name"] == "recalibrate")["triggers"]
    assert set(trigger["parameters"]) == {"checkpoint", "resource_id"}


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "0.5,1.5"], "budgets must lie in (0, 1)"),
    (["--convention", "fitprune-paper"], "invalid choice"),
    (["--calib-samples", "2"], "needs at least 4 samples"),
    (["--model", "toy", "--dtype", "float32"], "--dtype applies to the demo model"),
])
def test_bad_values_are_one_line_errors(argv, message, capsys):
    from flows.cli import main

    try:
        rc = main(["sweep", *argv])
    except SystemExit as usage:  # argparse: a value outside the choices is a usage error
        rc = usage.code
    err = capsys.readouterr().err
    assert rc in (1, 2) and message in err
    assert rc == 2 or len(err.strip().splitlines()) == 1, err
