"""What a pruned prefill really executed: the token counts behind every FLOPs number."""

from __future__ import annotations

import numpy as np

__all__ = ["PruneReport"]


class PruneReport:
    """What the last pruned prefill really executed (numpy arrays, one row per sample).

    ``attn_tokens[b, l]`` real tokens entering layer l's attention (padding excluded);
    ``mlp_tokens[b, l]`` tokens its MLP ran on (= those left after its pruning);
    ``attn_visual`` / ``mlp_visual`` the visual part of those; ``kept[b, p]`` whether input
    position p survived every layer; ``dropped[b][l]`` original positions dropped after layer l;
    ``dropped_input[b]`` those a pre-LLM recipe removed before layer 0; ``n_visual[b]`` / ``input_tokens[b]``
    the visual / non-padding tokens of the prompt (before any pruning). The counts are bookkept on the host; ``kept`` and ``dropped`` are copied from the device only
    when read, so the forward itself never waits for them.
    """

    def __init__(self, attn_tokens, mlp_tokens, attn_visual, mlp_visual, kept_fn, dropped_fn, n_visual=None,
                 dropped_input_fn=None, input_tokens=None):
        self.attn_tokens = np.asarray(attn_tokens, dtype=np.int64)
        self.mlp_tokens = np.asarray(mlp_tokens, dtype=np.int64)
        self.attn_visual = np.asarray(attn_visual, dtype=np.int64)
        self.mlp_visual = np.asarray(mlp_visual, dtype=np.int64)
        self.n_visual = (self.attn_visual[:, 0] if n_visual is None else np.asarray(n_visual, dtype=np.int64)).copy()
        self.input_tokens = (self.attn_tokens[:, 0] if input_tokens is None
                             else np.asarray(input_tokens, dtype=np.int64)).copy()
        self._kept_fn, self._dropped_fn = kept_fn, dropped_fn
        self._dropped_input_fn = dropped_input_fn or (lambda: [[] for _ in range(len(self.n_visual))])
        self._kept = self._dropped = self._dropped_input = None

    @property
    def kept(self) -> np.ndarray:
        if self._kept is None:
            self._kept = self._kept_fn()
        return self._kept

    @property
    def dropped(self) -> list[list[list[int]]]:
        if self._dropped is None:
            self._dropped = self._dropped_fn()
        return self._dropped

    @property
    def dropped_input(self) -> list[list[int]]:
        if self._dropped_input is None:
            self._dropped_input = self._dropped_input_fn()
        return self._dropped_input

    def flops(self, dims, convention: str = "full") -> np.ndarray:
        """Per-sample prefill cost from the executed counts (``fitprune.flops`` conventions)."""
        from .flops import prefill_flops

        if convention == "fitprune-paper":
            attn, mlp = self.attn_visual, self.mlp_visual
        else:
            attn, mlp = self.attn_tokens, self.mlp_tokens
        return np.array(
            [prefill_flops(dims, a.tolist(), m.tolist(), convention=convention) for a, m in zip(attn, mlp)]
        )

    def __repr__(self) -> str:
        return f"PruneReport(samples={len(self.n_visual)}, n_visual={self.n_visual.tolist()})"
