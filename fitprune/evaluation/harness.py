"""Batched greedy answers of a multimodal model to benchmark samples, with or without a recipe.

    preds = generate_answers(model, HFEncoder(processor), samples, recipe=recipe, batch_size=8)
    score(preds, "vqa_accuracy")   # {"value": ..., "stderr": ..., "n_failed": ...}

An *encoder* turns one (image, question) into model inputs with a batch dimension of 1; the harness
loads images, encodes each sample on its own, then collates a batch the way HF processors do for
several images (left padding; pixel tensors concatenated, ragged dims zero-padded). A sample that
cannot run (missing or corrupt image, empty question, a prompt without visual tokens, a generation
error) becomes a failed :class:`Prediction` with a short ``error``; the run goes on.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from ..adapters import get_adapter
from ..apply import apply as _apply
from ..apply import last_report
from ..flops import prefill_flops

PAPER = "fitprune-paper"  # the authors' FLOPs convention (visual tokens only), recorded next to "full"
from .metrics import exact_match, multiple_choice_accuracy, parse_yes_no, pope_metrics, vqa_accuracy

__all__ = ["METRICS", "DemoEncoder", "Encoder", "HFEncoder", "Prediction", "collate", "format_question",
           "generate_answers", "sample_answers", "score", "to_rows"]

# Per-token tensors that are left-padded like input_ids, with this fill value (None: the pad id).
SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}
METRICS = ("exact_match", "multiple_choice", "pope", "vqa_accuracy")
ROW_COLUMNS = ("sample_id", "question", "prediction", "answers", "choices", "error", "visual_tokens",
               "visual_kept", "prefill_flops", "prefill_flops_full", "prefill_flops_paper", "prefill_flops_paper_full")
_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA's eval prompt


class Encoder(Protocol):
    pad_token_id: int

    def encode(self, image: Image.Image | None, question: str) -> dict[str, torch.Tensor]: ...

    def decode(self, ids: torch.Tensor) -> str: ...


@dataclass
class Prediction:
    """One sample's answer (``prediction``) or why there is none (``error``).

    ``visual_tokens``: visual positions in the encoded prompt; ``visual_kept``: those left after the
    last decoder layer of the prefill (measured from :func:`fitprune.last_report`; equal to
    ``visual_tokens`` when no recipe is applied, None when not measured). ``prefill_flops``: the
    prefill's FLOPs from the executed per-layer token counts (``fitprune.flops``, "full" convention);
    ``prefill_flops_full``: the same prompt's FLOPs unpruned. ``prefill_flops_paper`` /
    ``prefill_flops_paper_full``: the same under the authors' convention (visual tokens only), where
    a method that selects before the language model shows what it removes from the hand-off.
    """

    sample_id: str
    question: str
    prediction: str | None
    answers: list[str]
    error: str | None = None
    choices: list[str] | None = None
    visual_tokens: int | None = None
    visual_kept: int | None = None
    prefill_flops: float | None = None
    prefill_flops_full: float | None = None
    prefill_flops_paper: float | None = None
    prefill_flops_paper_full: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.prediction is not None


# --- encoders -------------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither pad_token_id nor eos_token_id; "
                         "set tokenizer.pad_token")
    return int(pad)


class DemoEncoder:
    """:class:`fitprune.demo.DemoProcessor` as an encoder (the demo model always needs an image)."""

    def __init__(self, processor):
        self.processor = processor
        self.pad_token_id = _pad_id(processor.tokenizer)

    def encode(self, image, question: str) -> dict[str, torch.Tensor]:
        if image is None:
            raise ValueError("the demo model answers about an image; got none")
        return dict(self.processor(image, question))

    def decode(self, ids: torch.Tensor) -> str:
        return self.processor.decode(ids)


class HFEncoder:
    """A stock Hugging Face processor (``AutoProcessor``) as an encoder.

    ``prompt`` formats the question: a template with ``{question}`` (e.g. LLaVA-1.5's
    ``"USER: <image>\\n{question} ASSISTANT:"``), a callable ``question -> text``, or None to use the
    processor's chat template (one user turn: the image, then the question). ``processor_kwargs``
    go to every processor call.
    """

    def __init__(self, processor, prompt: str | Callable[[str], str] | None = None, **processor_kwargs):
        if isinstance(prompt, str) and "{question}" not in prompt:
            raise ValueError(f"prompt template {prompt!r} has no '{{question}}' placeholder")
        if prompt is None and not getattr(processor, "chat_template", None):
            raise ValueError(f"{type(processor).__name__} has no chat template; pass prompt= "
                             "(a template with '{question}' or a callable)")
        self.processor = processor
        self.prompt = prompt
        self.processor_kwargs = processor_kwargs
        self.pad_token_id = _pad_id(getattr(processor, "tokenizer", processor))

    def text(self, question: str, has_image: bool = True) -> str:
        if callable(self.prompt):
            return self.prompt(question)
        if isinstance(self.prompt, str):
            return self.prompt.replace("{question}", question)
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, image, question: str) -> dict[str, torch.Tensor]:
        kwargs = dict(text=[self.text(question, image is not None)], return_tensors="pt", **self.processor_kwargs)
        if image is not None:
            kwargs["images"] = [image]
        out = self.processor(**kwargs)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def decode(self, ids: torch.Tensor) -> str:
        return self.processor.decode(ids, skip_special_tokens=True)


def _as_encoder(encoder) -> Encoder:
    if not hasattr(encoder, "encode"):
        from ..demo.build import DemoProcessor

        if isinstance(encoder, DemoProcessor):
            return DemoEncoder(encoder)
    missing = [a for a in ("encode", "decode", "pad_token_id") if not hasattr(encoder, a)]
    if missing:
        raise TypeError(f"encoder {type(encoder).__name__} lacks {missing}; wrap a HF processor in "
                        "HFEncoder(processor) or a DemoProcessor in DemoEncoder(processor)")
    if not isinstance(encoder.pad_token_id, int):
        raise TypeError(f"encoder.pad_token_id must be an int, got {encoder.pad_token_id!r}")
    return encoder


# --- samples --------------------------------------------------------------------------------------

def sample_answers(sample) -> list[str]:
    """Reference answers: ``EvalSample.answers``, or ``[sample.answer]`` (synthetic samples)."""
    answers = getattr(sample, "answers", None)
    if answers is not None:
        return list(answers)
    answer = getattr(sample, "answer", None)
    return [answer] if isinstance(answer, str) else []


def format_question(sample) -> str:
    """The text asked: the question, and for multiple-choice samples LLaVA's evaluation layout
    (``metadata["hint"]`` first, then "A. option" lines and the answer-with-a-letter instruction)."""
    choices = getattr(sample, "choices", None)
    if not choices:
        return sample.question
    hint = (getattr(sample, "metadata", None) or {}).get("hint")
    lines = [hint] if hint else []
    lines.append(sample.question)
    lines += [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]
    lines.append(_CHOICE_INSTRUCTION)
    return "\n".join(lines)


class _Failed(Exception):
    """A sample that cannot run; the message is the Prediction's ``error``."""


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_image(src, name: str) -> Image.Image:
    try:
        with Image.open(src) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001  UnidentifiedImageError, truncated files, decompression bombs
        raise _Failed(f"corrupt image: {name}: {_short(exc)}") from None


def _load_image(sample) -> Image.Image | None:
    """A path is opened, a PIL image passed through; embedded bytes (``metadata["image_bytes"]`` /
    ``["image_b64"]``, as the MMBench and Parquet loaders leave them) are decoded."""
    try:
        image = sample.image  # may be a property that reads a file (SyntheticSample)
    except FileNotFoundError as exc:
        raise _Failed(f"missing image: {exc.filename or exc}") from None
    except Exception as exc:  # noqa: BLE001  whatever the image property raises fails this sample only
        raise _Failed(f"corrupt image: {_short(exc)}") from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise _Failed(f"missing image: {path}")
        return _open_image(path, path)
    if image is not None:
        raise _Failed(f"unsupported image type {type(image).__name__}")
    meta = getattr(sample, "metadata", None) or {}
    data = meta.get("image_bytes")
    if data is None and meta.get("image_b64"):
        try:
            data = base64.b64decode(meta["image_b64"], validate=True)
        except (binascii.Error, ValueError):
            raise _Failed("corrupt image: <embedded base64>: not valid base64") from None
    return None if data is None else _open_image(io.BytesIO(data), "<embedded>")


@dataclass
class _Item:
    index: int
    inputs: dict[str, torch.Tensor]
    visual_tokens: int


def _prepare(index, sample, model, encoder, question_fn, allow_text_only) -> _Item:
    question = getattr(sample, "question", None)
    if not isinstance(question, str) or not question.strip():
        raise _Failed("empty question")
    image = _load_image(sample)
    if image is None and not allow_text_only:
        raise _Failed("no image")
    try:
        inputs = encoder.encode(image, question_fn(sample))
    except Exception as exc:  # noqa: BLE001  a processor error fails this sample only
        raise _Failed(f"encode failed: {_short(exc)}") from None
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"{type(encoder).__name__}.encode must return input_ids of shape (1, L), "
                         f"got {getattr(ids, 'shape', ids)!r}")
    n_visual = int(get_adapter(model).visual_mask(model, ids).sum())
    if image is not None and n_visual == 0:
        raise _Failed("no visual tokens")
    return _Item(index, inputs, n_visual)


# --- batching -------------------------------------------------------------------------------------

def encode_sample(sample, encoder, model, question_fn: Callable[[Any], str] | None = None) -> dict[str, torch.Tensor]:
    """One sample's model inputs (batch dim 1), or ValueError with the reason it would fail in
    :func:`generate_answers` (for callers that need every sample, e.g. calibration)."""
    try:
        return _prepare(0, sample, model, _as_encoder(encoder), question_fn or format_question, False).inputs
    except _Failed as exc:
        raise ValueError(f"sample {getattr(sample, 'id', '?')}: {exc}") from None


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(t.shape[1:]) == tuple(shape):
        return t
    out = t.new_zeros((t.shape[0], *shape))
    out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
    return out


def collate(encodings: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch from per-sample encodings (each with batch dimension 1).

    Per-token tensors (``SEQUENCE_KEYS``: input_ids, attention_mask, mm_token_type_ids, ...) are
    left-padded to the longest prompt (input_ids with ``pad_token_id``, the others with 0). Other
    tensors are concatenated along dim 0 over the samples that have them, zero-padding any trailing
    dim that differs: LLaVA-NeXT pixel_values (1, n_tiles, 3, H, W) to the most tiles, as its
    processor does; Qwen2-VL pixel_values (n_patches, dim) rows and image_grid_thw (1, 3) rows just
    stack up. A missing attention_mask means all ones.
    """
    if not encodings:
        raise ValueError("collate needs at least one encoding")
    lengths = [int(e["input_ids"].shape[1]) for e in encodings]
    width = max(lengths)
    keys = list(dict.fromkeys(k for e in encodings for k in e))
    if "attention_mask" not in keys:
        keys.append("attention_mask")
    out = {}
    for key in keys:
        if key in SEQUENCE_KEYS:
            fill = pad_token_id if SEQUENCE_KEYS[key] is None else SEQUENCE_KEYS[key]
            dtype = encodings[0]["input_ids"].dtype
            rows = []
            for e, n in zip(encodings, lengths):
                t = e.get(key)
                if t is None:
                    if key != "attention_mask":
                        raise ValueError(f"encoding lacks {key!r} that other samples of the batch have")
                    t = torch.ones(1, n, dtype=dtype)
                if tuple(t.shape) != (1, n):
                    raise ValueError(f"{key} has shape {tuple(t.shape)}, expected (1, {n}) like input_ids")
                rows.append(torch.cat([t.new_full((1, width - n), fill), t], dim=1))
            out[key] = torch.cat(rows)
        else:
            parts = [e[key] for e in encodings if key in e]
            if any(p.dim() != parts[0].dim() for p in parts):
                raise ValueError(f"{key}: samples disagree on the number of dims {[p.dim() for p in parts]}")
            shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
            out[key] = torch.cat([_pad_to(p, shape) for p in parts])
    return out


# --- generation -----------------------------------------------------------------------------------

def eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _run_batch(model, encoder, items: list[_Item], max_new_tokens: int, eos: set[int]):
    """Greedy answers for ``items`` as one batch, and per-sample visual tokens kept (or None)."""
    batch = collate([it.inputs for it in items], encoder.pad_token_id)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    before = last_report(model)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=encoder.pad_token_id)
    sequences = getattr(out, "sequences", out)
    new = sequences[:, batch["input_ids"].shape[1]:].cpu()
    texts = []
    for row in new.tolist():
        stop = next((j for j, t in enumerate(row) if t in eos), len(row))  # finished rows are padded after EOS
        texts.append(encoder.decode(torch.tensor(row[:stop], dtype=torch.long)).strip())
    report = last_report(model)
    dims = get_adapter(model).dims(model)
    L = dims.num_layers
    full = [prefill_flops(dims, [int(n)] * L) for n in batch["attention_mask"].sum(1).tolist()]
    paper_full = [prefill_flops(dims, [it.visual_tokens] * L, convention=PAPER) for it in items]
    if report is not None and report is not before and report.mlp_visual.shape[0] == len(items):
        kept = [int(v) for v in report.mlp_visual[:, -1]]
        flops = [float(f) for f in report.flops(dims)]
        paper = [float(f) for f in report.flops(dims, PAPER)]
    else:
        handle = getattr(model, "_fitprune", None)  # fitprune.apply keeps its state here
        stock = handle is None or handle.recipe.is_noop
        kept = [it.visual_tokens if stock else None for it in items]
        flops = full if stock else [None] * len(items)
        paper = paper_full if stock else [None] * len(items)
    return texts, kept, flops, full, paper, paper_full


def generate_answers(model, encoder, samples: Iterable, *, recipe=None, batch_size: int = 8,
                     max_new_tokens: int = 8, progress: Callable[[int, int], Any] | None = None,
                     allow_text_only: bool = False,
                     question_fn: Callable[[Any], str] = format_question) -> list[Prediction]:
    """Greedy answers of ``model`` to ``samples``: one :class:`Prediction` per sample, in order.

    ``samples``: :class:`EvalSample` (image = path, None, or embedded bytes in metadata) or any object
    with ``id``, ``question`` and ``image`` (a PIL image, path or None). ``encoder``: see
    :class:`Encoder` (:class:`HFEncoder`, :class:`DemoEncoder`; a ``DemoProcessor`` is wrapped).
    ``recipe``: applied with :func:`fitprune.apply` for this call and removed afterwards, also on
    error. Samples without an image fail ("no image") unless ``allow_text_only``. A batch whose
    generation raises is retried one sample at a time, so one bad sample fails alone.
    ``progress(done, total)`` is called after each batch. ``question_fn(sample)`` gives the text
    asked (default :func:`format_question`: lists the choices of multiple-choice samples).

    Raises (before or instead of per-sample failures) for mistakes that would fail every sample:
    bad arguments, a recipe that does not fit the model, an encoder that returns no (1, L) input_ids.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    encoder = _as_encoder(encoder)
    samples = list(samples)
    preds = []
    for s in samples:
        if getattr(s, "id", None) is None:
            raise TypeError(f"sample {s!r} has no id")
        question = getattr(s, "question", None)
        choices = getattr(s, "choices", None)
        preds.append(Prediction(sample_id=str(s.id), question=question if isinstance(question, str) else "",
                                prediction=None, answers=sample_answers(s),
                                choices=list(choices) if choices else None))
    eos = eos_ids(model)
    context = _apply(model, recipe) if recipe is not None else contextlib.nullcontext()
    with context:
        for start in range(0, len(samples), batch_size):
            items = []
            for i in range(start, min(start + batch_size, len(samples))):
                try:
                    item = _prepare(i, samples[i], model, encoder, question_fn, allow_text_only)
                except _Failed as exc:
                    preds[i].error = str(exc)
                    continue
                preds[i].visual_tokens = item.visual_tokens
                items.append(item)
            _generate_into(preds, model, encoder, items, max_new_tokens, eos)
            if progress is not None:
                progress(min(start + batch_size, len(samples)), len(samples))
    return preds


def _generate_into(preds, model, encoder, items, max_new_tokens, eos) -> None:
    if not items:
        return
    try:
        texts, kept, flops, full, paper, paper_full = _run_batch(model, encoder, items, max_new_tokens, eos)
    except Exception as exc:  # noqa: BLE001  KeyboardInterrupt is not an Exception: it propagates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an OOM batch may still fit one sample at a time
        if len(items) == 1:
            preds[items[0].index].error = f"generation failed: {_short(exc)}"
            return
        for item in items:
            _generate_into(preds, model, encoder, [item], max_new_tokens, eos)
        return
    for item, text, k, f, f_full, fp, fp_full in zip(items, texts, kept, flops, full, paper, paper_full):
        pred = preds[item.index]
        pred.prediction, pred.visual_kept, pred.prefill_flops, pred.prefill_flops_full = text, k, f, f_full
        pred.prefill_flops_paper, pred.prefill_flops_paper_full = fp, fp_full


# --- results --------------------------------------------------------------------------------------

def to_rows(preds: Iterable[Prediction], **extra) -> list[dict[str, Any]]:
    """Rows for a Parquet table: ``ROW_COLUMNS`` per prediction plus ``extra`` (run_id, method, ...)."""
    clash = sorted(set(extra) & set(ROW_COLUMNS))
    if clash:
        raise ValueError(f"extra columns {clash} collide with the prediction columns {list(ROW_COLUMNS)}")
    return [{**{c: getattr(p, c) for c in ROW_COLUMNS}, "answers": list(p.answers),
             "choices": None if p.choices is None else list(p.choices), **extra}
            for p in preds]


def sample_score(p: Prediction, metric: str) -> float | None:
    """One prediction's score under ``metric`` (None for a failed sample)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    return _per_sample(p, metric) if p.ok else None


def _per_sample(p: Prediction, metric: str) -> float:
    if metric == "exact_match":
        return exact_match(p.prediction, p.answers)
    if metric == "vqa_accuracy":
        return vqa_accuracy(p.prediction, p.answers)
    if metric == "pope":
        return float(parse_yes_no(p.prediction) == p.answers[0].strip().lower())
    if not p.choices:
        raise ValueError(f"sample {p.sample_id}: multiple_choice needs choices, got none")
    return multiple_choice_accuracy(p.prediction, p.choices, p.answers[0])


def score(preds: Sequence[Prediction], metric: str) -> dict[str, Any]:
    """Mean of ``metric`` over the samples that ran, with its standard error.

    Failed samples are not scored and not hidden: ``value`` is the mean over the ``n_scored``
    samples with a prediction, ``value_all`` counts the ``n_failed`` others as wrong (0), and
    ``failures`` counts their error kinds. ``stderr`` is the standard error of the mean,
    ``sqrt(sample variance (ddof=1) / n_scored)`` as lm-evaluation-harness reports it (NaN below two
    samples). "pope" adds precision, recall, f1 and yes_ratio (:func:`pope_metrics`, over scored
    samples; labels = ``answers[0]``); "multiple_choice" reads ``choices`` and the gold ``answers[0]``.
    A scored sample without reference answers is an error (e.g. a test split without labels).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    preds = list(preds)
    scored = [p for p in preds if p.ok]
    unlabeled = [p.sample_id for p in scored if not p.answers]
    if unlabeled:
        raise ValueError(f"{len(unlabeled)} samples have no reference answers (first: {unlabeled[:3]}); "
                         "score only labelled splits")
    values = [_per_sample(p, metric) for p in scored]
    n, k = len(preds), len(values)
    mean = sum(values) / k if k else math.nan
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1) / k) if k >= 2 else math.nan
    out = {"metric": metric, "n": n, "n_scored": k, "n_failed": n - k, "value": mean, "stderr": stderr,
           "value_all": sum(values) / n if n else math.nan,
           "failures": dict(Counter((p.error or "no prediction").split(":")[0] for p in preds if not p.ok))}
    if metric == "pope":
        fields = ("precision", "recall", "f1", "yes_ratio")
        if k:
            pm = pope_metrics([p.prediction for p in scored], [p.answers[0] for p in scored])
            out.update({f: pm[f] for f in fields}, accuracy=pm["accuracy"])
        else:
            out.update({f: math.nan for f in fields}, accuracy=math.nan)
    return out
