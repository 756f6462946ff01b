"""Scenes of small coloured shapes on a 3x3 grid, and their renderer (numpy + PIL only).

Geometry follows LLaVA-1.5: a 336x336 image is a 24x24 grid of 14-px patches, so a 16-40 px object
covers only ~2-9 of the 576 visual tokens; pruning the wrong ones loses it. Each object sits inside
one cell of a coarse 3x3 grid (112 px cells), jittered and sized at random, so named positions
("top left") and relations ("left of", by grid column/row) are unambiguous and objects never overlap.
Within a scene every (colour, shape) pair is unique, so "the red circle" always names one object.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
GRID = 3
CELL = IMAGE_SIZE // GRID  # 112 px
MIN_SIZE, MAX_SIZE = 16, 40  # object bounding-box side, px
PAD = 4  # px between an object and its cell border

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# cell index = 3 * row + col
POSITIONS: tuple[str, ...] = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
# dark, low-saturation backgrounds: every object colour (white included) contrasts with them
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((28, 28, 32), (45, 40, 38), (30, 42, 48), (52, 52, 52))


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    cell: int  # 0..8, see POSITIONS
    cx: int  # centre, px
    cy: int
    size: int  # bounding-box side, px

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    gradient: int  # brightness change top -> bottom (0 = plain background)

    def layout_key(self) -> str:
        """Canonical (cell, colour, shape) layout, ignoring jitter, size and background."""
        return ";".join(f"{o.cell}:{o.color}:{o.shape}" for o in sorted(self.objects, key=lambda o: o.cell))

    def layout_hash(self) -> str:
        return hashlib.sha256(self.layout_key().encode()).hexdigest()

    def at(self, cell: int) -> SceneObject | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def find(self, color: str, shape: str) -> SceneObject | None:
        return next((o for o in self.objects if o.color == color and o.shape == shape), None)

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": list(self.background),
                "gradient": self.gradient}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(objects=tuple(SceneObject(**o) for o in d["objects"]),
                   background=tuple(d["background"]), gradient=int(d["gradient"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def place(rng: np.random.Generator, color: str, shape: str, cell: int) -> SceneObject:
    """Random size and jitter for an object kept fully inside its cell."""
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    r = size // 2
    lo, hi = r + PAD, CELL - (size - r) - PAD  # centre range inside the cell
    x0, y0 = (cell % GRID) * CELL, (cell // GRID) * CELL
    return SceneObject(color, shape, cell, x0 + int(rng.integers(lo, hi + 1)), y0 + int(rng.integers(lo, hi + 1)), size)


def fill_scene(rng: np.random.Generator, fixed: dict[int, tuple[str, str]], n: int,
               allowed: list[tuple[str, str]] | None = None) -> Scene:
    """A scene with `fixed` cell -> (colour, shape) plus random objects up to `n` in total.

    Extra objects take unused cells and (colour, shape) pairs from `allowed` (default: all).
    """
    combos = allowed if allowed is not None else [(c, s) for c in COLORS for s in SHAPES]
    used = set(fixed.values())
    if len(used) != len(fixed):
        raise ValueError(f"fixed objects repeat a (colour, shape) pair: {fixed}")
    free_cells = [c for c in range(GRID * GRID) if c not in fixed]
    free_combos = [cs for cs in combos if cs not in used]
    extra = n - len(fixed)
    if extra < 0 or extra > len(free_cells) or extra > len(free_combos):
        raise ValueError(f"cannot place {n} objects with {len(fixed)} fixed, {len(free_cells)} free cells "
                         f"and {len(free_combos)} free (colour, shape) pairs")
    spec = dict(fixed)
    cells = rng.choice(free_cells, size=extra, replace=False) if extra else []
    picks = rng.choice(len(free_combos), size=extra, replace=False) if extra else []
    for cell, k in zip(cells, picks):
        spec[int(cell)] = free_combos[int(k)]
    objects = tuple(place(rng, c, s, cell) for cell, (c, s) in sorted(spec.items()))
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    gradient = int(rng.choice([0, 0, 12, 20]))
    return Scene(objects, bg, gradient)


def _shape_polygon(shape: str, cx: int, cy: int, size: int) -> list[tuple[float, float]]:
    r = size / 2
    if shape == "triangle":  # apex up; the bbox centre (cx, cy) lies inside
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # 5 points, inner radius 0.45 r
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    if shape == "cross":  # plus sign, arm width 0.4 size
        w = 0.2 * size
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"no polygon for shape {shape!r}; known shapes: {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 336x336 RGB image (deterministic: same scene -> same pixels)."""
    bg = np.asarray(scene.background, dtype=np.int16)
    ramp = np.linspace(-scene.gradient / 2, scene.gradient / 2, IMAGE_SIZE).round().astype(np.int16)
    column = np.clip(bg[None, :] + ramp[:, None], 0, 255).astype(np.uint8)  # (H, 3)
    pixels = np.broadcast_to(column[:, None, :], (IMAGE_SIZE, IMAGE_SIZE, 3))
    img = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = COLORS[o.color]
        r = o.size / 2
        box = (o.cx - r, o.cy - r, o.cx + r - 1, o.cy + r - 1)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(_shape_polygon(o.shape, o.cx, o.cy, o.size), fill=fill)
    return img
