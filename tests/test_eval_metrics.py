"""Hand-computed cases for fitprune.evaluation.metrics (official VQA / LLaVA POPE / MME rules)."""

import pytest

from fitprune.evaluation.metrics import (exact_match, extract_choice, mme_score, multiple_choice_accuracy,
                                         normalize_answer, parse_yes_no, pope_metrics, vqa_accuracy)


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),          # period stripped, number word -> digit
    ("2 dogs", "2 dogs"),
    ("1,000", "1000"),                # digit,digit comma removed
    ("3.5", "3.5"),                   # period before a digit kept
    ("yes.", "yes"),
    ("Yes", "yes"),
    ("  yes\n", "yes"),
    ("it's", "it's"),                 # apostrophe is not in the punctuation list
    ("its", "its"),                   # ... and "its" is not in the contraction table
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("A dog", "dog"),                 # articles removed
    ("the an a", ""),
    ("black-and-white", "black and white"),  # a mark not touching a space becomes a space
    ("left - right", "left right"),   # a mark touching a space is deleted
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),             # manual map stops at ten
    ("10 am", "10 am"),               # official rules do not join "10 am" and "10am"
    ("10am", "10am"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_comma_rule_deletes_other_marks_too():
    # With a digit,digit comma present, every punctuation mark is deleted rather than spaced.
    assert normalize_answer("1,000-2") == "10002"
    assert normalize_answer("a-b") == "b"  # "a b" -> article "a" dropped


def test_normalize_rejects_non_str():
    with pytest.raises(TypeError, match="str"):
        normalize_answer(None)


def test_exact_match():
    assert exact_match("Two dogs.", "2 dogs") == 1.0
    assert exact_match("The cat", ["dog", "cat"]) == 1.0
    assert exact_match("10 am", ["10am"]) == 0.0


@pytest.mark.parametrize("k, expected", [
    # k of 10 annotators said the prediction; leave-one-out mean of min(1, matches/3):
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),                 # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),           # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),                 # 0.9
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_agreement(k, expected):
    answers = ["red"] * k + ["blue"] * (10 - k)
    assert vqa_accuracy("Red.", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("two", ["2", "2", "2", "Two", "3", "3", "3", "3", "3", "3"]) == pytest.approx(1.0)


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("yes", "yes"),
    ("No.", "no"),
    ("There is no dog.", "no"),
    ("There is not a dog. But yes, a cat.", "no"),   # only the first sentence counts
    ("Yes. There is no cat.", "yes"),
    ("I see a dog", "yes"),                           # LLaVA default: anything else is yes
    ("Nope", "yes"),                                  # "nope" is not the word "no"
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_metrics_confusion_matrix():
    # tp=3, fn=1, fp=2, tn=4 -> acc 0.7, P 0.6, R 0.75, F1 2/3, yes-ratio 0.5
    preds = ["Yes"] * 3 + ["No"] * 1 + ["Yes, there is."] * 2 + ["no"] * 4
    labels = ["yes"] * 4 + ["no"] * 6
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.6)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_all_no_and_bool_labels():
    m = pope_metrics(["No", "No"], [True, False])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5


def test_pope_metrics_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics(["yes"], ["maybe"])


def _r(task, image, pred, answer):
    return {"subtask": task, "image": image, "pred": pred, "answer": answer}


def test_mme_score_acc_plus():
    results = [
        # existence: img1 both right, img2 one right -> acc 75, acc+ 50, score 125
        _r("existence", "1.jpg", "Yes", "Yes"), _r("existence", "1.jpg", "No", "No"),
        _r("existence", "2.jpg", "Yes, it is.", "Yes"), _r("existence", "2.jpg", "yes", "No"),
        # count: both images fully right -> 200
        _r("count", "3.jpg", "yes", "Yes"), _r("count", "3.jpg", "no", "No"),
        _r("count", "4.jpg", "No", "No"), _r("count", "4.jpg", "Yes", "Yes"),
        # code_reasoning (cognition): unparseable reply is wrong -> acc 50, acc+ 0, score 50
        _r("code_reasoning", "5.png", "maybe", "Yes"), _r("code_reasoning", "5.png", "No", "No"),
    ]
    s = mme_score(results)
    ex = s["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert s["subtasks"]["count"]["score"] == 200.0
    assert s["subtasks"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert s["perception"] == 325.0
    assert s["cognition"] == 50.0


def test_mme_score_missing_key():
    with pytest.raises(ValueError, match="#0 lacks key 'pred'"):
        mme_score([{"subtask": "count", "image": "a", "answer": "Yes"}])


CHOICES = ["dog", "cat", "bird", "fish"]


@pytest.mark.parametrize("pred, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) cat", "B"), ("B: cat", "B"),
    ("The answer is B.", "B"), ("Answer: (C)", "C"), ("I think (D) fits best", "D"),
    ("cat", "B"), ("Cat.", "B"), ("It is a bird", "C"),
    ("A dog.", "A"),          # read through the option text, not as letter "A"
    ("E", None),              # no fifth option
    ("dog or cat", None),     # two options mentioned: undecidable
    ("no idea", None),
])
def test_extract_choice(pred, expected):
    assert extract_choice(pred, CHOICES) == expected


def test_multiple_choice_accuracy_answer_forms():
    assert multiple_choice_accuracy("(B)", CHOICES, "B") == 1.0
    assert multiple_choice_accuracy("The answer is B", CHOICES, 1) == 1.0     # ScienceQA index
    assert multiple_choice_accuracy("B.", CHOICES, "cat") == 1.0              # option text
    assert multiple_choice_accuracy("A", CHOICES, "B") == 0.0
    assert multiple_choice_accuracy("hmm", CHOICES, "B") == 0.0
    with pytest.raises(ValueError, match="out of range"):
        multiple_choice_accuracy("A", CHOICES, 7)
    with pytest.raises(ValueError, match="neither"):
        multiple_choice_accuracy("A", CHOICES, "zebra")
