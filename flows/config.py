"""The sweep's one configuration: a pydantic model, the single source of every sweep setting.

``SweepConfig`` is the ``fitprune/sweep`` flow's one parameter (``config``), the template of every
re-calibration run (``prefect.yaml``), and the source of ``fitprune sweep``'s options: ``flows.cli``
generates one option per field, with the field's description as help and no default of its own.
So the CLI, the flow and the deployment validate the same values the same way, and share every
default (``tests/test_config.py`` holds their schemas equal).

The model is a discriminated union on ``kind``: ``{"kind": "demo"}``, ``{"kind": "toy", "seed": 0}``,
``{"kind": "path", "path": "/ckpt/dir"}``. Counts left at ``None`` follow the device:
:meth:`SweepConfig.resolved` fills them (12 / 16 / 8 on a CPU, 64 / 500 / 32 on CUDA) and picks the
model when none is named (the toy model for toy inputs, else the demo model). Validation needs no
model and touches no file except a path model's ``config.json``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.models import DEVICE_PATTERN, default_dtype
from tasks.recipes import DEFAULT_METHODS, METHODS, SEARCH_SIZES

__all__ = ["DEFAULT_BENCHMARKS", "DemoModel", "ModelSpec", "PathModel", "SweepConfig", "ToyModel", "DEVICE_DEFAULTS"]

DEFAULT_BENCHMARKS = ("easy-vqa:test", "synthetic:test")
Dtype = Literal["auto", "bfloat16", "float32"]
DTYPE_HELP = "weight dtype (auto: bfloat16 on CUDA and on a CPU with native bf16, else float32)"
# the counts a config leaves at None, per device kind
# CPU: sized so the main job (`make sweep`) stays under 10 min on a 2-core AVX2 machine in float32
DEVICE_DEFAULTS = {"cpu": {"calib_samples": 12, "eval_samples": 16, "batch_size": 8},
                   "cuda": {"calib_samples": 64, "eval_samples": 500, "batch_size": 32}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoModel(_Strict):
    """The embedded demo LLaVA (DINOv2-S/14 + SmolLM2-135M-Instruct, trained adapter), built once
    under ``<data root>/models``."""

    kind: Literal["demo"] = "demo"
    dtype: Dtype = Field("auto", description=DTYPE_HELP)


class ToyModel(_Strict):
    """A seeded random-weight tiny LLaVA: agreement with the unpruned model, not accuracy."""

    kind: Literal["toy"] = "toy"
    seed: int | None = Field(None, description="weight seed (default: the sweep's seed)")


class PathModel(_Strict):
    """A local Hugging Face checkpoint directory (``config.json`` + safetensors; question sources also
    need its processor files: ``fitprune export-checkpoint`` writes both)."""

    kind: Literal["path"] = "path"
    path: str = Field(description="checkpoint directory")
    dtype: Dtype = Field("auto", description=DTYPE_HELP)

    @field_validator("path")
    @classmethod
    def _is_checkpoint(cls, path: str) -> str:
        from pathlib import Path

        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"model path {path!r} is not a checkpoint directory (it needs a config.json); "
                             "pass the directory save_pretrained or `fitprune export-checkpoint` wrote")
        return str(Path(path).resolve())


ModelSpec = Annotated[Union[DemoModel, ToyModel, PathModel], Field(discriminator="kind")]


def _positive(name: str, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class SweepConfig(_Strict):
    """What a sweep runs. Field order is the CLI's option order; each description is its help."""

    model: ModelSpec | None = Field(
        None, description="the model: demo, toy or a checkpoint directory (default: demo; toy for --source toy)")
    device: str = Field("cpu", description="cpu, cuda or cuda:N; cuda raises the default counts")
    budgets: tuple[float, ...] = Field((0.5, 0.7), description="prefill FLOPs fractions to remove, each in (0, 1)")
    methods: tuple[str, ...] = Field(DEFAULT_METHODS, description=f"of {','.join(METHODS)} (visionzip: LLaVA-1.5 "
                                     "layout only)")
    search: Literal[SEARCH_SIZES] = Field(  # type: ignore[valid-type]
        "auto", description="width of fitprune's divergence search (auto: small on a CPU, full on a GPU)")
    calib_samples: int | None = Field(None, description="calibration samples (default 12; 64 on CUDA)")
    eval_samples: int | None = Field(None, description="samples per benchmark (default 16; 500 on CUDA)")
    batch_size: int | None = Field(None, description="batch size (default 8; 32 on CUDA)")
    seed: int = Field(0, description="seed of the sample sets (and of the toy model's weights)")
    source: str = Field("easy-vqa:train", description="calibration samples: easy-vqa:train|test, "
                        "synthetic:train|val|test, <loader>:/path (pope, gqa, textvqa, vqav2, mme, mmbench, "
                        "scienceqa, parquet), toy, or hf:/path (processed inputs)")
    benchmarks: tuple[str, ...] | None = Field(
        None, description="evaluation sources (default easy-vqa:test,synthetic:test; for toy and hf: sources, "
        "the source itself, scored by agreement with the unpruned model)")
    max_new_tokens: int = Field(6, description="answer length limit in tokens")
    shard_size: int = Field(64, description="samples per statistics/evaluation shard; finished shards are reused")
    convention: Literal["full"] = Field(
        "full", description="FLOPs convention the budgets are fitted and measured under: full (all tokens, from "
        "the executed counts). The authors' convention (visual tokens only) is reported beside it in every "
        "evaluation (flops_reduction_paper); fitting to it is fitprune.fit(..., convention='fitprune-paper')")
    data_root: str | None = Field(None, description="data root (default: $FITPRUNE_DATA, else ~/.cache/fitprune)")
    cluster: str | None = Field(
        None, description="run the model steps on Dask workers (flows/fanout.py): local:N (N processes here), "
        "local-cuda (one per GPU), tcp://HOST:PORT (a running scheduler); ?timeout=SECONDS (default 3600) fails "
        "a sweep in which no shard finished for that long (default: serial, in this process)")

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"--device {device!r} is not known; use cpu, cuda or cuda:N (N: the GPU's index)")
        return device

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets):
        if not budgets:
            raise ValueError("budgets is empty; pass at least one FLOPs fraction in (0, 1), e.g. 0.3,0.5")
        bad = [b for b in budgets if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"budgets must lie in (0, 1) (fractions of prefill FLOPs to remove); got {bad}")
        return budgets

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods):
        if not methods:
            raise ValueError(f"methods is empty; pass one or more of {', '.join(METHODS)}")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        return methods

    @field_validator("source")
    @classmethod
    def _source(cls, source: str) -> str:
        from tasks import sources

        return str(sources.parse(source))  # raises on an unknown source, naming the accepted forms

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks(cls, benchmarks):
        from tasks import sources

        if benchmarks is not None and not benchmarks:
            raise ValueError("benchmarks is empty; pass one or more evaluation sources, e.g. easy-vqa:test")
        return None if benchmarks is None else tuple(str(sources.parse(b)) for b in benchmarks)

    @field_validator("calib_samples", "eval_samples", "batch_size", "max_new_tokens", "shard_size")
    @classmethod
    def _counts(cls, value, info):
        return _positive(info.field_name, value)

    @model_validator(mode="after")
    def _enough_calibration(self):
        if self.calib_samples is not None and self.calib_samples < 4:
            raise ValueError(f"calib_samples = {self.calib_samples}: every recipe's divergence is measured on a "
                             "search and a held-out part of the calibration set, so it needs at least 4 samples "
                             "(2 + 2)")
        return self

    def resolved(self) -> "SweepConfig":
        """This config with every default that depends on something filled in: the counts by device
        (``DEVICE_DEFAULTS``), the model (toy for toy inputs, else demo; a toy model's seed is the
        sweep's; dtype auto as ``tasks.models.default_dtype`` picks it for the device), the benchmarks
        (easy-VQA test + synthetic test for question sources, else the source)."""
        from tasks import sources

        counts = DEVICE_DEFAULTS["cuda" if self.device.startswith("cuda") else "cpu"]
        update = {k: v for k, v in counts.items() if getattr(self, k) is None}
        model = self.model
        if model is None:
            model = ToyModel() if sources.parse(self.source).kind == "toy" else DemoModel()
        if isinstance(model, ToyModel) and model.seed is None:
            model = ToyModel(seed=self.seed)
        if getattr(model, "dtype", None) == "auto":
            model = model.model_copy(update={"dtype": default_dtype(self.device)})
        update["model"] = model
        if self.benchmarks is None:
            update["benchmarks"] = DEFAULT_BENCHMARKS if sources.is_question_source(self.source) else (self.source,)
        return self.model_copy(update=update)

    def spec(self) -> dict:
        """The model spec the steps take (``tasks.models``): the model's fields plus the device."""
        model = self.resolved().model
        return {**model.model_dump(), "device": self.device}

    def record(self) -> dict:
        """The resolved config as plain JSON data (stored as a run's parameters)."""
        return self.resolved().model_dump(mode="json")
