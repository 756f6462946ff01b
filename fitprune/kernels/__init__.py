"""Optional GPU kernels (Triton). Nothing here is imported by ``import fitprune``; each module
imports Triton itself, guarded, and says through ``supported(tensor)`` whether it can run."""

# The default of the fused-scores setting (``fitprune.apply(..., fused_scores=None)``): "0" turns the fused
# kernel off. Read once per apply, never per call; defined here so reading it does not import Triton.
FUSED_SCORES_ENV = "FITPRUNE_FUSED_SCORES"
