"""Progressive fit: the α-walk run on the live model (the authors' way), and the refine step.

The statistical fit (:mod:`fitprune.fit`) replays the walk on statistics of one unpruned pass; it
ignores that attention renormalises once tokens are gone. Here each α is evaluated by really
running the calibration set with the α-rule applied at every layer (DESIGN.md §2): the scores of
the alive tokens come from the pruned model, the reference masses C_l, S_l from the unpruned pass.
The budget check and the α bisection are shared with the statistical fit: the walk is computed
without a stop and truncated afterwards, which is exact because what a layer drops never depends
on later layers.

``refine`` collects statistics under a fitted recipe and re-fits against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .apply import attach, remove
from .calibration import CalibrationStats
from .fit import FitResult, fit
from .flops import ModelDims
from .prefill_state import PrefillView
from .prune import Probe, PruneReport
from .recipe import Recipe

__all__ = ["Refined", "alpha_drops", "fit_progressive", "progressive_walk", "refine"]


def _prefix_len(scores: torch.Tensor, candidates: torch.Tensor, reference: torch.Tensor, alpha: float):
    """Per sample: ranks (B, Lc) of the candidates in ascending score, and the longest prefix whose
    removal keeps the surviving mass ≥ (1-α)·reference."""
    vals = torch.where(candidates, scores.double(), torch.inf)
    order = torch.sort(vals, dim=1, stable=True).indices
    sorted_vals = torch.gather(vals, 1, order).nan_to_num(posinf=0.0)
    prefix = sorted_vals.cumsum(1)
    surviving = prefix[:, -1:] - prefix  # mass left after dropping each prefix
    k = (surviving >= ((1.0 - alpha) * reference)[:, None]).sum(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank, k


def alpha_drops(cross, self_, candidates, cross_ref, self_ref, alpha: float) -> torch.Tensor:
    """The α-rule at one layer: (B, Lc) bool, the intersection of the two longest prefixes."""
    rank_c, k_c = _prefix_len(cross, candidates, cross_ref, alpha)
    rank_s, k_s = _prefix_len(self_, candidates, self_ref, alpha)
    return candidates & (rank_c < k_c[:, None]) & (rank_s < k_s[:, None])


class _AlphaProbe(Probe):
    def __init__(self, alpha: float, cross_mass: np.ndarray, self_mass: np.ndarray):
        self.alpha = alpha
        self.cross_mass = torch.from_numpy(cross_mass)  # (S, L) unpruned reference masses
        self.self_mass = torch.from_numpy(self_mass)
        self.rows: slice | None = None
        self.counts: list[np.ndarray] = []

    def begin(self, state: PrefillView) -> None:
        self._layer_counts: dict[int, torch.Tensor] = {}  # layers with no alive visual token are absent

    def on_scores(self, layer, state, cross, self_, candidates):
        ref_c = self.cross_mass[self.rows, layer].to(cross.device)
        ref_s = self.self_mass[self.rows, layer].to(cross.device)
        if self.alpha == 0.0:  # like the statistical walk: α = 0 keeps even zero-score tokens
            drop = torch.zeros_like(candidates)
        else:
            drop = alpha_drops(cross, self_, candidates, ref_c, ref_s, self.alpha)
        self._layer_counts[layer] = drop.sum(1)
        return drop

    def end(self, state: PrefillView, report: PruneReport) -> None:
        counts = np.zeros((state.idx.shape[0], self.cross_mass.shape[1]), dtype=np.int64)
        for layer, c in self._layer_counts.items():
            counts[:, layer] = c.cpu().numpy()
        self.counts.append(counts)


def progressive_walk(model: nn.Module, batches: Sequence, reference: CalibrationStats, alpha: float) -> np.ndarray:
    """Per-sample drop counts (S, L) of the unstopped α-walk on the live model.

    ``batches`` are the calibration batches ``reference`` was collected from, in the same order.
    """
    probe = _AlphaProbe(alpha, reference.cross_mass, reference.self_mass)
    num_layers = reference.num_layers
    attach(model, Recipe(drop_fractions=(0.0,) * num_layers), probe=probe)
    start = 0
    try:
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k != "sample_ids"}
            size = batch["input_ids"].shape[0]
            probe.rows = slice(start, start + size)
            with torch.no_grad():
                model(**batch, use_cache=False)
            start += size
    finally:
        remove(model)
    if start != reference.num_samples:
        raise ValueError(
            f"the batches hold {start} samples but the reference statistics {reference.num_samples}: "
            "pass the calibration batches the statistics were collected from"
        )
    return np.concatenate(probe.counts)


def fit_progressive(
    model: nn.Module,
    batches: Sequence,
    reference: CalibrationStats,
    budgets: Sequence[float],
    dims: ModelDims,
    **fit_kwargs,
) -> list[FitResult]:
    """:func:`fitprune.fit.fit` with every α evaluated by a live pass (≈7 passes per budget at tol 0.01)."""
    results = fit(reference, budgets, dims, walker=lambda a: progressive_walk(model, batches, reference, a), **fit_kwargs)
    return [replace(r, recipe=r.recipe.with_updates(metadata={**r.recipe.metadata, "fit": "progressive"}))
            for r in results]


@dataclass(frozen=True)
class Refined:
    """A recipe re-fitted on statistics collected under it, and how far it moved."""

    before: FitResult
    after: FitResult
    moved_tokens: int  # Σ_l |Δ drop count| at the reference visual count
    moved_fraction: float  # moved_tokens / (2 · total drops before), 0 = unchanged


def refine(model: nn.Module, batches: Sequence, result: FitResult, dims: ModelDims, **fit_kwargs) -> Refined:
    """Collect statistics under ``result.recipe`` and fit the same budget again on them.

    Tokens the recipe dropped have no scores in the pruned pass; they count as score 0 (the walk
    drops them first, as the recipe did), and the masses C_l, S_l are those of the pruned pass, so
    α is a tolerance relative to the attention the pruned model really spends on visual tokens.
    """
    from .stats import collect_stats

    recipe = result.recipe
    pruned = collect_stats(model, batches, recipe=recipe, checkpoint=recipe.checkpoint)
    exists = np.arange(pruned.max_visual)[None, None, :] < pruned.n_visual[:, None, None]
    filled = CalibrationStats(
        cross=np.where(exists, np.nan_to_num(pruned.cross, nan=0.0), np.nan),
        self_=np.where(exists, np.nan_to_num(pruned.self_, nan=0.0), np.nan),
        n_visual=pruned.n_visual, n_system=pruned.n_system, n_text=pruned.n_text,
        cross_mass=pruned.cross_mass, self_mass=pruned.self_mass,
        sample_ids=pruned.sample_ids, checkpoint=pruned.checkpoint, calib_id=pruned.calib_id, family=pruned.family,
    )
    fit_kwargs.setdefault("convention", recipe.flops_convention or "full")
    fit_kwargs.setdefault("family", recipe.family)
    after = fit(filled, [recipe.budget], dims, **fit_kwargs)[0]
    after = replace(after, recipe=after.recipe.with_updates(metadata={**after.recipe.metadata, "fit": "refined"}))
    n_ref = int(pruned.n_visual.max())
    a, b = np.array(recipe.drop_counts(n_ref)), np.array(after.recipe.drop_counts(n_ref))
    moved = int(np.abs(a - b).sum())
    return Refined(result, after, moved, moved / max(1, 2 * int(a.sum())))
