"""fitprune: fit visual-token pruning recipes to a compute budget and apply them to stock VLMs.

    recipe = fitprune.preset("llava-1.5-7b/60")        # or fitprune.fit(collect_stats(...), ...)
    with fitprune.apply(model, recipe):
        model.generate(...)
"""

from .adapters import UnsupportedModelError, get_adapter, known_families
from .apply import Applied, apply, last_report, remove
from .calibration import CalibrationStats
from .fingerprint import fingerprint
from .fit import FitResult, fit
from .flops import ModelDims, prefill_flops
from .graphs import PrefillGraphs, graph_prefill, prefill_graphs
from .presets import list_presets, preset
from .progressive import fit_progressive, refine
from .prune import PruneReport
from .recipe import Recipe, RecipeError
from .stats import collect_stats

__all__ = sorted([
    "Applied", "CalibrationStats", "FitResult", "ModelDims", "PruneReport", "Recipe", "RecipeError",
    "UnsupportedModelError", "apply", "collect_stats", "fingerprint", "fit", "fit_progressive", "get_adapter",
    "PrefillGraphs", "graph_prefill", "known_families", "last_report", "list_presets", "prefill_flops",
    "prefill_graphs", "preset", "refine", "remove",
])
__version__ = "0.1.0"
