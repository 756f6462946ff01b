"""Question families over synthetic scenes, with exactly balanced answers and disjoint splits.

Each sample is built answer-first: a family draws its target answer from a shuffled cycle over its
vocabulary (so every block of len(vocab) samples holds each answer once), then builds a scene that
makes the answer true. Splits are disjoint by construction: a scene's layout hash (cells, colours,
shapes; see `Scene.layout_key`) picks its split, and a sample is redrawn until its scene belongs to
the requested split. Seed streams also differ per split and per sample index, so
`generate(split, n)` is a prefix of `generate(split, n + k)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .scene import COLORS, GRID, POSITIONS, SHAPES, Scene, fill_scene, render

MIN_OBJECTS, MAX_OBJECTS = 3, 8
MAX_COUNT = 5  # a colour has 5 shapes, so at most 5 objects share it in a scene of unique pairs
COUNTS = tuple(str(k) for k in range(MAX_COUNT + 1))
YES_NO = ("yes", "no")
# relation -> (axis attribute, sign): a is <relation> b iff sign * (a.axis - b.axis) < 0
RELATIONS: dict[str, tuple[str, int]] = {
    "to the left of": ("col", 1), "to the right of": ("col", -1), "above": ("row", 1), "below": ("row", -1),
}
# direction phrase -> (d_row, d_col) from the anchor to the asked-about neighbour
NEIGHBOURS: dict[str, tuple[int, int]] = {
    "directly above": (-1, 0), "directly below": (1, 0),
    "directly to the left of": (0, -1), "directly to the right of": (0, 1),
}
SPLITS: dict[str, tuple[int, ...]] = {"train": tuple(range(8)), "val": (8,), "test": (9,)}  # layout_hash % 10
_SPLIT_CODE = {"train": 11, "val": 22, "test": 33}
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class SyntheticSample:
    """One question about one scene; `image` renders the scene (or reads `image_path`) on each access."""

    id: str
    question: str
    answer: str
    family: str
    scene: Scene
    metadata: dict = field(default_factory=dict, compare=False)
    image_path: Path | None = None

    @property
    def image(self) -> Image.Image:
        if self.image_path is not None:
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        return render(self.scene)


Builder = Callable[[np.random.Generator, str], tuple[Scene, str, dict]]


def _n(rng: np.random.Generator, lo: int = MIN_OBJECTS) -> int:
    return int(rng.integers(max(lo, MIN_OBJECTS), MAX_OBJECTS + 1))


def _cells(rng: np.random.Generator, k: int) -> list[int]:
    return [int(c) for c in rng.choice(GRID * GRID, size=k, replace=False)]


def _count_color(rng, target):
    k, color = int(target), str(rng.choice(list(COLORS)))
    shapes = rng.choice(SHAPES, size=k, replace=False)
    fixed = dict(zip(_cells(rng, k), ((color, str(s)) for s in shapes)))
    others = [(c, s) for c in COLORS for s in SHAPES if c != color]
    return fill_scene(rng, fixed, _n(rng, k), others), f"How many {color} shapes are there?", {"color": color}


def _count_shape(rng, target):
    k, shape = int(target), str(rng.choice(SHAPES))
    colors = rng.choice(list(COLORS), size=k, replace=False)
    fixed = dict(zip(_cells(rng, k), ((str(c), shape) for c in colors)))
    others = [(c, s) for c in COLORS for s in SHAPES if s != shape]
    return fill_scene(rng, fixed, _n(rng, k), others), f"How many {shape}s are there?", {"shape": shape}


def _color_at(rng, target):
    cell = int(rng.integers(GRID * GRID))
    scene = fill_scene(rng, {cell: (target, str(rng.choice(SHAPES)))}, _n(rng))
    return scene, f"What color is the shape in the {POSITIONS[cell]}?", {"cell": cell}


def _shape_at(rng, target):
    cell = int(rng.integers(GRID * GRID))
    scene = fill_scene(rng, {cell: (str(rng.choice(list(COLORS))), target)}, _n(rng))
    return scene, f"What shape is in the {POSITIONS[cell]}?", {"cell": cell}


def _relation(rng, target):
    scene = fill_scene(rng, {}, _n(rng))
    pairs = [(rel, a, b) for rel, (axis, _) in RELATIONS.items()
             for a in scene.objects for b in scene.objects if getattr(a, axis) != getattr(b, axis)]
    rel, a, b = pairs[int(rng.integers(len(pairs)))]
    axis, sign = RELATIONS[rel]
    if (sign * (getattr(a, axis) - getattr(b, axis)) < 0) != (target == "yes"):
        a, b = b, a
    q = f"Is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?"
    return scene, q, {"relation": rel, "a": [a.color, a.shape], "b": [b.color, b.shape]}


def _neighbour_color(rng, target):
    direction = str(rng.choice(list(NEIGHBOURS)))
    dr, dc = NEIGHBOURS[direction]
    anchors = [c for c in range(GRID * GRID) if 0 <= c // GRID + dr < GRID and 0 <= c % GRID + dc < GRID]
    anchor = int(rng.choice(anchors))
    neighbour = anchor + GRID * dr + dc
    combos = [(c, s) for c in COLORS for s in SHAPES]
    a_color, a_shape = combos[int(rng.integers(len(combos)))]
    n_shape = str(rng.choice([s for s in SHAPES if (target, s) != (a_color, a_shape)]))
    scene = fill_scene(rng, {anchor: (a_color, a_shape), neighbour: (target, n_shape)}, _n(rng))
    q = f"What color is the shape {direction} the {a_color} {a_shape}?"
    return scene, q, {"direction": direction, "anchor": [a_color, a_shape]}


def _presence(rng, target):
    scene = fill_scene(rng, {}, _n(rng))
    present = {(o.color, o.shape) for o in scene.objects}
    if target == "yes":
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        color, shape, kind = o.color, o.shape, "positive"
    else:  # POPE-style negatives, hardest first: colour and shape both appear, never together
        colors, shapes = {c for c, _ in present}, {s for _, s in present}
        tiers = [("adversarial", [(c, s) for c in colors for s in shapes]),
                 ("partial", [(c, s) for c in COLORS for s in shapes] + [(c, s) for c in colors for s in SHAPES]),
                 ("random", [(c, s) for c in COLORS for s in SHAPES])]
        for kind, cands in tiers:
            cands = sorted(set(cands) - present)
            if cands:
                color, shape = cands[int(rng.integers(len(cands)))]
                break
    article = "an" if color[0] in "aeiou" else "a"
    return scene, f"Is there {article} {color} {shape} in the image?", {"query": [color, shape], "negative": kind}


FAMILIES: dict[str, tuple[tuple[str, ...], Builder]] = {
    "count_color": (COUNTS, _count_color),
    "count_shape": (COUNTS, _count_shape),
    "color_at": (tuple(COLORS), _color_at),
    "shape_at": (SHAPES, _shape_at),
    "relation": (YES_NO, _relation),
    "neighbour_color": (tuple(COLORS), _neighbour_color),
    "presence": (YES_NO, _presence),
}


def answer_vocabulary(family: str | None = None) -> tuple[str, ...]:
    """Answers a family can produce (all families' answers, sorted, when `family` is None)."""
    if family is None:
        return tuple(sorted({a for vocab, _ in FAMILIES.values() for a in vocab}))
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known families: {sorted(FAMILIES)}")
    return FAMILIES[family][0]


def split_of(scene: Scene) -> str:
    bucket = int(scene.layout_hash()[:8], 16) % 10
    return next(s for s, buckets in SPLITS.items() if bucket in buckets)


def _target(seed: int, split: str, fam_idx: int, j: int, vocab: Sequence[str]) -> str:
    block, pos = divmod(j, len(vocab))
    perm = np.random.default_rng([seed, _SPLIT_CODE[split], fam_idx, block]).permutation(len(vocab))
    return vocab[int(perm[pos])]


def _check(split: str, families: Sequence[str] | None) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    fams = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown or not fams:
        raise ValueError(f"unknown or empty families {unknown or fams}; known families: {sorted(FAMILIES)}")
    return fams


def _sample(split: str, i: int, seed: int, fams: list[str]) -> SyntheticSample:
    family = fams[i % len(fams)]
    vocab, build = FAMILIES[family]
    target = _target(seed, split, list(FAMILIES).index(family), i // len(fams), vocab)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
    for _ in range(_MAX_TRIES):
        scene, question, meta = build(rng, target)
        if split_of(scene) == split:
            break
    else:  # pragma: no cover - acceptance is >= 10% per try
        raise RuntimeError(f"no {split} scene for sample {i} after {_MAX_TRIES} tries")
    meta = {**meta, "layout_hash": scene.layout_hash(), "split": split, "seed": seed}
    return SyntheticSample(f"{split}-{seed}-{i:06d}", question, target, family, scene, meta)


def sample_at(split: str, i: int, seed: int = 0, families: Sequence[str] | None = None) -> SyntheticSample:
    """Sample `i` of `generate(split, n, seed, families)` for any n > i, built on its own (for lazy datasets)."""
    if i < 0:
        raise ValueError(f"sample index must be >= 0, got {i}")
    return _sample(split, i, seed, _check(split, families))


def generate(split: str, n: int, seed: int = 0, families: Sequence[str] | None = None) -> list[SyntheticSample]:
    """`n` samples for `split` ("train", "val" or "test"), families taken round-robin.

    Deterministic in (split, n, seed, families); scenes of different splits never share a layout.
    """
    fams = _check(split, families)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_sample(split, i, seed, fams) for i in range(n)]
