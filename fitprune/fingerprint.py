"""A stable, cheap fingerprint of a checkpoint: keys statistics and recipes (DESIGN.md §4).

From files: the canonical JSON of ``config.json`` plus, for every weight file (``*.safetensors``,
``*.bin``, ``*.pt``, ``*.gguf``), its name, size and SHA-256 of its first and last MiB (safetensors:
the whole header, which lists every tensor's dtype, shape and offsets). Reading ~2 MiB per file
keeps a 15 GB checkpoint in milliseconds; any re-save, re-quantisation or new shard changes it.

From a live model: the config plus, per parameter, name, shape, dtype and a strided sample of its
values — so two random initialisations differ, while the same weights agree across devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

__all__ = ["fingerprint", "fingerprint_files", "fingerprint_model"]

_EDGE = 1 << 20  # bytes hashed at each end of a weight file
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_PREFIX = "fp-"


# bookkeeping that saving or loading rewrites; dtypes are covered by the weights themselves
_VOLATILE = {
    "_name_or_path", "transformers_version", "_attn_implementation_autoset", "_attn_implementation",
    "architectures", "dtype", "torch_dtype",
}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    return value


def _canonical_config(config: dict) -> bytes:
    return json.dumps(_strip(config), sort_keys=True, default=str).encode()


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, 100 << 20)))
        f.seek(0)
        h.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))


def fingerprint_files(path: str | os.PathLike) -> str:
    """Fingerprint of a checkpoint directory (or a single weight file such as a .gguf)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a directory with config.json and weights, or a weight file")
    h = hashlib.sha256(b"fitprune-fingerprint-v1\n")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.exists():
        h.update(_canonical_config(json.loads(config.read_text())))
    if not files:
        raise ValueError(f"{path} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)}); is it a checkpoint?")
    for f in files:
        _file_digest(f, h)
    return _PREFIX + h.hexdigest()[:16]


def fingerprint_model(model: nn.Module, samples_per_tensor: int = 64) -> str:
    """Fingerprint of a live model's config and weights (a sample of each tensor's values)."""
    h = hashlib.sha256(b"fitprune-fingerprint-v1-live\n")
    h.update(_canonical_config(model.config.to_dict()))
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode())
            flat = p.reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // samples_per_tensor)
                h.update(flat[::step][:samples_per_tensor].detach().float().cpu().numpy().tobytes())
    return _PREFIX + h.hexdigest()[:16]


def fingerprint(model_or_path) -> str:
    """Fingerprint of a checkpoint path or a live model."""
    if isinstance(model_or_path, nn.Module):
        return fingerprint_model(model_or_path)
    return fingerprint_files(model_or_path)
