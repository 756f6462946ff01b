"""Model specs: which model a sweep step runs, built or loaded once per process.

A spec is a JSON-able dict, so it can cross Prefect task boundaries where a model cannot::

    {"kind": "demo"}                        the embedded demo LLaVA (DINOv2-S + SmolLM2-135M, trained adapter)
    {"kind": "toy", "seed": 0}              a seeded random-weight tiny LLaVA (tests; agreement only)
    {"kind": "path", "path": "/ckpt/llava"} a local Hugging Face checkpoint directory

optionally with ``"device"`` (default ``"cpu"``) and, for demo and path, ``"dtype"``
(``"auto"``, the default, ``"bfloat16"`` or ``"float32"``; ``default_dtype`` says what auto picks on a device).
The demo model is built once into
``<data root>/models`` (``fitprune.demo.build_demo_model``; the ``root`` argument of ``load_model``,
``encoder_for`` and ``model_info``, else ``$FITPRUNE_DATA``, else ``~/.cache/fitprune``) and loaded
from there afterwards.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from fitprune.adapters import get_adapter
from fitprune.fingerprint import fingerprint
from fitprune.flops import ModelDims

__all__ = ["DEFAULT_DTYPE", "DTYPES", "LOCK", "MODEL_KINDS", "NATIVE_BF16_FLAGS", "check_device",
           "check_weight_files", "cpu_has_bf16", "default_dtype", "describe_model", "encoder_for", "load_model",
           "model_and_processor", "model_info", "normalize_spec"]

MODEL_KINDS = ("demo", "toy", "path")
DTYPES = ("float32", "bfloat16")
DEFAULT_DTYPE = "bfloat16"  # on hardware with native bf16 (``default_dtype``), and what export-checkpoint writes
_KEYS = {"demo": {"dtype"}, "toy": {"seed"}, "path": {"path", "dtype"}}
_MODELS: dict[str, tuple] = {}
LOCK = threading.RLock()  # tasks may run in threads of one process: build each model once, hook one at a time


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# CPU flags of bf16 arithmetic in hardware: AVX512-BF16 and AMX-BF16 on x86, FEAT_BF16 ("bf16") on Arm.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(cpuinfo: str) -> bool | None:
    """Whether a ``/proc/cpuinfo`` text lists bf16 arithmetic (``NATIVE_BF16_FLAGS``) on its ``flags``
    (x86) or ``Features`` (Arm) lines; None when it has no such lines."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS) if flags else None


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively, from ``/proc/cpuinfo`` (``native_bf16``). Without it
    bf16 is emulated, and slower than float32 (README, "Time"). oneDNN's own check
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) said yes on an AVX-512 CPU without BF16, so it is
    asked only where ``/proc/cpuinfo`` is missing (not Linux)."""
    try:
        native = native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        native = None
    if native is not None:
        return native
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def default_dtype(device: str) -> str:
    """The dtype ``"auto"`` stands for: bfloat16 on CUDA and on a CPU with native bf16, float32 on other CPUs.
    The CPU checked is this process's: with ``--cluster`` CPU workers on other hosts, pass --dtype."""
    return DEFAULT_DTYPE if device.startswith("cuda") or cpu_has_bf16() else "float32"


DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")


def check_device(device: str) -> None:
    """ValueError unless ``device`` is cpu, cuda or cuda:N and, for CUDA, such a GPU is here."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"--device {device!r} is not known; use cpu, cuda or cuda:N (N: the GPU's index)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (no GPU, or torch {torch.__version__} "
                             "built without CUDA); use --device cpu")
        n = torch.cuda.device_count()
        if int(device.partition(":")[2] or 0) >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")


def normalize_spec(spec) -> dict:
    """A validated copy of a model spec (module docstring); ValueError naming the accepted forms otherwise."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            spec = {"kind": "path", "path": spec}  # a bare string is a checkpoint directory
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec is a dict such as {{'kind': 'demo'}}; got {spec!r}")
    kind = spec.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model spec kind {kind!r} is not known; use one of {', '.join(MODEL_KINDS)} "
                         "({'kind': 'demo'}, {'kind': 'toy', 'seed': 0} or {'kind': 'path', 'path': '/dir'})")
    unknown = sorted(set(spec) - {"kind", "device"} - _KEYS[kind])
    if unknown:
        raise ValueError(f"model spec {kind}: unknown key(s) {unknown}; allowed: kind, device, "
                         f"{', '.join(sorted(_KEYS[kind]))}")
    out = {"kind": kind, "device": str(spec.get("device") or "cpu")}
    if kind == "toy":
        seed = spec.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"toy model spec: seed must be an integer, got {seed!r}")
        out["seed"] = seed
    if kind == "path":
        path = spec.get("path")
        if not path or not (Path(path) / "config.json").is_file():
            raise ValueError(f"model spec path {path!r} is not a checkpoint directory (it needs a config.json); "
                             "pass {'kind': 'path', 'path': '/dir/with/config.json'}")
        out["path"] = str(Path(path).resolve())
    if kind in ("demo", "path"):
        dtype = spec.get("dtype") or "auto"
        if dtype not in DTYPES + ("auto",):
            raise ValueError(f"model spec dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
        out["dtype"] = default_dtype(out["device"]) if dtype == "auto" else dtype
    check_device(out["device"])
    return out


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def check_weight_files(path: str) -> None:
    """ValueError naming the first ``*.safetensors`` weight file of checkpoint ``path`` that is missing
    (listed in ``model.safetensors.index.json``), truncated or corrupt. Reads the headers only."""
    from safetensors import SafetensorError, safe_open

    directory = Path(path)
    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is corrupt ({err}); re-save the checkpoint (save_pretrained) or "
                             "re-download it") from None
        absent = [name for name in listed if not (directory / name).is_file()]
        if absent:
            raise ValueError(f"{directory / absent[0]} is missing (listed in {index.name}); re-save the checkpoint "
                             "(save_pretrained) or re-download it")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is truncated or corrupt ({file.stat().st_size} bytes; {err}); re-save the "
                             "checkpoint (save_pretrained) or re-download it") from None


def _load_local(path: str, dtype: torch.dtype):
    """A local checkpoint (image-text-to-text class first, then causal LM) and its processor, if it has one."""
    import transformers

    check_weight_files(path)  # else a truncated file fails deep inside transformers, naming no file
    errors, model = [], None
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(path, local_files_only=True, dtype=dtype)
            break
        except (ValueError, KeyError, OSError) as err:
            errors.append(f"{name}: {err}")
    if model is None:
        raise ValueError(f"cannot load {path} with transformers: " + "; ".join(errors))
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError):
        processor = None  # input-only sources still work; question sources say what is missing
    return model, processor


def _build(spec: dict, root=None):
    if spec["kind"] == "toy":
        from fitprune.demo import toy

        return toy.toy_model(spec["seed"]), None
    if spec["kind"] == "demo":
        from fitprune.demo import build_demo_model
        from storage.root import data_root

        cache = data_root(root) / "models"
        _log(f"model: demo LLaVA from {cache} (built on first use, ~25 s)")
        return build_demo_model(cache, dtype=getattr(torch, spec["dtype"]))
    _log(f"model: loading {spec['path']}")
    return _load_local(spec["path"], getattr(torch, spec["dtype"]))


def _entry(spec, root=None) -> tuple:
    spec = normalize_spec(spec)
    key = _key(spec)
    with LOCK:
        if key not in _MODELS:
            model, processor = _build(spec, root)
            _MODELS[key] = (model.to(spec["device"]).eval(), processor)
        return _MODELS[key]


def model_and_processor(spec, root=None) -> tuple:
    """``(model, processor)`` for ``spec``, as ``load_model`` (the processor: None for the toy model or a
    checkpoint without processor files; the demo model's ``DemoProcessor``)."""
    return _entry(spec, root)


def load_model(spec, root=None) -> torch.nn.Module:
    """The model for ``spec``, built or loaded once per process (eval mode, on the spec's device).

    ``root``: the data root whose ``models/`` caches the built demo model."""
    return _entry(spec, root)[0]


def encoder_for(spec, root=None):
    """The evaluation harness's encoder for the spec's model (question sources need one)."""
    from fitprune.evaluation.harness import DemoEncoder, HFEncoder

    spec = normalize_spec(spec)
    processor = _entry(spec, root)[1]
    if spec["kind"] == "demo":
        return DemoEncoder(processor)
    if processor is None:
        where = "the toy model" if spec["kind"] == "toy" else f"{spec['path']} (no processor files found)"
        raise ValueError(f"{where} cannot read questions and images; use an input source ('toy' or 'hf:/path') "
                         "or a checkpoint saved with its processor")
    return HFEncoder(processor)


def describe_model(spec) -> str:
    """One line saying what the spec's model is (logged by every sweep)."""
    spec = normalize_spec(spec)
    if spec["kind"] == "demo":
        return (f"model: demo LLaVA (DINOv2-S/14 + SmolLM2-135M-Instruct, trained projector + LoRA; 576 visual "
                f"tokens) on {spec['device']}, {spec['dtype']}")
    if spec["kind"] == "toy":
        return f"model: toy, seed {spec['seed']} (seeded random-weight tiny LLaVA) — agreement, not accuracy"
    return f"model: {spec['path']} on {spec['device']}, {spec['dtype']}"


def model_info(spec, root=None) -> dict:
    """Checkpoint fingerprint, family and text dims (as a dict) of the spec's model.

    A path spec is fingerprinted from its files (what ``flows.recalibrate`` looks up); the demo and
    toy models from their live weights.
    """
    spec = normalize_spec(spec)
    model = load_model(spec, root)
    adapter = get_adapter(model)
    dims = ModelDims.from_config(adapter.text_config(model))
    checkpoint = fingerprint(spec["path"]) if spec["kind"] == "path" else fingerprint(model)
    return {"checkpoint": checkpoint, "family": adapter.family, "dims": asdict(dims)}
