"""The scoring-rule registry: what each ``Recipe.scoring`` name does, and where in the prefill.

One :class:`ScoringRule` per name, in :data:`RULES`; :func:`get` looks one up (an unknown name is a
:class:`~fitprune.recipe.RecipeError` listing the known ones). :mod:`fitprune.recipe` takes its name
lists (``SCORINGS``, ``LAYER_SCORINGS``, ``INPUT_SCORINGS``, ``MERGE_SCORINGS``) from here, and the
engine dispatches through the rule instead of comparing names. A rule acts at one or two places:

* ``at_attention`` — in-LLM, at a pruning layer's scoring attention: (B, Lc) scores from the layer's
  post-RoPE queries and keys (an :class:`AttentionContext`); the engine drops the lowest-scoring
  candidates (``scoring.select_drops``). ``cross_self=True``: the rule reads FitPrune's c and s, which
  the engine computes once (fused kernel or torch path) and shares with a statistics probe;
* ``at_mlp`` — in-LLM, chosen on the hidden states the layer's MLP receives (DART): a (B, Lc) drop
  mask from an :class:`MlpContext`;
* ``before_llm`` — before layer 0, on the embeddings (DivPrune, VisionZip, random): (drop mask,
  per-sample counts) from an :class:`InputContext`. ``vision_tap=True``: the rule reads the vision
  tower (the input stage installs a :class:`fitprune.input_stage.VisionTap`).

The tensor work itself lives in :mod:`fitprune.scoring` and :mod:`fitprune.selection` (pure functions);
the functions here only gather their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import scoring
from .selection import dart_drops, divprune_keep

__all__ = ["RULES", "AttentionContext", "InputContext", "MlpContext", "ScoringRule", "get", "names", "register"]


@dataclass(frozen=True)
class AttentionContext:
    """A pruning layer's scoring attention, as an ``at_attention`` rule sees it (shapes as fitprune.scoring)."""

    pruner: Any  # fitprune.prune.Pruner (its cached device constants: ``pruner.constants``)
    state: Any  # fitprune.prefill_state.PrefillState
    layer: int
    query: torch.Tensor  # (B, H, Lc, hd), after RoPE
    key: torch.Tensor  # (B, Hkv, Lkv, hd), after RoPE and the cache update
    mask: torch.Tensor | None
    scaling: float
    candidates: torch.Tensor  # (B, Lc) bool: alive visual slots
    cross_self: tuple[torch.Tensor, torch.Tensor] | None  # FitPrune's (c, s), when the rule asked for them


@dataclass(frozen=True)
class MlpContext:
    """A pruning layer's MLP input, as an ``at_mlp`` rule sees it."""

    pruner: Any
    state: Any
    layer: int
    hidden: torch.Tensor  # (B, Lc, D): what the MLP receives (after the post-attention norm)
    keys: torch.Tensor  # (B, Hkv, Lc, hd): the layer's keys, kept from its attention
    counts: list[int]  # tokens each sample drops


@dataclass(frozen=True)
class InputContext:
    """Layer 0's input, as a ``before_llm`` rule sees it."""

    stage: Any  # fitprune.input_stage.InputStage (recipe, pruner, vision tap)
    state: Any
    hidden: torch.Tensor  # (B, L, D): the embeddings layer 0 receives


@dataclass(frozen=True)
class ScoringRule:
    """One scoring rule: its name, a one-line summary, and what it does where (module doc)."""

    name: str
    summary: str
    at_attention: Callable[[AttentionContext], torch.Tensor] | None = None
    at_mlp: Callable[[MlpContext], torch.Tensor] | None = None
    before_llm: Callable[[InputContext], tuple[torch.Tensor, list[int]]] | None = None
    cross_self: bool = False  # at_attention reads FitPrune's c and s
    merges: bool = False  # may merge removed tokens into kept ones (Recipe.merge_fraction)
    vision_tap: bool = False  # before_llm reads the vision tower
    capturable: bool = True  # graph_prefill may replay its in-LLM selection (no data-dependent host work)

    def __post_init__(self) -> None:
        if self.at_attention is not None and self.at_mlp is not None:
            raise ValueError(f"scoring rule {self.name!r}: choose at the attention or at the MLP, not both")
        if not (self.in_layers or self.before_llm is not None):
            raise ValueError(f"scoring rule {self.name!r} acts nowhere (no at_attention, at_mlp or before_llm)")

    @property
    def in_layers(self) -> bool:
        """May drop after decoder layers (``Recipe.drop_fractions``)."""
        return self.at_attention is not None or self.at_mlp is not None


RULES: dict[str, ScoringRule] = {}


def register(rule: ScoringRule) -> ScoringRule:
    """Add ``rule`` to the registry (a name can be registered once)."""
    if rule.name in RULES:
        raise ValueError(f"scoring rule {rule.name!r} is already registered")
    RULES[rule.name] = rule
    return rule


def get(name: str) -> ScoringRule:
    """The rule called ``name``; an unknown name raises RecipeError listing the known ones."""
    rule = RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        from .recipe import RecipeError  # recipe imports this module

        raise RecipeError(f"unknown scoring {name!r}; known scorings: {', '.join(RULES)}")
    return rule


def names(where: str | None = None) -> tuple[str, ...]:
    """Registered names, in registration order; ``where`` = ``"layers"``, ``"input"`` or ``"merge"``
    keeps those that drop after decoder layers, select before the language model, or merge."""
    keep = {None: lambda r: True, "layers": lambda r: r.in_layers, "input": lambda r: r.before_llm is not None,
            "merge": lambda r: r.merges}
    if where not in keep:
        raise ValueError(f"where must be one of {list(keep)}, got {where!r}")
    return tuple(n for n, r in RULES.items() if keep[where](r))


# ------------------------------------------------------------------------------ in-LLM rules


def _fitprune_scores(ctx: AttentionContext) -> torch.Tensor:
    cross, self_ = ctx.cross_self
    return cross * self_


def _fastv_scores(ctx: AttentionContext) -> torch.Tensor:
    """FastV's row is each sample's last real token: the last slot on a left-padded batch, earlier on a
    right-padded one (found on the device, no host sync, so graphs capture it)."""
    last_rows = scoring.last_true(ctx.state.real & ctx.state.valid)
    return scoring.fastv_scores(ctx.query, ctx.key, ctx.mask, ctx.scaling, last_rows)


def _random_scores(ctx: AttentionContext) -> torch.Tensor:
    return ctx.pruner.constants.random_scores(tuple(ctx.candidates.shape), ctx.layer, ctx.query.device)


def _dart_drops(ctx: MlpContext) -> torch.Tensor:
    """DART compares hidden states under the model's final norm. RMSNorm only rescales each token, so
    ``x / γ_post · γ_final`` has the cosine similarities of the final-normed residual stream after
    this layer's attention (DART reads it after the MLP; here the MLP already runs on survivors)."""
    pruner, state = ctx.pruner, ctx.state
    post = getattr(pruner.layers[ctx.layer], "post_attention_layernorm", None)
    g_post, g_final = getattr(post, "weight", None), getattr(pruner.lm.norm, "weight", None)
    hidden = ctx.hidden.float()
    if g_post is not None and g_final is not None and g_post.shape == g_final.shape:
        safe = torch.where(g_post.float().abs() > 1e-6, g_post.float(), 1.0)
        hidden = hidden / safe * g_final.float()
    k = pruner.constants.k_tensor(ctx.counts, ctx.hidden.device)
    return dart_drops(hidden, ctx.keys, state.visual & state.valid, state.text & state.valid, k)


# ------------------------------------------------------------------------ before the language model


def _input_counts(ctx: InputContext) -> list[int]:
    return [ctx.stage.recipe.input_count(n) for n in ctx.state.alive_visual]


def _divprune_input(ctx: InputContext) -> tuple[torch.Tensor, list[int]]:
    state, pruner = ctx.state, ctx.stage.pruner
    counts, candidates = _input_counts(ctx), state.visual & state.valid
    keep = pruner.constants.k_tensor([n - c for n, c in zip(state.alive_visual, counts)], ctx.hidden.device)
    return candidates & ~divprune_keep(ctx.hidden, candidates, keep), counts


def _random_input(ctx: InputContext) -> tuple[torch.Tensor, list[int]]:
    state, pruner = ctx.state, ctx.stage.pruner
    counts, candidates = _input_counts(ctx), state.visual & state.valid
    scores = pruner.constants.random_scores(tuple(candidates.shape), -1, ctx.hidden.device)
    return scoring.select_drops(scores, candidates, pruner.constants.k_tensor(counts, ctx.hidden.device)), counts


def _visionzip_input(ctx: InputContext) -> tuple[torch.Tensor, list[int]]:
    """The tokens the vision tap's VisionZip kept at the projector, laid onto the prompt's image tokens."""
    from .recipe import RecipeError

    state = ctx.state
    kept, per_image = ctx.stage.vision.take()
    if not any(state.alive_visual):
        return torch.zeros_like(state.visual), [0] * len(state.alive_visual)
    if kept is None:
        raise RuntimeError("visionzip: the prompt has image tokens but its images did not go through the "
                           "projector with this recipe applied (pass pixel_values with input_ids)")
    n_patch, keep = per_image
    bad = [n for n in state.alive_visual if n % n_patch]
    if bad or sum(state.alive_visual) != kept.numel():
        raise RecipeError(f"visionzip: {sum(state.alive_visual)} image tokens in the prompt do not match "
                          f"{kept.shape[0]} images of {n_patch} patches")
    drop = torch.zeros_like(state.visual)
    drop[state.visual] = ~kept.reshape(-1)  # image features fill the image tokens in row-major order
    return drop, [n // n_patch * (n_patch - keep) for n in state.alive_visual]


register(ScoringRule("fitprune", "head-max attention: drop the lowest cross × self score (FitPrune)",
                     at_attention=_fitprune_scores, cross_self=True))
register(ScoringRule("fastv", "drop the lowest head-mean attention from the last query row (FastV)",
                     at_attention=_fastv_scores))
register(ScoringRule("random", "seeded uniform scores (a control), after a decoder layer or before layer 0",
                     at_attention=_random_scores, before_llm=_random_input))
register(ScoringRule("dart", "keep the tokens least similar to key-norm pivots, on the MLP's input (DART)",
                     at_mlp=_dart_drops, capturable=False))
register(ScoringRule("divprune", "keep a max-min diverse subset of the embeddings, before layer 0 (DivPrune)",
                     before_llm=_divprune_input))
register(ScoringRule("visionzip", "dominant tokens by CLS attention plus merged contextual ones (VisionZip)",
                     before_llm=_visionzip_input, merges=True, vision_tap=True))
