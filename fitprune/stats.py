"""Collect FitPrune attention statistics from a live model (DESIGN.md §2, issue "Calibration").

``collect_stats(model, batches)`` runs the model's own fast attention path; at every decoder layer
the scoring attention twin computes head-max attention rows for the text and alive visual queries
(in head chunks), reduces them to the cross score c and self score s of each alive visual token,
and hands them to the CPU right away, so device memory does not grow with the number of layers.
With ``recipe=`` the statistics are those of the *pruned* model (the refine step of the fit).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Callable

import numpy as np
import torch
from torch import nn

from .adapters import get_adapter
from .apply import attach, remove
from .calibration import CalibrationStats
from .prefill_state import PrefillView
from .prune import Probe, PruneReport
from .recipe import Recipe

__all__ = ["collect_stats"]


class _StatsProbe(Probe):
    """Records c and s of alive visual tokens, per layer, as (B, V) numpy arrays (NaN: not alive)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.batches: list[dict] = []
        self.counts: list[tuple] = []  # per batch (n_system, n_visual, n_text), each (B,)
        self.names: list[str] = []  # sample ids of the batch being run

    def begin(self, state: PrefillView) -> None:
        visual = state.visual
        empty = [self.names[b] for b, n in enumerate(state.alive_visual) if n == 0]
        if empty:
            raise ValueError(
                f"calibration samples without visual tokens: {empty[:5]}; every calibration sample needs an image"
            )
        before_image = torch.arange(state.input_len, device=visual.device)[None, :] < torch.tensor(
            state.first_visual, device=visual.device)[:, None]
        n_system = (state.real & before_image).sum(1)
        self.counts.append(tuple(np.array(c) for c in
                                 torch.stack([n_system, visual.sum(1), state.text.sum(1)]).tolist()))
        self._rank = visual.long().cumsum(1) - 1  # original position -> visual index
        self._n_vis = int(visual.sum(1).max())
        self._bsz = visual.shape[0]
        self._cross: dict[int, np.ndarray] = {}  # layer -> (B, V); layers with no alive visual token are absent
        self._self: dict[int, np.ndarray] = {}

    def on_scores(self, layer, state, cross, self_, candidates):
        rank = self._rank.gather(1, state.idx).masked_fill(~candidates, self._n_vis)  # dummy column for the rest
        for values, out in ((cross, self._cross), (self_, self._self)):
            dense = torch.full((rank.shape[0], self._n_vis + 1), float("nan"), device=rank.device)
            dense.scatter_(1, rank, values.float())
            out[layer] = dense[:, :-1].cpu().numpy()
        return None

    def end(self, state: PrefillView, report: PruneReport) -> None:
        if not self._cross:
            return  # a forward without visual tokens: nothing to record
        gone = np.full((self._bsz, self._n_vis), np.nan, dtype=np.float32)  # every visual token dropped

        def stack(per_layer):
            return np.stack([per_layer.get(layer, gone) for layer in range(self.num_layers)], axis=1)

        self.batches.append(
            {
                "cross": stack(self._cross),  # (B, L, V)
                "self": stack(self._self),
                "n_alive": report.attn_visual.copy(),  # (B, L)
            }
        )


def collect_stats(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    recipe: Recipe | None = None,
    checkpoint: str | None = None,
    calib_id: str | None = None,
    progress: Callable[[int], None] | bool = False,
    fused_scores: bool | None = None,
) -> CalibrationStats:
    """Cross/self scores of every visual token at every layer for a calibration set.

    ``batches`` yields model-input dicts (``input_ids``, ``attention_mask``, pixel inputs…), as a
    processor returns them; an optional ``"sample_ids"`` entry (list of str) names the samples.
    Every sample must contain visual tokens. Returns :class:`CalibrationStats`; its ``to_arrow()``
    gives the token table (sample, layer, token, cross, self) and the layer table (masses and counts).
    ``fused_scores``: how the scores are computed, as in :func:`fitprune.apply`.
    """
    adapter = get_adapter(model)
    num_layers = adapter.num_layers(model)
    if recipe is None:
        recipe = Recipe(drop_fractions=(0.0,) * num_layers, family=adapter.family)
    probe = _StatsProbe(num_layers)
    tick = _progress(progress)
    ids_seen: list[str] = []
    attach(model, recipe, probe=probe, fused_scores=fused_scores)
    try:
        for batch in batches:
            batch = dict(batch)
            names = batch.pop("sample_ids", None)
            size = batch["input_ids"].shape[0]
            start = len(ids_seen)
            probe.names = [str(n) for n in names] if names is not None else [str(start + i) for i in range(size)]
            with torch.no_grad():
                model(**batch, use_cache=False)
            if len(probe.batches) != len(probe.counts):
                raise RuntimeError("statistics were not recorded for a batch; is another hook stopping the forward?")
            ids_seen += probe.names
            tick(size)
    finally:
        remove(model)
    if not probe.batches:
        raise ValueError("the calibration set is empty: collect_stats needs at least one batch with an image")
    return _assemble(probe.batches, probe.counts, ids_seen, recipe, checkpoint, calib_id, adapter.family)


def _assemble(batches, counts, names, recipe, checkpoint, calib_id, family) -> CalibrationStats:
    width = max(b["cross"].shape[2] for b in batches)

    def pad(a):
        return np.pad(a, ((0, 0), (0, 0), (0, width - a.shape[2])), constant_values=np.nan)

    cross = np.concatenate([pad(b["cross"]) for b in batches])
    self_ = np.concatenate([pad(b["self"]) for b in batches])
    n_alive = np.concatenate([b["n_alive"] for b in batches])
    n_system = np.concatenate([c[0] for c in counts])
    n_visual = np.concatenate([c[1] for c in counts])
    n_text = np.concatenate([c[2] for c in counts])
    return CalibrationStats(
        cross=cross,
        self_=self_,
        n_visual=n_visual,
        n_system=n_system,
        n_text=n_text,
        cross_mass=np.nansum(cross.astype(np.float64), axis=2),
        self_mass=np.nansum(self_.astype(np.float64), axis=2),
        sample_ids=names,
        checkpoint=checkpoint,
        calib_id=calib_id,
        family=family,
        n_alive=None if recipe.is_noop else n_alive,
    )


def _progress(progress) -> Callable[[int], None]:
    if callable(progress):
        return progress
    if not progress:
        return lambda n: None
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        print(f"\rstatistics: {done[0]} samples", end="", file=sys.stderr, flush=True)

    return tick
