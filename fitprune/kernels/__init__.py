"""Optional GPU kernels (Triton). Nothing here is imported by ``import fitprune``; each module
imports Triton itself, guarded, and says through ``available(tensor)`` whether it can run."""
