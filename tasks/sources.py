"""Sample sources of the sweep: what a source string means, sets of samples, their content hash.

A source is a string:

==========================  ===========================================================================
``easy-vqa:train|test``     easy-VQA questions (pip ``easy-vqa``); a set is a seeded random subset
``synthetic:train|val|test``  :mod:`fitprune.synthetic` questions (families round-robin, balanced answers)
``<loader>:<root>``         a local benchmark in the LLaVA evaluation layout, read by
                            :func:`fitprune.evaluation.load` (pope, gqa, textvqa, vqav2, mme, mmbench,
                            scienceqa, parquet); a set is a seeded random subset
``toy``                     seeded random inputs for the toy model (random weights: agreement only)
``hf:<path>``               a local ``datasets`` directory or file of *processed* inputs (input_ids,
                            pixel_values, optional attention_mask / image_sizes / id)
==========================  ===========================================================================

The first three are *question* sources: samples with answers, encoded by the model's processor and
scored by generation. ``toy`` and ``hf:`` hold model inputs and no answers: the sweep scores them by
agreement with the unpruned model's next token.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import numpy as np

__all__ = ["QUESTION_METRICS", "Source", "describe", "is_question_source", "metric_for",
           "parse", "question_samples", "question_hash"]

# metric (fitprune.evaluation.harness.score) per question source kind
QUESTION_METRICS = {"easy-vqa": "exact_match", "synthetic": "exact_match", "pope": "pope", "gqa": "exact_match",
                    "textvqa": "vqa_accuracy", "vqav2": "vqa_accuracy", "mme": "exact_match",
                    "mmbench": "multiple_choice", "scienceqa": "multiple_choice", "parquet": "exact_match"}
_SPLITS = {"easy-vqa": ("train", "test"), "synthetic": ("train", "val", "test")}
HELP = ("'easy-vqa:train|test', 'synthetic:train|val|test', '<loader>:/path' (pope, gqa, textvqa, vqav2, mme, "
        "mmbench, scienceqa, parquet), 'toy' (random inputs for the toy model) or 'hf:/path' (processed inputs)")


class Source(tuple):
    """(kind, arg): ("easy-vqa", "test"), ("pope", "/abs/root"), ("toy", None), ("hf", "/abs/path")."""

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def arg(self) -> str | None:
        return self[1]

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def parse(source: str) -> Source:
    """The source's (kind, argument); ValueError naming the accepted forms otherwise."""
    if not isinstance(source, str):
        raise ValueError(f"a sample source is a string such as 'easy-vqa:test'; got {source!r}")
    source = source.strip()
    if source == "toy":
        return Source(("toy", None))
    kind, sep, arg = source.partition(":")
    arg = arg.strip()
    if sep and arg:
        if kind in _SPLITS:
            if arg not in _SPLITS[kind]:
                raise ValueError(f"source {source!r}: {kind} has splits {', '.join(_SPLITS[kind])}")
            return Source((kind, arg))
        if kind == "hf" or kind in QUESTION_METRICS:
            return Source((kind, str(Path(arg).expanduser().resolve())))
    raise ValueError(f"sample source {source!r} is not known; use {HELP}")


def is_question_source(source: str | Source) -> bool:
    src = source if isinstance(source, Source) else parse(source)
    return src.kind in QUESTION_METRICS


def metric_for(source: str | Source) -> str:
    """The metric a benchmark is scored with ('agreement' for input-only sources)."""
    src = source if isinstance(source, Source) else parse(source)
    return QUESTION_METRICS.get(src.kind, "agreement")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def describe(n: int, seed: int, split: str, source: str) -> dict:
    """A set's description ``{"source", "split", "n", "seed", "id"}``; the id depends on those alone."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a sample set needs a positive integer sample count, got {n!r}")
    src = parse(source)
    if src.kind == "toy":
        calib_id = f"toy-{_safe(split)}-{n}-s{seed}"
    elif src.kind in _SPLITS:
        calib_id = f"{src.kind}-{src.arg}-{_safe(split)}-{n}-s{seed}"
    else:
        calib_id = f"{src.kind}-{hashlib.sha256(src.arg.encode()).hexdigest()[:12]}-{_safe(split)}-{n}-s{seed}"
    return {"source": str(src), "split": split, "n": int(n), "seed": int(seed), "id": calib_id}


def _subset(samples: list, n: int, seed: int, where: str) -> list:
    if n > len(samples):
        raise ValueError(f"{where} holds {len(samples)} samples; {n} asked for")
    order = np.random.default_rng(seed).permutation(len(samples))[:n]
    return [samples[int(i)] for i in order]


def question_samples(desc: dict, start: int = 0, end: int | None = None) -> list:
    """Samples ``start..end-1`` of a question set (EvalSample, or SyntheticSample for synthetic)."""
    src = parse(desc["source"])
    end = desc["n"] if end is None else end
    if not 0 <= start <= end <= desc["n"]:
        raise ValueError(f"sample range {start}-{end} is outside the set's {desc['n']} samples")
    if src.kind == "synthetic":
        from fitprune.synthetic import sample_at

        return [sample_at(src.arg, i, seed=desc["seed"]) for i in range(start, end)]
    if src.kind not in QUESTION_METRICS:
        raise ValueError(f"source {desc['source']!r} holds model inputs, not questions")
    return _subset(_all_questions(src), desc["n"], desc["seed"], str(src))[start:end]


@functools.lru_cache(maxsize=8)
def _all_questions(src: Source) -> tuple:
    """Every question of a benchmark source, read once per process (each shard and the hash ask again)."""
    if src.kind == "easy-vqa":
        from fitprune.evaluation.easy_vqa import load_easy_vqa

        return tuple(load_easy_vqa(src.arg))
    from fitprune.evaluation import load

    return tuple(load(src.kind, src.arg))


def _image_bytes(sample) -> bytes:
    image = getattr(sample, "image", None)
    if image is None:
        return b""
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError:
            return b"<unreadable>"  # recorded as a failed sample when evaluated
    return np.asarray(image).tobytes()


def question_hash(desc: dict) -> tuple[str, list[str]]:
    """SHA-256 over ids, questions, answers and image bytes of a question set, in order; and the ids."""
    h = hashlib.sha256()
    ids = []
    for s in question_samples(desc):
        ids.append(str(s.id))
        answers = getattr(s, "answers", None) or [getattr(s, "answer", "")]
        for part in (str(s.id), s.question, "\x1f".join(answers)):
            h.update(part.encode() + b"\0")
        h.update(_image_bytes(s))
    return h.hexdigest(), ids
