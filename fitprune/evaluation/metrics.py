"""Answer scoring for the benchmarks the paper reports: VQA accuracy, POPE, MME, multiple choice.

Pure functions over strings; no model, no files. Each function names the reference implementation
whose numbers it reproduces:

* VQA normalisation and accuracy: the official VQA evaluation script,
  GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (``processPunctuation``,
  ``processDigitArticle``, ``evaluate``).
* POPE: LLaVA ``llava/eval/eval_pope.py`` (yes/no parsing and the five reported numbers).
* MME: the MME ``eval_tool/calculation.py`` (acc, acc+, score = (acc + acc+) x 100 per subtask).
* Multiple choice (MMBench, ScienceQA): option-letter extraction in the spirit of MMBench's
  ``can_infer`` heuristic stage (the GPT-matching stage is out of scope).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "exact_match",
    "extract_choice",
    "multiple_choice_accuracy",
    "normalize_answer",
    "parse_yes_no",
    "pope_metrics",
    "mme_score",
    "vqa_accuracy",
]

# --- VQA normalisation tables (official vqaEval.py, verbatim facts) --------------------------------

# Keys such as "Im" or "Id've" carry capitals in the official table; since the text is lowercased
# before the lookup they never match there either. Kept as-is so scores stay identical.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern is "(?!<=\d)(\.)(?!\d)": a typo for a look-behind, so in effect it strips
# every period not followed by a digit ("3.5" keeps its period, "5." and "a.m" lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    # vqaEval.processPunctuation: a mark touching a space (or any text with a digit,digit comma)
    # is deleted; otherwise it becomes a space ("black-white" -> "black white").
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if delete_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (32) as the *count* argument; kept for identical output.
    return _PERIOD_STRIP.sub("", out, 32)


def _process_digit_article(text: str) -> str:
    # vqaEval.processDigitArticle: lowercase, number words -> digits, drop articles, contractions.
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as the official VQA evaluation does.

    Reference: GT-Vision-Lab/VQA ``vqaEval.py``: newlines/tabs become spaces and the text is
    stripped; then ``processPunctuation`` (see ``_process_punctuation``), then
    ``processDigitArticle`` (lowercase; "none"/"zero".."ten" -> digits; drop "a", "an", "the";
    the official contraction table, e.g. "dont" -> "don't").

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("1,000")
    '1000'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0.

    Used for single-answer benchmarks (GQA, as in LLaVA's ``eval_gqa.py`` which compares
    lowercased answers); both sides go through :func:`normalize_answer`.
    """
    if isinstance(answers, str):
        answers = [answers]
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10), in [0, 1].

    Reference: ``vqaEval.py::evaluate``: for each annotator i, acc_i = min(1, #{j != i : a_j == pred} / 3);
    the score is the mean of acc_i over all annotators (the leave-one-out average).
    With 10 answers, k matching gives 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, >=4.

    Unlike the official script, which assumes the annotation answers are already normalised,
    the reference answers are normalised here too (as LLaVA/lmms-eval's TextVQA evaluator does), so
    raw TextVQA answers score correctly; for the pre-normalised VQAv2 annotations this changes nothing.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(f"vqa_accuracy needs a non-empty list of reference answers, got {answers!r}")
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    n_match = sum(g == p for g in gts)
    # Held-out annotator i leaves n_match - [gts[i] == p] matches among the others.
    total = sum(min(1.0, (n_match - (g == p)) / 3.0) for g in gts)
    return total / len(gts)


# --- POPE -----------------------------------------------------------------------------------------

def parse_yes_no(text: str) -> str:
    """Map a free-text reply to "yes" or "no" the way LLaVA's ``eval_pope.py`` does.

    Only the first sentence counts; commas are dropped; if the words contain "no" or "not" the
    answer is "no", otherwise "yes" ("Yes, there is a dog." -> "yes", "There is not a dog." -> "no").
    Unlike the reference, matching is case-insensitive ("No." and "NO" both give "no").
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_yes_no expects a str, got {type(text).__name__}: {text!r}")
    first = text.strip().split(".")[0] if "." in text else text
    words = re.findall(r"[a-z']+", first.lower())
    return "no" if ("no" in words or "not" in words) else "yes"


def _label(label: Any, where: str) -> str:
    if isinstance(label, bool):
        return "yes" if label else "no"
    if isinstance(label, str) and label.strip().lower() in ("yes", "no"):
        return label.strip().lower()
    raise ValueError(f"POPE label {where} must be 'yes'/'no' or a bool, got {label!r}")


def pope_metrics(preds: Sequence[str], labels: Sequence[str | bool]) -> dict[str, float]:
    """POPE's five numbers, with "yes" as the positive class.

    Reference: LLaVA ``llava/eval/eval_pope.py``: predictions are parsed with :func:`parse_yes_no`;
    returns ``accuracy``, ``precision``, ``recall``, ``f1`` and ``yes_ratio`` (share of "yes"
    predictions), all in [0, 1], plus the raw counts ``tp``, ``fp``, ``tn``, ``fn``.
    Precision (or F1) is 0.0 when it would divide by zero.
    """
    if len(preds) != len(labels):
        raise ValueError(f"pope_metrics got {len(preds)} predictions but {len(labels)} labels")
    if not preds:
        raise ValueError("pope_metrics needs at least one prediction")
    tp = fp = tn = fn = 0
    for i, (p, y) in enumerate(zip(preds, labels)):
        pos_pred = parse_yes_no(p) == "yes"
        pos_true = _label(y, f"#{i}") == "yes"
        tp += pos_pred and pos_true
        fp += pos_pred and not pos_true
        tn += (not pos_pred) and (not pos_true)
        fn += (not pos_pred) and pos_true
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


# --- MME ------------------------------------------------------------------------------------------

# Subtask names as the MME release folders spell them (eval_tool/calculation.py, eval_type_dict).
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _mme_parse(pred: str) -> str:
    # calculation.py::parse_pred_ans: exact yes/no, else look for yes/no in the first 4 characters.
    p = pred.strip().lower()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_score(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """MME scores from per-question results.

    Each result is a mapping with ``subtask`` (e.g. "existence"), ``image`` (the image name; MME
    asks two questions per image), ``pred`` (model text) and ``answer`` ("Yes"/"No").

    Reference: MME ``eval_tool/calculation.py``: per subtask, acc = correct questions / questions,
    acc+ = images with *all* their questions right / images, score = (acc + acc+) x 100 (max 200).
    ``perception`` sums the scores of the perception subtasks present, ``cognition`` those of the
    cognition subtasks; subtasks in neither list are reported but not summed.
    Returns ``{"subtasks": {name: {"acc", "acc_plus", "score"}}, "perception", "cognition"}``
    (acc and acc_plus in percent).
    """
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(results):
        try:
            task, image, pred, answer = r["subtask"], r["image"], r["pred"], r["answer"]
        except KeyError as e:
            raise ValueError(f"MME result #{i} lacks key {e}; each needs subtask, image, pred, answer") from None
        by_task[task][image].append(_mme_parse(pred) == str(answer).strip().lower())
    subtasks = {}
    for task, images in by_task.items():
        flat = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "subtasks": subtasks,
        "perception": sum(v["score"] for k, v in subtasks.items() if k in MME_PERCEPTION),
        "cognition": sum(v["score"] for k, v in subtasks.items() if k in MME_COGNITION),
    }


# --- Multiple choice ------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def extract_choice(pred: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-text reply picks, or None if it cannot be told.

    Tried in order: a leading letter ("B", "(B)", "B.", "B)", "B: text"); "answer is B" /
    "answer: (B)"; a lone "(B)" anywhere; the option text itself (the reply, normalised, equals
    one option, or exactly one option's text occurs in it). Only letters of existing options count.
    Mirrors the rule-based stage of MMBench's ``can_infer``/``can_infer_option``.
    """
    letters = _LETTERS[: len(choices)]
    if not letters:
        return None
    s = pred.strip()
    cls = f"[{letters}]"
    patterns = (
        # A bare leading letter needs a mark after it, so "A dog." is not read as option A.
        rf"^\(({cls})\)",                                # "(B)", "(B) cat"
        rf"^({cls})(?:[.:)]|$)",                         # "B", "B.", "B) cat", "B: cat"
        rf"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\(?({cls})\b(?!')",  # "The answer is B", "Answer: (B)"
        rf"\(({cls})\)",                                 # "... (B) ..."
    )
    for pat in patterns:
        m = re.search(pat, s)
        if m:
            return m.group(1)
    norm = normalize_answer(s)
    opts = [normalize_answer(c) for c in choices]
    for letter, o in zip(letters, opts):
        if o and norm == o:
            return letter
    hits = [letter for letter, o in zip(letters, opts) if o and re.search(rf"\b{re.escape(o)}\b", norm)]
    return hits[0] if len(hits) == 1 else None


def multiple_choice_accuracy(pred: str, choices: Sequence[str], answer: str | int) -> float:
    """1.0 if the reply picks the correct option, else 0.0 (unparseable replies count as wrong).

    ``answer`` is the correct option as a letter ("B"), a 0-based index (ScienceQA's ``answer``
    field), or the option text. See :func:`extract_choice` for how the reply is read.
    """
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TypeError(f"answer must be a letter, an index or option text, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
        gold = _LETTERS[answer]
    elif len(answer.strip()) == 1 and answer.strip().upper() in _LETTERS[: len(choices)]:
        gold = answer.strip().upper()
    elif answer in choices:
        gold = _LETTERS[list(choices).index(answer)]
    else:
        raise ValueError(f"answer {answer!r} is neither an option letter nor one of the choices {list(choices)}")
    return float(extract_choice(pred, choices) == gold)
