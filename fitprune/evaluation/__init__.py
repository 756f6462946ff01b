"""Benchmark loading and answer scoring for evaluating pruned models (no torch; pure Python + pyarrow)."""

from .loaders import EvalDataError, EvalSample, LOADERS, known_loaders, load, register
from .metrics import (exact_match, extract_choice, mme_score, multiple_choice_accuracy, normalize_answer,
                      parse_yes_no, pope_metrics, vqa_accuracy)

__all__ = sorted([
    "EvalDataError", "EvalSample", "LOADERS", "exact_match", "extract_choice", "known_loaders", "load",
    "mme_score", "multiple_choice_accuracy", "normalize_answer", "parse_yes_no", "pope_metrics", "register",
    "vqa_accuracy",
])
