"""Selection before the language model: the visual tokens a recipe's ``input_fraction`` removes.

Pre-LLM methods (DivPrune, VisionZip, and a random control) choose which visual tokens the language
model never sees. The engine (:class:`fitprune.prune.Pruner`) asks :meth:`InputStage.select` in the
pre-hook of decoder layer 0, on the embeddings that layer receives, and then removes the tokens
exactly as a pruning layer does; survivors keep their original RoPE positions.

VisionZip needs more than the embeddings: the CLS attention and keys of the vision tower's feature
layer (taken from its query/key projections by forward hooks, whatever attention implementation
the tower runs), and its contextual tokens are merged *before the projector*, as the authors do.
It needs LLaVA-1.5's layout, where each image's patch features map one to one onto its image
tokens and the tower has a CLS token; other layouts are refused with a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from . import scoring
from .baselines import FAMILIES
from .recipe import RecipeError
from .selection import divprune_keep, visionzip_cls_attention, visionzip_select

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
    """What a recipe with ``input_fraction > 0`` removes before layer 0, per prefill."""

    def __init__(self, pruner) -> None:
        recipe = pruner.recipe
        self.pruner, self.recipe = pruner, recipe
        self.vision = VisionTap(pruner.model, pruner.adapter.family, recipe) if recipe.scoring == "visionzip" else None

    def install(self) -> list:
        return self.vision.install() if self.vision is not None else []

    def select(self, state, hidden: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(drop (B, L) bool, per-sample counts) for the first layer's input ``hidden`` (B, L, D)."""
        rule, candidates = self.recipe.scoring, state.visual & state.valid
        if rule == "visionzip":
            return self._visionzip(state)
        counts = [self.recipe.input_count(n) for n in state.alive_visual]
        if rule == "divprune":
            keep = self.pruner._k_tensor([n - c for n, c in zip(state.alive_visual, counts)], hidden.device)
            return candidates & ~divprune_keep(hidden, candidates, keep), counts
        scores = self.pruner._random_scores(tuple(candidates.shape), -1, hidden.device)
        return scoring.select_drops(scores, candidates, self.pruner._k_tensor(counts, hidden.device)), counts

    def _visionzip(self, state) -> tuple[torch.Tensor, list[int]]:
        kept, per_image = self.vision.take()
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
