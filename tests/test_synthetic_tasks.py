"""Synthetic fine-detail VQA: determinism, disjoint splits, balance, and answers checked by an oracle."""

import hashlib
import json
import re
import time
from collections import Counter

import numpy as np
import pytest

from fitprune import synthetic as S

CELL = 112
POS = {name: i for i, name in enumerate([
    "top left", "top middle", "top right", "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right"])}


@pytest.fixture(scope="module")
def test_samples():
    return S.generate("test", 700, seed=3)


def _cell(o):  # from pixels, not the stored cell
    return 3 * (o["cy"] // CELL) + o["cx"] // CELL


def _oracle(question, scene):
    """Recompute the answer from the plain scene dict, independently of the generator."""
    objs = scene["objects"]
    find = lambda c, s: [o for o in objs if o["color"] == c and o["shape"] == s]  # noqa: E731
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objs))
    if m := re.fullmatch(r"What (color|shape) is (?:the shape )?in the (.+)\?", question):
        (hit,) = [o for o in objs if _cell(o) == POS[m[2]]]
        return hit[m[1]]
    rel = r"(to the left of|to the right of|above|below)"
    if m := re.fullmatch(rf"Is the (\w+) (\w+) {rel} the (\w+) (\w+)\?", question):
        (a,), (b,) = find(m[1], m[2]), find(m[4], m[5])
        dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
        key = {"to the left of": (dx, -1), "to the right of": (dx, 1), "above": (dy, -1), "below": (dy, 1)}
        delta, sign = key[m[3]]
        assert abs(delta) >= 2 * 4 + 16, "relation asked about objects not clearly apart"
        return "yes" if delta * sign > 0 else "no"
    if m := re.fullmatch(r"What color is the shape directly (above|below|to the left of|to the right of) "
                         r"the (\w+) (\w+)\?", question):
        (a,) = find(m[2], m[3])
        step = {"above": -3, "below": 3, "to the left of": -1, "to the right of": 1}[m[1]]
        same = "cy" if abs(step) == 1 else "cx"  # neighbour shares the anchor's row (or column)
        (hit,) = [o for o in objs if _cell(o) == _cell(a) + step and o[same] // CELL == a[same] // CELL]
        return hit["color"]
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
        return "yes" if find(m[1], m[2]) else "no"
    raise AssertionError(f"no oracle for {question!r}")


def test_every_answer_matches_oracle(test_samples):
    for s in test_samples:
        assert _oracle(s.question, s.scene.to_dict()) == s.answer, (s.id, s.question)
        assert s.answer in S.answer_vocabulary(s.family)
        assert s.answer in S.answer_vocabulary()


def test_scene_invariants(test_samples):
    for s in test_samples:
        objs = s.scene.to_dict()["objects"]
        assert 3 <= len(objs) <= 8
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        assert len({_cell(o) for o in objs}) == len(objs)
        for o in objs:
            assert 16 <= o["size"] <= 40 and _cell(o) == o["cell"]
            r = o["size"] // 2  # bbox inside the object's cell
            assert (o["cx"] - r) // CELL == (o["cx"] + r) // CELL and (o["cy"] - r) // CELL == (o["cy"] + r) // CELL


def test_render_centre_pixel_is_object_colour(test_samples):
    for s in test_samples[:200]:
        px = np.asarray(s.image)
        assert px.shape == (336, 336, 3) and px.dtype == np.uint8
        for o in s.scene.objects:
            assert tuple(px[o.cy, o.cx]) == S.COLORS[o.color], (s.id, o)
        corner = px[0, 0].astype(int)  # background is none of the object colours
        assert all(np.abs(corner - c).sum() > 60 for c in S.COLORS.values())


def test_balance(test_samples):
    by_family = {}
    for s in test_samples:
        by_family.setdefault(s.family, []).append(s.answer)
    assert set(by_family) == set(S.FAMILIES)
    for family, answers in by_family.items():
        top, n = Counter(answers).most_common(1)[0][1], len(answers)
        if set(answers) <= {"yes", "no"}:
            assert abs(answers.count("yes") - n / 2) <= 1, (family, Counter(answers))
        else:
            assert top / n <= 0.4, (family, Counter(answers))
    negatives = Counter(s.metadata["negative"] for s in test_samples if s.family == "presence" and s.answer == "no")
    assert negatives["adversarial"] >= 0.9 * sum(negatives.values())


def _digest(samples):
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.question, s.answer, s.family, s.scene.to_json()]).encode())
        h.update(s.image.tobytes())
    return h.hexdigest()


def test_deterministic_and_prefix_stable():
    a, b = S.generate("train", 60, seed=7), S.generate("train", 60, seed=7)
    assert _digest(a) == _digest(b)
    assert _digest(S.generate("train", 25, seed=7)) == _digest(a[:25])
    assert _digest(S.generate("train", 60, seed=8)) != _digest(a)


def test_saved_files_byte_identical(tmp_path):
    for d in ("x", "y"):
        S.save(S.generate("val", 30, seed=1), tmp_path / d)
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert len(files) == 31
    for f in files:
        assert (tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes(), f


def test_splits_disjoint():
    layouts = {}
    for split in S.SPLITS:
        samples = S.generate(split, 300, seed=0)
        assert all(S.split_of(s.scene) == split for s in samples)
        layouts[split] = {s.scene.layout_hash() for s in samples}
    assert not layouts["train"] & layouts["test"]
    assert not layouts["train"] & layouts["val"]
    assert not layouts["val"] & layouts["test"]


def test_save_load_roundtrip(tmp_path):
    samples = S.generate("test", 21, seed=2)
    path = S.save(samples, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {"question_id", "image", "text", "answer", "family"} <= rows[0].keys()
    assert (tmp_path / "images" / rows[0]["image"]).is_file()
    loaded = S.load(tmp_path)
    assert [(s.id, s.question, s.answer, s.family, s.scene) for s in loaded] == \
           [(s.id, s.question, s.answer, s.family, s.scene) for s in samples]
    assert np.array_equal(np.asarray(loaded[5].image), np.asarray(samples[5].image))
    assert loaded[5].metadata == samples[5].metadata


def test_family_subset_and_errors():
    assert {s.family for s in S.generate("train", 10, families=["presence"])} == {"presence"}
    with pytest.raises(ValueError, match="known families"):
        S.generate("train", 1, families=["colour"])
    with pytest.raises(ValueError, match="use one of"):
        S.generate("dev", 1)
    with pytest.raises(ValueError, match="known families"):
        S.answer_vocabulary("nope")
    with pytest.raises(FileNotFoundError):
        S.load("/nonexistent-dir")


def test_thousand_samples_fast():
    t = time.perf_counter()
    for s in S.generate("test", 1000, seed=0):
        s.image
    assert time.perf_counter() - t < 20  # ~2 s measured on a 2-core CPU


def test_sample_at_equals_the_generated_list():
    listed = S.generate("train", 30, seed=5, families=["count_color", "presence", "relation"])
    lazy = [S.sample_at("train", i, seed=5, families=["count_color", "presence", "relation"]) for i in (0, 7, 29)]
    assert [(s.id, s.question, s.answer, s.scene) for s in lazy] == \
        [(listed[i].id, listed[i].question, listed[i].answer, listed[i].scene) for i in (0, 7, 29)]
    with pytest.raises(ValueError, match="index"):
        S.sample_at("train", -1)
