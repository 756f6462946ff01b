"""Model families fitprune can prune. Importing this package registers them all."""

from . import llava, llava_next, qwen2_vl  # noqa: F401  (registration side effect)
from .base import Adapter, UnsupportedModelError, get_adapter, known_families, register

__all__ = ["Adapter", "UnsupportedModelError", "get_adapter", "known_families", "register"]
