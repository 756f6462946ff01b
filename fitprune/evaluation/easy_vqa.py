"""easy-VQA (pip package ``easy-vqa``): 64×64 images of one coloured shape, 13 one-word answers.

4,000 train / 1,000 test images, 38,575 / 9,673 questions. Samples carry the image's path inside the
installed package, so nothing is copied.
"""

from __future__ import annotations

from .loaders import EvalDataError, EvalSample

__all__ = ["EASY_VQA_SPLITS", "load_easy_vqa"]

EASY_VQA_SPLITS = ("train", "test")


def load_easy_vqa(split: str = "test", limit: int | None = None) -> list[EvalSample]:
    """Questions of ``split`` in the package's order (``limit``: the first n), answers as one-element lists."""
    if split not in EASY_VQA_SPLITS:
        raise ValueError(f"easy-vqa has splits {EASY_VQA_SPLITS}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    try:
        import easy_vqa
    except ImportError as exc:
        raise EvalDataError("easy-vqa is not installed; run: pip install easy-vqa==1.0") from exc
    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    n = len(questions) if limit is None else min(limit, len(questions))
    return [EvalSample(id=f"easyvqa-{split}-{i:05d}", image=paths[image_ids[i]], question=questions[i],
                       answers=[answers[i]], metadata={"image_id": int(image_ids[i])})
            for i in range(n)]
