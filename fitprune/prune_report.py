"""What a pruned prefill really executed: the token counts behind every FLOPs number."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PruneReport", "report_of"]


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


def report_of(state, num_layers: int) -> PruneReport:
    """The report of a finished prefill from its :class:`~fitprune.prefill_state.PrefillState`; counts
    from the host bookkeeping, ``kept``/``dropped`` read from the device only when asked for."""
    n_layers = len(state.attn_counts)
    attn_real = np.array([c[0] for c in state.attn_counts]).T  # (B, L)
    attn_vis = np.array([c[1] for c in state.attn_counts]).T
    # tokens left after a layer's pruning = tokens entering the next; after the last: alive now
    mlp_real = np.concatenate([attn_real[:, 1:], np.array(state.alive_real)[:, None]], axis=1)[:, :n_layers]
    mlp_vis = np.concatenate([attn_vis[:, 1:], np.array(state.alive_visual)[:, None]], axis=1)[:, :n_layers]
    idx, valid, positions = state.idx, state.valid, dict(state.dropped_positions)
    bsz, length = idx.shape[0], state.input_len

    def kept_on_device() -> torch.Tensor:
        return torch.zeros(bsz, length, dtype=torch.bool, device=idx.device).scatter_(1, idx, valid)

    kept_now = None
    if state.static:  # a graph replay: copy now (queued, no wait) before the next replay overwrites
        kept_now = kept_on_device()
        if positions:
            flat = torch.cat(list(positions.values()), 1).split([p.shape[1] for p in positions.values()], 1)
            positions = dict(zip(positions, flat))

    def kept() -> np.ndarray:
        return (kept_now if kept_now is not None else kept_on_device()).cpu().numpy()

    def rows(pos) -> list[list[int]]:
        return [sorted(p for p in row if p >= 0) for row in pos.cpu().tolist()]

    def dropped() -> list[list[list[int]]]:
        out = [[[] for _ in range(num_layers)] for _ in range(bsz)]
        for layer, pos in positions.items():
            if layer >= 0:
                for b, row in enumerate(rows(pos)):
                    out[b][layer] = row
        return out

    def dropped_input() -> list[list[int]]:
        return rows(positions[-1]) if -1 in positions else [[] for _ in range(bsz)]

    return PruneReport(attn_real, mlp_real, attn_vis, mlp_vis, kept, dropped, n_visual=state.initial_visual,
                       dropped_input_fn=dropped_input, input_tokens=state.initial_real)
