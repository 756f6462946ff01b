"""Small device tensors a pruner makes once and reuses: no host-to-device copy inside a prefill after
the first one (CUDA-graph capture forbids them; :mod:`fitprune.graphs`)."""

from __future__ import annotations

import torch

from . import scoring

__all__ = ["DeviceConstants"]


class DeviceConstants:
    """Per-pruner caches of drop counts as tensors, of row-count reciprocals, of a zero and of the recipe's seeded
    random scores."""

    def __init__(self, seed: int):
        self.seed = seed
        self._k: dict[tuple, torch.Tensor] = {}
        self._random: dict[tuple, torch.Tensor] = {}
        self._inverse: dict[tuple, torch.Tensor] = {}
        self._zero: dict[tuple, torch.Tensor] = {}

    def k_tensor(self, counts: list[int], device) -> torch.Tensor:
        """``counts`` as a device tensor, made once per distinct value."""
        key = (tuple(counts), str(device))
        if key not in self._k:
            if len(self._k) >= 4096:  # a long run over many batch compositions: start over
                self._k.clear()
            self._k[key] = torch.tensor(counts, device=device)
        return self._k[key]

    def inverse_counts(self, text: list[int], visual: list[int], device) -> torch.Tensor:
        """(B, 2) float32 ``1 / max(1, n)`` of each sample's text and visual row counts, made once per
        distinct value (the fused scores' row weights, ``fused_scores.fused_cross_self_flags``)."""
        key = (tuple(text), tuple(visual), str(device))
        if key not in self._inverse:
            if len(self._inverse) >= 4096:
                self._inverse.clear()
            counts = torch.tensor([text, visual], dtype=torch.float32, device=device).T
            self._inverse[key] = (torch.ones_like(counts) / counts.clamp(min=1)).contiguous()
        return self._inverse[key]

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-d zero of ``like``'s dtype and device, made once (never written: callers only expand it)."""
        key = (like.dtype, str(like.device))
        if key not in self._zero:
            self._zero[key] = like.new_zeros(())
        return self._zero[key]

    def random_scores(self, shape: tuple[int, int], layer: int, device) -> torch.Tensor:
        """The seeded random scores of ``layer`` (-1: before layer 0), made once per shape."""
        key = (shape, layer, str(device))
        if key not in self._random:
            if len(self._random) >= 256:  # many distinct batch shapes: start over (bounds memory)
                self._random.clear()
            self._random[key] = scoring.random_scores(shape, self.seed, layer, device)
        return self._random[key]
