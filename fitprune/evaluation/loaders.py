"""Read local benchmark files, in the layouts people already have, into :class:`EvalSample` lists.

Loaders read annotations only: ``EvalSample.image`` is a path (checked for existence later by the
harness), never pixels. Embedded images (MMBench base64, Parquet bytes) are either written once to
a ``cache_dir`` you pass, or kept undecoded in ``metadata`` ("image_b64" / "image_bytes").

Layouts (default file names follow LLaVA's ``playground/data/eval/<bench>`` and the official
releases; every name can be overridden by keyword):

=========  ========================================================================================
pope       ``coco_pope_{adversarial,popular,random}.json`` (JSON lines: question_id, image, text,
           label) + ``val2014/``
gqa        ``testdev_balanced_questions.json`` ({qid: {imageId, question, answer}}) + ``images/``
textvqa    ``TextVQA_0.5.1_val.json`` ({"data": [{question_id, image_id, question, answers}]})
           + ``train_images/``
vqav2      ``v2_OpenEnded_mscoco_{split}_questions.json`` + ``v2_mscoco_{split}_annotations.json``
           (optional: without it answers are empty, e.g. test-dev) + ``{split}/``
mme        ``<subtask>/`` with ``images/`` + ``questions_answers_YN/*.txt`` or images and txt side
           by side; txt lines "question<TAB>Yes" or "image.png<TAB>question<TAB>Yes"
mmbench    a TSV with index, question, hint, A..D, answer, image (base64), category
scienceqa  ``problems.json`` + ``pid_splits.json``; images ``images/<split>/<pid>/image.png``
parquet    lmms-eval / HF-datasets Parquet (a file or a folder of shards) with an image column
           (struct {bytes, path} or binary)
=========  ========================================================================================

Malformed input raises :class:`EvalDataError` naming the file and the line (or entry / row).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LOADERS", "EvalDataError", "EvalSample", "known_loaders", "load", "load_gqa", "load_mmbench",
           "load_mme", "load_parquet", "load_pope", "load_scienceqa", "load_textvqa", "load_vqav2", "register"]

PathLike = str | os.PathLike


class EvalDataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and line."""


@dataclass
class EvalSample:
    """One benchmark question. ``image`` is a file path (or None for text-only items)."""

    id: str
    image: str | None
    question: str
    answers: list[str]
    choices: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"EvalSample.id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.question, str):
            raise ValueError(f"EvalSample {self.id}: question must be a str, got {self.question!r}")
        if not isinstance(self.answers, list) or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"EvalSample {self.id}: answers must be a list of str, got {self.answers!r}")


# --- small readers with located errors ------------------------------------------------------------

def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{what}: expected file {path} does not exist (pass the right root or file name)")
    return path


def _read_json(path: Path) -> Any:
    try:
        with open(_require_file(path, "json"), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(_require_file(path, "jsonl"), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _get(obj: Any, key: str, where: str, types: type | tuple = (str,)) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise EvalDataError(f"{where}: missing field {key!r}")
    val = obj[key]
    if not isinstance(val, types):
        raise EvalDataError(f"{where}: field {key!r} should be {types}, got {val!r}")
    return val


def _write_once(data: bytes, cache_dir: Path, stem: str) -> str:
    """Write image bytes to ``cache_dir/stem.<ext>`` unless present; temp file + rename."""
    ext = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:2] == b"\xff\xd8" else ".img"
    out = cache_dir / f"{stem}{ext}"
    if not out.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    return str(out)


# --- LLaVA evaluation layouts ---------------------------------------------------------------------

POPE_CATEGORIES = ("adversarial", "popular", "random")


def load_pope(root: PathLike, categories: Sequence[str] = POPE_CATEGORIES, image_dir: PathLike | None = None,
              pattern: str = "coco_pope_{category}.json") -> list[EvalSample]:
    """POPE: one JSON-lines file per category; ids are ``"<category>/<question_id>"`` (ids repeat
    across categories). ``answers`` is ``[label]`` ("yes"/"no")."""
    root = Path(root)
    image_dir = Path(image_dir) if image_dir else root / "val2014"
    out = []
    for cat in categories:
        path = root / pattern.format(category=cat)
        for lineno, obj in _read_jsonl(path):
            where = f"{path}:{lineno}"
            qid = _get(obj, "question_id", where, (str, int))
            label = _get(obj, "label", where).strip().lower()
            if label not in ("yes", "no"):
                raise EvalDataError(f"{where}: label must be 'yes' or 'no', got {obj['label']!r}")
            question = obj.get("text", obj.get("question"))
            if not isinstance(question, str):
                raise EvalDataError(f"{where}: missing field 'text' (or 'question')")
            out.append(EvalSample(id=f"{cat}/{qid}", image=str(image_dir / _get(obj, "image", where)),
                                  question=question, answers=[label], metadata={"category": cat}))
    return out


def load_gqa(root: PathLike, file: str = "testdev_balanced_questions.json",
             image_dir: PathLike | None = None) -> list[EvalSample]:
    """GQA balanced questions: ``{qid: {imageId, question, answer, ...}}``; images ``<imageId>.jpg``."""
    root = Path(root)
    path = root / file
    image_dir = Path(image_dir) if image_dir else root / "images"
    data = _read_json(path)
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected an object {{question_id: question}}, got {type(data).__name__}")
    out = []
    for qid, q in data.items():
        where = f"{path}: entry {qid!r}"
        out.append(EvalSample(id=str(qid), image=str(image_dir / f"{_get(q, 'imageId', where)}.jpg"),
                              question=_get(q, "question", where), answers=[_get(q, "answer", where)],
                              metadata={k: q[k] for k in ("types", "fullAnswer") if k in q}))
    return out


def load_textvqa(root: PathLike, file: str = "TextVQA_0.5.1_val.json",
                 image_dir: PathLike | None = None) -> list[EvalSample]:
    """TextVQA: ``{"data": [{question_id, image_id, question, answers: [10 str]}]}``; images
    ``<image_id>.jpg`` (val images live in ``train_images/``)."""
    root = Path(root)
    path = root / file
    image_dir = Path(image_dir) if image_dir else root / "train_images"
    data = _read_json(path)
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise EvalDataError(f"{path}: expected an object with a 'data' list")
    out = []
    for i, q in enumerate(rows):
        where = f"{path}: data[{i}]"
        answers = _get(q, "answers", where, list)  # absent answers (test split) -> error, by design
        out.append(EvalSample(id=str(_get(q, "question_id", where, (str, int))),
                              image=str(image_dir / f"{_get(q, 'image_id', where)}.jpg"),
                              question=_get(q, "question", where), answers=[str(a) for a in answers],
                              metadata={"ocr_tokens": q["ocr_tokens"]} if "ocr_tokens" in q else {}))
    return out


def load_vqav2(root: PathLike, split: str = "val2014", questions: str | None = None,
               annotations: str | None = None, image_dir: PathLike | None = None) -> list[EvalSample]:
    """VQAv2 official format. Questions ``{"questions": [{question_id, image_id, question}]}``;
    annotations ``{"annotations": [{question_id, answers: [{answer}], answer_type, question_type}]}``
    (if the annotation file is absent, answers are empty: test-dev is scored by the server).
    Images ``<split>/COCO_<split>_<image_id:012d>.jpg``."""
    root = Path(root)
    qpath = root / (questions or f"v2_OpenEnded_mscoco_{split}_questions.json")
    apath = root / (annotations or f"v2_mscoco_{split}_annotations.json")
    image_dir = Path(image_dir) if image_dir else root / split
    qdata = _read_json(qpath)
    qs = qdata.get("questions") if isinstance(qdata, dict) else None
    if not isinstance(qs, list):
        raise EvalDataError(f"{qpath}: expected an object with a 'questions' list")
    anns: dict[Any, dict] = {}
    if apath.is_file() or annotations is not None:
        adata = _read_json(apath)
        alist = adata.get("annotations") if isinstance(adata, dict) else None
        if not isinstance(alist, list):
            raise EvalDataError(f"{apath}: expected an object with an 'annotations' list")
        for i, a in enumerate(alist):
            anns[_get(a, "question_id", f"{apath}: annotations[{i}]", (str, int))] = a
    out = []
    for i, q in enumerate(qs):
        where = f"{qpath}: questions[{i}]"
        qid = _get(q, "question_id", where, (str, int))
        image_id = _get(q, "image_id", where, int)
        meta: dict[str, Any] = {"image_id": image_id}
        answers: list[str] = []
        if anns:
            if qid not in anns:
                raise EvalDataError(f"{apath}: no annotation for question_id {qid} (from {where})")
            a = anns[qid]
            answers = [_get(x, "answer", f"{apath}: question_id {qid}") for x in _get(a, "answers", str(apath), list)]
            meta.update({k: a[k] for k in ("answer_type", "question_type") if k in a})
        out.append(EvalSample(id=str(qid), image=str(image_dir / f"COCO_{split}_{image_id:012d}.jpg"),
                              question=_get(q, "question", where), answers=answers, metadata=meta))
    return out


_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def _mme_image(image_dir: Path, name: str) -> str:
    # The release pairs "<stem>.txt" with "<stem>.<jpg|png>"; pick the extension present (listing
    # the folder, not opening images), else default to .jpg for the harness to report.
    if Path(name).suffix:
        return str(image_dir / name)
    for ext in _IMAGE_EXTS:
        if (image_dir / f"{name}{ext}").exists():
            return str(image_dir / f"{name}{ext}")
    return str(image_dir / f"{name}.jpg")


def load_mme(root: PathLike, subtasks: Sequence[str] | None = None) -> list[EvalSample]:
    """MME release folder (``MME_Benchmark_release_version``): one folder per subtask. Ids are
    ``"<subtask>/<txt stem>/<line>"``; ``metadata`` has ``subtask`` and ``image_name`` (the key
    :func:`~fitprune.evaluation.metrics.mme_score` groups by for acc+)."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"mme: root {root} is not a directory")
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if subtasks is None else list(subtasks)
    out = []
    for task in names:
        tdir = root / task
        if (tdir / "questions_answers_YN").is_dir():
            qa_dir, image_dir = tdir / "questions_answers_YN", tdir / "images"
        else:
            qa_dir = image_dir = tdir
        txts = sorted(qa_dir.glob("*.txt"))
        if not txts:
            raise EvalDataError(f"mme: no question .txt files in {qa_dir}")
        for txt in txts:
            with open(txt, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    cols = line.rstrip("\n").split("\t")
                    if len(cols) == 2:
                        image_name, (question, answer) = txt.stem, cols
                    elif len(cols) >= 3:
                        image_name, question, answer = cols[:3]
                    else:
                        raise EvalDataError(f"{txt}:{lineno}: expected 'question<TAB>Yes|No' "
                                            f"(or 'image<TAB>question<TAB>Yes|No'), got {line.strip()!r}")
                    if answer.strip() not in ("Yes", "No"):
                        raise EvalDataError(f"{txt}:{lineno}: answer must be 'Yes' or 'No', got {answer!r}")
                    image = _mme_image(image_dir, image_name)
                    out.append(EvalSample(id=f"{task}/{txt.stem}/{lineno}", image=image, question=question,
                                          answers=[answer.strip()],
                                          metadata={"subtask": task, "image_name": Path(image).name}))
    return out


_MMBENCH_OPTIONS = "ABCDEFGHI"


def _blank(v: str | None) -> bool:
    return v is None or v.strip() == "" or v.strip().lower() == "nan"  # pandas writes NaN as "nan"/""


def load_mmbench(root: PathLike, file: str | None = None, cache_dir: PathLike | None = None) -> list[EvalSample]:
    """MMBench TSV (``root`` is the .tsv, or a folder plus ``file``). Choices are the non-empty
    option columns A, B, ...; ``answers`` is ``[letter]`` (empty for the test split).
    Images: with ``cache_dir`` the base64 image is decoded and written once to
    ``cache_dir/<index>.<ext>``; without, ``image`` is None and ``metadata["image_b64"]`` holds it."""
    root = Path(root)
    path = root / file if file else root
    _require_file(path, "mmbench")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's 128 KiB default field limit
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"index", "question", "A", "B"} - set(reader.fieldnames or ())
            if missing:
                raise EvalDataError(f"{path}:1: header lacks columns {sorted(missing)}; got {reader.fieldnames}")
            out = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(v is None for v in row.values()):
                    raise EvalDataError(f"{where}: row has {len(row)} columns, header has {len(reader.fieldnames)}")
                choices = []
                for letter in _MMBENCH_OPTIONS:
                    if letter not in row or _blank(row[letter]):
                        break
                    choices.append(row[letter])
                answer = (row.get("answer") or "").strip()
                if answer and answer not in _MMBENCH_OPTIONS[: len(choices)]:
                    raise EvalDataError(f"{where}: answer {answer!r} is not one of the options "
                                        f"{list(_MMBENCH_OPTIONS[:len(choices)])}")
                meta = {k: row[k] for k in ("hint", "category", "l2-category", "split")
                        if k in row and not _blank(row[k])}
                image = None
                b64 = row.get("image") or ""
                if b64 and cache_dir is not None:
                    try:
                        data = base64.b64decode(b64, validate=True)
                    except (binascii.Error, ValueError):
                        raise EvalDataError(f"{where}: column 'image' is not valid base64") from None
                    image = _write_once(data, Path(cache_dir), f"mmbench_{row['index']}")
                elif b64:
                    meta["image_b64"] = b64
                out.append(EvalSample(id=row["index"], image=image, question=row["question"],
                                      answers=[answer] if answer else [], choices=choices, metadata=meta))
    finally:
        csv.field_size_limit(old_limit)
    return out


def load_scienceqa(root: PathLike, split: str = "test", image_dir: PathLike | None = None,
                   with_image_only: bool = False) -> list[EvalSample]:
    """ScienceQA: ``problems.json`` {pid: {question, choices, answer (index), hint, image, ...}} and
    ``pid_splits.json`` {split: [pid]}. Image ``images/<split>/<pid>/<image>`` or None for
    text-only problems (dropped when ``with_image_only``, as the IMG subset). ``answers`` is the letter."""
    root = Path(root)
    ppath, spath = root / "problems.json", root / "pid_splits.json"
    image_dir = Path(image_dir) if image_dir else root / "images"
    problems, splits = _read_json(ppath), _read_json(spath)
    if not isinstance(splits, dict) or split not in splits:
        known = sorted(splits) if isinstance(splits, dict) else []
        raise EvalDataError(f"{spath}: no split {split!r}; known splits: {known}")
    out = []
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise EvalDataError(f"{ppath}: pid {pid!r} listed in {spath} [{split!r}] has no problem")
        p, where = problems[pid], f"{ppath}: problem {pid!r}"
        choices = _get(p, "choices", where, list)
        ans = _get(p, "answer", where, int)
        if not 0 <= ans < len(choices):
            raise EvalDataError(f"{where}: answer index {ans} out of range for {len(choices)} choices")
        img = p.get("image")
        if with_image_only and not img:
            continue
        meta = {k: p[k] for k in ("hint", "subject", "grade", "lecture") if p.get(k)}
        meta["answer_index"] = ans
        out.append(EvalSample(id=pid, image=str(image_dir / split / pid / img) if img else None,
                              question=_get(p, "question", where), answers=["ABCDEFGHIJ"[ans]],
                              choices=[str(c) for c in choices], metadata=meta))
    return out


# --- lmms-eval style Parquet ----------------------------------------------------------------------

def load_parquet(path: PathLike, question_col: str = "question", answer_col: str = "answer",
                 image_col: str | None = "image", id_col: str | None = None,
                 cache_dir: PathLike | None = None) -> list[EvalSample]:
    """Parquet file, or a folder of ``*.parquet`` shards read in name order (HF-datasets layout).

    The image column may be a struct ``{bytes, path}`` (HF ``Image`` feature) or plain binary.
    A path-only struct gives ``image=path``; bytes go to ``cache_dir/<id>.<ext>`` when given,
    otherwise into ``metadata["image_bytes"]`` with ``image=None``. The answer column may hold a
    string or a list of strings. Ids come from ``id_col`` or the running row number.
    Other scalar columns are copied to ``metadata``.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [_require_file(path, "parquet")]
    if not files:
        raise EvalDataError(f"parquet: no *.parquet files in {path}")
    out: list[EvalSample] = []
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
            raise EvalDataError(f"{file}: not a readable Parquet file ({e})") from None
        cols = set(pf.schema_arrow.names)
        need = {question_col, answer_col} | ({image_col} if image_col else set()) | ({id_col} if id_col else set())
        if need - cols:
            raise EvalDataError(f"{file}: missing columns {sorted(need - cols)}; has {sorted(cols)} "
                                f"(pass question_col=/answer_col=/image_col=/id_col=)")
        row_no = 0
        for batch in pf.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                where = f"{file}: row {row_no}"
                row_no += 1
                sid = str(row[id_col]) if id_col else str(len(out))
                ans = row[answer_col]
                answers = [ans] if isinstance(ans, str) else ans
                if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                    raise EvalDataError(f"{where}: column {answer_col!r} must be a string or list of strings, "
                                        f"got {ans!r}")
                if not isinstance(row[question_col], str):
                    raise EvalDataError(f"{where}: column {question_col!r} must be a string, got {row[question_col]!r}")
                meta = {k: v for k, v in row.items()
                        if k not in need and isinstance(v, (str, int, float, bool, type(None)))}
                image = None
                if image_col:
                    cell = row[image_col]
                    data, ipath = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
                    if data is not None and not isinstance(data, bytes):
                        raise EvalDataError(f"{where}: column {image_col!r} must be binary or struct{{bytes, path}}")
                    if data and cache_dir is not None:
                        image = _write_once(data, Path(cache_dir), f"{file.stem}_{sid}".replace("/", "_"))
                    elif data:
                        meta["image_bytes"] = data
                    elif ipath:
                        image = ipath if os.path.isabs(ipath) else str(file.parent / ipath)
                out.append(EvalSample(id=sid, image=image, question=row[question_col], answers=answers,
                                      metadata=meta))
    return out


# --- registry -------------------------------------------------------------------------------------

LOADERS: dict[str, Callable[..., list[EvalSample]]] = {
    "gqa": load_gqa, "mmbench": load_mmbench, "mme": load_mme, "parquet": load_parquet, "pope": load_pope,
    "scienceqa": load_scienceqa, "textvqa": load_textvqa, "vqav2": load_vqav2,
}


def register(name: str, fn: Callable[..., list[EvalSample]], *, overwrite: bool = False) -> None:
    """Add a loader ``fn(root, **kw) -> list[EvalSample]`` under ``name``."""
    if not callable(fn):
        raise TypeError(f"loader for {name!r} must be callable, got {fn!r}")
    if name in LOADERS and not overwrite:
        raise ValueError(f"a loader named {name!r} is already registered; pass overwrite=True to replace it")
    LOADERS[name] = fn


def known_loaders() -> list[str]:
    return sorted(LOADERS)


def load(name: str, root: PathLike, **kw: Any) -> list[EvalSample]:
    """Load benchmark ``name`` from ``root`` (a folder, or the file for mmbench/parquet)."""
    try:
        fn = LOADERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(known_loaders())}") from None
    return fn(root, **kw)
