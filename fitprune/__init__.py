"""fitprune: fit visual-token pruning recipes to a compute budget and apply them to stock VLMs."""

from .adapters import UnsupportedModelError, get_adapter, known_families
from .apply import Applied, apply, last_report, remove
from .prune import PruneReport
from .recipe import Recipe, RecipeError

__all__ = sorted([
    "Applied", "PruneReport", "Recipe", "RecipeError", "UnsupportedModelError",
    "apply", "get_adapter", "known_families", "last_report", "remove",
])
__version__ = "0.1.0"
