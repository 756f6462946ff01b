"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP patches → projector → image tokens in the prompt."""

from .base import Adapter, register

LLAVA = register(Adapter(family="llava", model_classes=("LlavaForConditionalGeneration", "LlavaModel")))
