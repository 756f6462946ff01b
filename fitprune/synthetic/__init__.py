"""Synthetic VQA whose answers depend on small objects, so pruning the wrong visual tokens costs accuracy.

    samples = fitprune.synthetic.generate("test", 1000, seed=0)
    fitprune.synthetic.save(samples, "data/synthetic-test")   # images/*.png + questions.jsonl

numpy + PIL only.
"""

from .io import load, save
from .scene import COLORS, POSITIONS, SHAPES, Scene, SceneObject, render
from .tasks import FAMILIES, SPLITS, SyntheticSample, answer_vocabulary, generate, sample_at, split_of

__all__ = sorted([
    "COLORS", "FAMILIES", "POSITIONS", "SHAPES", "SPLITS", "Scene", "SceneObject", "SyntheticSample",
    "answer_vocabulary", "generate", "load", "render", "sample_at", "save", "split_of",
])
