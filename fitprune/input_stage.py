"""Selection before the language model: the visual tokens a recipe's ``input_fraction`` removes.

Pre-LLM methods (DivPrune, VisionZip, and a random control) choose which visual tokens the language
model never sees. The engine (:class:`fitprune.prune.Pruner`) calls :meth:`InputStage.drop_before_layer0` in the
pre-hook of decoder layer 0: the recipe's rule (``before_llm`` in :mod:`fitprune.rules`) chooses on
the embeddings that layer receives, and the tokens are removed exactly as a pruning layer removes
them; survivors keep their original RoPE positions. Layer 0's KV cache is then re-laid at the
prompt's full length (transformers reads the cache length from layer 0).

VisionZip needs more than the embeddings: the CLS attention and keys of the vision tower's feature
layer (taken from its query/key projections by forward hooks, whatever attention implementation
the tower runs), and its contextual tokens are merged *before the projector*, as the authors do.
It needs LLaVA-1.5's layout, where each image's patch features map one to one onto its image
tokens and the tower has a CLS token; other layouts are refused with a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from . import rules
from .baselines import FAMILIES
from .prefill_state import cache_of
from .profiling import stage
from .recipe import RecipeError
from .selection import visionzip_cls_attention, visionzip_select

__all__ = ["InputStage", "VisionTap"]


def _linear(layer: nn.Module, names: tuple[str, ...]) -> nn.Linear | None:
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names:
            return module
    return None


class VisionTap:
    """Hooks on a LLaVA model's vision tower and projector that run VisionZip's selection per prefill."""

    def __init__(self, model: nn.Module, family: str, recipe) -> None:
        config = model.config
        if family not in FAMILIES["visionzip"]:
            raise RecipeError(
                f"visionzip needs LLaVA-1.5's layout (one CLS-bearing vision tower whose patch features map one "
                f"to one onto image tokens); the {family!r} family is not supported (LLaVA-NeXT's tiles and newline "
                "tokens, Qwen2-VL's merged patches without CLS). Use divprune or dart there."
            )
        layer_index = getattr(config, "vision_feature_layer", None)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if not isinstance(layer_index, int) or layer_index == 0 or strategy != "default":
            raise RecipeError(
                f"visionzip reads the CLS attention of one vision feature layer; this model has "
                f"vision_feature_layer={layer_index!r}, vision_feature_select_strategy={strategy!r} "
                "(supported: one nonzero layer index with the 'default' strategy, which drops CLS)"
            )
        inner = getattr(model, "model", model)
        tower, projector = getattr(inner, "vision_tower", None), getattr(inner, "multi_modal_projector", None)
        vision_config = getattr(config, "vision_config", None)
        n_layers = getattr(vision_config, "num_hidden_layers", None)
        lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers] if tower else []
        if projector is None or not lists:
            raise RecipeError(f"visionzip: cannot find the vision tower's {n_layers} layers and the projector of "
                              f"{type(model).__name__}")
        layer = lists[0][n_layers + layer_index if layer_index < 0 else layer_index - 1]
        self.q = _linear(layer, ("q_proj", "query"))
        self.k = _linear(layer, ("k_proj", "key"))
        if self.q is None or self.k is None:
            raise RecipeError(f"visionzip: the vision layer {type(layer).__name__} has no q_proj/k_proj (or "
                              "query/key) projections to read its attention from")
        self.heads = int(vision_config.num_attention_heads)
        self.projector, self.recipe = projector, recipe
        self.seen: dict[str, torch.Tensor] = {}
        # (N images, P patches) bool: what the last projector call kept, until a prefill takes it. The
        # image encoder may run before the forward that prefills (transformers >= 5.2x's generate
        # encodes images first), so every projector call while the recipe is applied is zipped.
        self.keep: torch.Tensor | None = None
        self.per_image: tuple[int, int] | None = None  # (P, kept per image)

    def install(self) -> list:
        def grab(name):
            def hook(module, args, output):
                self.seen[name] = output
            return hook

        return [self.q.register_forward_hook(grab("q")), self.k.register_forward_hook(grab("k")),
                self.projector.register_forward_pre_hook(self._on_projector)]

    def take(self) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
        keep, per_image, self.keep, self.per_image = self.keep, self.per_image, None, None
        return keep, per_image

    def _on_projector(self, module, args):
        if "q" not in self.seen or "k" not in self.seen:
            raise RuntimeError("visionzip: the vision feature layer's projections did not run before the projector")
        features = args[0]  # (N, P, Dv): patch features, CLS dropped
        q, k = self.seen.pop("q"), self.seen.pop("k")  # (N, 1 + P, H·hd)
        n_img, tokens, width = q.shape
        n_patch = features.shape[1]
        if tokens != n_patch + 1:
            raise RecipeError(f"visionzip: the feature layer has {tokens} tokens, the projector receives {n_patch} "
                              "patches; expected CLS + patches (no register tokens)")
        hd = width // self.heads
        qh = q.view(n_img, tokens, self.heads, hd).transpose(1, 2)
        kh = k.view(n_img, tokens, self.heads, hd).transpose(1, 2)
        attention = visionzip_cls_attention(qh, kh, hd ** -0.5)  # (N, P)
        metric = kh.mean(1)[:, 1:]  # (N, P, hd): head-mean keys of the patches
        keep = n_patch - self.recipe.input_count(n_patch)
        contextual = self.recipe.merge_count(n_patch)
        device = features.device
        full = torch.full((n_img,), keep, device=device, dtype=torch.long)
        merged, self.keep = visionzip_select(attention, metric, features, full,
                                             torch.full_like(full, contextual))
        self.per_image = (n_patch, keep)
        return (merged.to(features.dtype), *args[1:])


class InputStage:
    """What a recipe with ``input_fraction > 0`` removes before layer 0, per prefill; the rule's
    ``before_llm`` (:mod:`fitprune.rules`) chooses, this class applies it and re-lays layer 0's cache."""

    def __init__(self, pruner) -> None:
        recipe = pruner.recipe
        self.pruner, self.recipe, self.rule = pruner, recipe, rules.get(recipe.scoring)
        self.vision = VisionTap(pruner.model, pruner.adapter.family, recipe) if self.rule.vision_tap else None

    def install(self) -> list:
        handles = self.vision.install() if self.vision is not None else []
        return handles + [self.pruner.layers[0].register_forward_hook(self._pad_first_cache)]

    def select(self, state, hidden: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(drop (B, L) bool, per-sample counts) for the first layer's input ``hidden`` (B, L, D)."""
        return self.rule.before_llm(rules.InputContext(self, state, hidden))

    def drop_before_layer0(self, state, args, kwargs):
        """Layer 0's pre-hook: remove the chosen tokens from its input before it runs."""
        in_kwargs = "hidden_states" in kwargs
        hidden = kwargs["hidden_states"] if in_kwargs else args[0]
        with stage("input_stage"):
            drop, counts = self.select(state, hidden)
        if not any(counts):
            return args, kwargs
        state.pending[-1] = (drop, counts)
        hidden = self.pruner.compact(state, -1, hidden)
        state.cache = cache_of(kwargs)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    def _pad_first_cache(self, layer, args, output):
        """After layer 0 ran on the survivors: lay its KV cache out at the prompt's full length
        (removed slots zero, masked in every decode step), so the cache length transformers reads from
        layer 0 stays the prompt length."""
        state = self.pruner.prefill
        if state is None or state.cache is None or -1 not in state.dropped_positions:
            return None
        with stage("input_stage"):
            idx, valid, _ = state.versions[1]  # the slots layer 0 ran on
            store = getattr(state.cache, "layers", None)
            first = store[0] if store else None
            if first is None or not hasattr(first, "keys"):
                raise NotImplementedError(f"fitprune cannot re-lay layer 0 of a {type(state.cache).__name__} "
                                          "for a recipe that selects before the language model")
            for name in ("keys", "values"):
                t = getattr(first, name)  # (B, Hkv, Lc, hd)
                index = idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
                full = t.new_zeros(t.shape[0], t.shape[1], state.input_len, t.shape[-1]).scatter(2, index, t)
                setattr(first, name, full)
            bsz = idx.shape[0]
            positions = torch.arange(state.input_len, device=idx.device).expand(bsz, -1)
            kept = torch.zeros(bsz, state.input_len, dtype=torch.bool, device=idx.device).scatter(1, idx, valid)
            state.decode_views[0] = (positions, kept, False)
            state.cache = None
        return None
