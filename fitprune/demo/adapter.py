"""The demo model's trained part: projector weights plus optional LoRA deltas for the language model.

One safetensors file (``demo_adapter.safetensors``) beside a JSON manifest (``demo_adapter.json``:
data, steps, seed, metrics, and the file's SHA-256). Loading copies the projector into a stock
``LlavaForConditionalGeneration`` and merges each LoRA pair into its base weight
(W ← W + scale · B @ A), so the result is a plain model with no extra modules.

Tensor names: ``projector.<name>`` for ``model.multi_modal_projector.<name>``, and
``lora.<module path>.A`` (rank, in) / ``lora.<module path>.B`` (out, rank) for linear layers of
the language model (``model.language_model.layers.<i>.self_attn.q_proj`` ...).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .sources import sha256

__all__ = ["ADAPTER_FILE", "AdapterError", "LoRALinear", "TRAINED_ADAPTER", "add_lora", "adapter_state",
           "load_adapter", "merge_adapter", "read_manifest", "save_adapter"]

ADAPTER_FILE = "demo_adapter.safetensors"
MANIFEST_FILE = "demo_adapter.json"
TRAINED_ADAPTER = Path(__file__).resolve().parent.parent / "data" / ADAPTER_FILE
FORMAT_VERSION = 1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    """The adapter file is missing, does not match its manifest, or does not fit the model."""


class LoRALinear(nn.Module):
    """``base(x) + scale · B(A(x))`` with ``base`` frozen; B starts at zero, so the model is unchanged at init."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS) -> dict[str, LoRALinear]:
    """Wrap the language model's target linears in place; returns {module path: wrapper}."""
    lm = model.model.language_model
    wrapped = {}
    for name, module in list(lm.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(module, child_name, lora)
                wrapped[f"model.language_model.{name}.{child_name}"] = lora
    if not wrapped:
        raise AdapterError(f"no linear layer named {targets} in the language model")
    return wrapped


def adapter_state(model: nn.Module, loras: dict[str, LoRALinear]) -> tuple[dict[str, torch.Tensor], float | None]:
    """Tensors to save (float32, CPU) and the LoRA scale (None without LoRA)."""
    state = {f"projector.{k}": v.detach().float().cpu().contiguous()
             for k, v in model.model.multi_modal_projector.state_dict().items()}
    scales = {lora.scale for lora in loras.values()}
    for path, lora in loras.items():
        state[f"lora.{path}.A"] = lora.A.detach().half().cpu().contiguous()  # float16 halves the file;
        state[f"lora.{path}.B"] = lora.B.detach().half().cpu().contiguous()  # evaluation reads this file
    return state, (scales.pop() if scales else None)


def save_adapter(model: nn.Module, loras: dict[str, LoRALinear], directory: str | os.PathLike, manifest: dict) -> Path:
    """Write ``demo_adapter.safetensors`` (+ manifest with its SHA-256) into ``directory``; returns the file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, scale = adapter_state(model, loras)
    path = directory / ADAPTER_FILE
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION), "lora_scale": str(scale)})
    os.replace(tmp, path)
    record = {**manifest, "format_version": FORMAT_VERSION, "file": ADAPTER_FILE, "sha256": sha256(path),
              "lora_scale": scale, "parameters": int(sum(t.numel() for t in state.values()))}
    (directory / MANIFEST_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest beside an adapter file, after checking the file's SHA-256 against it."""
    path = Path(path)
    manifest_path = path.with_name(MANIFEST_FILE)
    if not path.is_file() or not manifest_path.is_file():
        raise AdapterError(f"adapter {path} or its manifest {manifest_path.name} is missing; "
                           f"train one with `python -m fitprune.demo.train` or pass adapter=None")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                           f"this fitprune reads {FORMAT_VERSION}")
    if sha256(path) != manifest.get("sha256"):
        raise AdapterError(f"{path} does not match the SHA-256 in {manifest_path.name}; the file is corrupt "
                           f"or was replaced without its manifest")
    return manifest


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], float | None, dict]:
    """(tensors, LoRA scale, manifest) of a checked adapter file."""
    from safetensors import safe_open

    manifest = read_manifest(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    scale = meta.get("lora_scale", "None")
    return state, (None if scale == "None" else float(scale)), manifest


@torch.no_grad()
def merge_adapter(model: nn.Module, state: dict[str, torch.Tensor], scale: float | None) -> None:
    """Copy the projector and add every LoRA delta into its base weight, in place (float32 arithmetic)."""
    projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    missing, unexpected = model.model.multi_modal_projector.load_state_dict(projector, strict=False)
    if missing or unexpected:
        raise AdapterError(f"adapter does not fit the projector: missing {missing}, unexpected {unexpected}")
    modules = dict(model.named_modules())
    paths = sorted({k[len("lora."):-2] for k in state if k.startswith("lora.")})
    if paths and scale is None:
        raise AdapterError("adapter holds LoRA tensors but no lora_scale in its metadata")
    for path in paths:
        linear = modules.get(path)
        if not isinstance(linear, nn.Linear):
            raise AdapterError(f"adapter names {path}, which is not a linear layer of this model")
        a, b = state[f"lora.{path}.A"].float(), state[f"lora.{path}.B"].float()
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape):
            raise AdapterError(f"{path}: LoRA delta {(b.shape[0], a.shape[1])} vs weight {tuple(linear.weight.shape)}")
        delta = (b @ a) * scale
        linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
