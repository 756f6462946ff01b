"""Benchmark loading and answer scoring for evaluating pruned models (no torch; pure Python + pyarrow).

The generation harness (:mod:`fitprune.evaluation.harness`, needs torch) is imported on first use
of one of its names, so loading and scoring stay light.
"""

from .loaders import EvalDataError, EvalSample, LOADERS, known_loaders, load, register
from .metrics import (exact_match, extract_choice, mme_score, multiple_choice_accuracy, normalize_answer,
                      parse_yes_no, pope_metrics, vqa_accuracy)

_HARNESS = ("DemoEncoder", "HFEncoder", "Prediction", "collate", "format_question", "generate_answers",
            "sample_answers", "score", "to_rows")


def __getattr__(name):  # PEP 562: import the torch-based harness lazily
    if name in _HARNESS:
        from . import harness

        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted([
    *_HARNESS, "EvalDataError", "EvalSample", "LOADERS", "exact_match", "extract_choice", "known_loaders", "load",
    "mme_score", "multiple_choice_accuracy", "normalize_answer", "parse_yes_no", "pope_metrics", "register",
    "vqa_accuracy",
])
