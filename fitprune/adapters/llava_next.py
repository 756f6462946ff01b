"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Any-resolution tiling gives each image its own visual-token count; the processor expands the image
token once per feature *including* the newline embeddings, so ``input_ids == image_token_id`` marks
the newlines as visual too (DESIGN.md §3). Recipes are fractions of each sample's own count.
"""

from .base import Adapter, register

LLAVA_NEXT = register(
    Adapter(family="llava_next", model_classes=("LlavaNextForConditionalGeneration", "LlavaNextModel"))
)
