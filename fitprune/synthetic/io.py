"""Save and load synthetic samples in the LLaVA evaluation layout.

    <dir>/images/<id>.png
    <dir>/questions.jsonl   one {"question_id", "image", "text", "answer", "family", "metadata"} per line

"image" is relative to <dir>/images (LLaVA's `--image-folder`); "text" is the bare question (a loader
adds its own answer-format suffix). "metadata" carries the scene, so `load` needs no images to
recompute answers. Files are written to a temporary name and renamed; an existing PNG is kept.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from collections.abc import Iterable
from pathlib import Path

from .scene import Scene, render
from .tasks import SyntheticSample

QUESTIONS = "questions.jsonl"
IMAGES = "images"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(samples: Iterable[SyntheticSample], directory: str | os.PathLike) -> Path:
    """Write PNGs and questions.jsonl under `directory`; returns the jsonl path."""
    root = Path(directory)
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        name = f"{s.id}.png"
        png = root / IMAGES / name
        if not png.exists():
            buf = BytesIO()
            render(s.scene).save(buf, format="PNG")
            _atomic_write(png, buf.getvalue())
        meta = {**s.metadata, "scene": s.scene.to_dict()}
        lines.append(json.dumps({"question_id": s.id, "image": name, "text": s.question, "answer": s.answer,
                                 "family": s.family, "metadata": meta}, sort_keys=True))
    out = root / QUESTIONS
    _atomic_write(out, ("\n".join(lines) + "\n" if lines else "").encode())
    return out


def load(directory: str | os.PathLike) -> list[SyntheticSample]:
    """Read samples written by `save`; their `image` reads the saved PNG."""
    root = Path(directory)
    path = root / QUESTIONS
    if not path.exists():
        raise FileNotFoundError(f"no {QUESTIONS} in {root}; write one with fitprune.synthetic.save(samples, dir)")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"question_id", "image", "text", "answer", "family", "metadata"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{n} lacks keys {sorted(missing)}")
        meta = dict(row["metadata"])
        scene = Scene.from_dict(meta.pop("scene"))
        samples.append(SyntheticSample(row["question_id"], row["text"], row["answer"], row["family"], scene,
                                       meta, root / IMAGES / row["image"]))
    return samples
