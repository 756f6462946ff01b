"""What fitprune needs to know about a model family, and the registry of families.

An adapter answers three questions for one family of multimodal models:
  * where the language model's decoder layers are (``language_model(model).layers``);
  * which positions of ``input_ids`` are visual tokens (``visual_mask``);
  * the dimensions the FLOPs model needs (``dims``).

Adding a family is one small module that subclasses :class:`Adapter` and calls :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Adapter", "UnsupportedModelError", "get_adapter", "known_families", "register"]


class UnsupportedModelError(TypeError):
    """The model is not of a family fitprune has an adapter for."""


@dataclass(frozen=True)
class Adapter:
    family: str
    model_classes: tuple[str, ...]  # class names this adapter accepts (VLM top level and its inner model)
    visual_token_attrs: tuple[str, ...] = ("image_token_id",)  # config attributes naming visual token ids
    mlp_attr: str = "mlp"  # decoder-layer attribute of the MLP (rows are gathered before it)

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder (has ``.layers``, ``.norm`` and ``.config``)."""
        inner = getattr(model, "model", model)
        lm = getattr(inner, "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected a language model with decoder layers at "
                "`model.model.language_model.layers`; this transformers version lays the model out differently"
            )
        return lm

    def text_config(self, model: nn.Module):
        return self.language_model(model).config

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        ids = []
        for attr in self.visual_token_attrs:
            value = getattr(model.config, attr, None)
            if value is None and attr == "image_token_id":  # older configs call it image_token_index
                value = getattr(model.config, "image_token_index", None)
            if value is not None:
                ids.append(int(value))
        if not ids:
            raise UnsupportedModelError(
                f"{type(model).__name__}: the config names no visual token id ({', '.join(self.visual_token_attrs)})"
            )
        return tuple(ids)

    def visual_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: True at visual-token positions (image features, NeXT newlines, video frames)."""
        ids = torch.tensor(self.visual_token_ids(model), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def dims(self, model: nn.Module):
        from ..flops import ModelDims

        return ModelDims.from_config(self.text_config(model))

    def num_layers(self, model: nn.Module) -> int:
        return len(self.language_model(model).layers)


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add a family; a second adapter under the same name is a programming error."""
    if adapter.family in _REGISTRY:
        raise ValueError(f"an adapter for family {adapter.family!r} is already registered")
    _REGISTRY[adapter.family] = adapter
    return adapter


def known_families() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_family) -> Adapter:
    """The adapter for a model instance or a family name; unknown ones name the supported families."""
    if isinstance(model_or_family, str):
        try:
            return _REGISTRY[model_or_family]
        except KeyError:
            raise UnsupportedModelError(
                f"unknown model family {model_or_family!r}; supported: {', '.join(known_families())}"
            ) from None
    for adapter in _REGISTRY.values():
        if adapter.matches(model_or_family):
            return adapter
    supported = "; ".join(f"{a.family} ({', '.join(a.model_classes[:1])})" for a in _REGISTRY.values())
    raise UnsupportedModelError(
        f"{type(model_or_family).__name__} is not a supported model. Supported families: {supported}. "
        "Adding one is a small module under fitprune/adapters/ (see llava.py)."
    )
