"""Small device tensors a pruner makes once and reuses: no host-to-device copy inside a prefill after
the first one (CUDA-graph capture forbids them; :mod:`fitprune.graphs`)."""

from __future__ import annotations

import torch

from . import scoring

__all__ = ["DeviceConstants"]


class DeviceConstants:
    """Per-pruner caches of drop counts as tensors and of the recipe's seeded random scores."""

    def __init__(self, seed: int):
        self.seed = seed
        self._k: dict[tuple, torch.Tensor] = {}
        self._random: dict[tuple, torch.Tensor] = {}

    def k_tensor(self, counts: list[int], device) -> torch.Tensor:
        """``counts`` as a device tensor, made once per distinct value."""
        key = (tuple(counts), str(device))
        if key not in self._k:
            if len(self._k) >= 4096:  # a long run over many batch compositions: start over
                self._k.clear()
            self._k[key] = torch.tensor(counts, device=device)
        return self._k[key]

    def random_scores(self, shape: tuple[int, int], layer: int, device) -> torch.Tensor:
        """The seeded random scores of ``layer`` (-1: before layer 0), made once per shape."""
        key = (shape, layer, str(device))
        if key not in self._random:
            if len(self._random) >= 256:  # many distinct batch shapes: start over (bounds memory)
                self._random.clear()
            self._random[key] = scoring.random_scores(shape, self.seed, layer, device)
        return self._random[key]
