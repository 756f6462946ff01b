"""How much a recipe changes the model's answers: KL(unpruned ‖ pruned) of the next-token distribution.

DESIGN §2b. For a calibration set, the unpruned model's next-token log-probabilities at the last
prompt position are computed once (:func:`reference`); a recipe's divergence is then one batched
pass with the recipe applied (:func:`divergence`)::

    D(recipe) = mean over samples of  Σ_v p_unpruned(v) · (log p_unpruned(v) − log p_pruned(v))

No labels are used. With ``tokens = k > 1`` the KL is summed over the first ``k`` answer
positions: the unpruned model's greedy continuation is generated once, and the pruned model is
teacher-forced along it (same tokens, its own pruned KV cache), so position ``j`` compares the two
models' distributions after the same ``j`` answer tokens. Positions after the unpruned answer's
end-of-sequence token are not counted.

The pass also measures the FLOPs the recipe removes, from the token counts the pruned prefill
really executed (``PruneReport.flops``, ``"full"`` convention): ``1 - Σ pruned / Σ unpruned``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .adapters import get_adapter
from .apply import apply, last_report
from .flops import ModelDims, prefill_flops
from .evaluation.harness import eos_ids
from .recipe import Recipe
from .scoring import last_true

__all__ = ["Divergence", "NonFiniteDivergence", "Reference", "divergence", "reference"]


class NonFiniteDivergence(ValueError):
    """The unpruned model's own log-probabilities are NaN or infinite: no divergence can be measured."""


@dataclass(frozen=True)
class Reference:
    """The unpruned model's answer distributions on a calibration set (what every recipe is compared with).

    Per batch: ``log_probs[i]`` ``(B, k, V)`` float32 on the model's device, ``valid[i]`` ``(B, k)``
    which positions count, ``forced[i]`` ``(B, k)`` the unpruned greedy tokens (the teacher-forced
    continuation when ``k > 1``), ``flops[i]`` the unpruned prefill FLOPs per sample.
    """

    log_probs: tuple[torch.Tensor, ...]
    valid: tuple[torch.Tensor, ...]
    forced: tuple[torch.Tensor, ...]
    flops: tuple[np.ndarray, ...]
    tokens: int
    sample_ids: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class Divergence:
    """A recipe's divergence from the unpruned model on one calibration set.

    ``kl``: mean over samples (nats); ``per_sample``: each sample's KL (summed over its counted
    positions); ``flops_reduction``: measured from executed token counts; ``finite``: whether every
    sample's KL is a finite number (when not, ``kl`` is NaN or inf and must not be ranked).
    """

    kl: float
    per_sample: np.ndarray
    flops_reduction: float
    n_samples: int
    tokens: int
    flops_pruned: float = float("nan")  # Σ over samples, executed
    flops_full: float = float("nan")  # Σ over samples, unpruned

    @property
    def finite(self) -> bool:
        return bool(np.all(np.isfinite(self.per_sample)))


def _inputs(batch: Mapping) -> dict:
    return {k: v for k, v in batch.items() if k != "sample_ids"}


def _last_positions(inputs: Mapping) -> torch.Tensor:
    """Index of each sample's last real prompt token (left or right padding)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
    return last_true(mask.bool())


def _check_batches(batches: Sequence) -> list:
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches: pass at least one batch of model inputs")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise ValueError(f"batch {i} is {type(b).__name__}, not a dict of model inputs with 'input_ids'")
    return batches


def _check_tokens(tokens: int) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens = {tokens!r}: the number of answer positions to compare, a positive integer")
    return tokens


class _Force:
    """Logits processor that makes greedy generation follow the given tokens (teacher forcing)."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -math.inf)
        forced.scatter_(1, self.tokens[:, step:step + 1], 0.0)
        return forced


def _answer_logits(model: nn.Module, inputs: dict, tokens: int, forced: torch.Tensor | None):
    """Float32 logits ``(B, m, V)`` at the first ``m <= k`` answer positions and the tokens ``(B, m)``
    fed after them: greedy ones, or ``forced`` (teacher forcing). ``m < k`` when every sample ended."""
    with torch.no_grad():
        if tokens == 1:
            mask = inputs.get("attention_mask")
            if mask is None or bool(mask[:, -1].all()):  # left padding: every sample ends at the last position
                logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1:].float()
            else:
                logits = model(**inputs, use_cache=False).logits
                last = _last_positions(inputs)
                logits = logits[torch.arange(logits.shape[0], device=logits.device), last].float()[:, None]
            return logits, logits.argmax(-1)
        from transformers import LogitsProcessorList

        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise ValueError("divergence over tokens > 1 generates after the prompt and needs left-padded batches "
                             "(every sample's last prompt token at the last position); pad on the left")
        steps = tokens if forced is None else forced.shape[1]
        eos = sorted(eos_ids(model))
        pad = getattr(model.generation_config, "pad_token_id", None)
        kwargs = dict(max_new_tokens=steps, do_sample=False, num_beams=1, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=pad if pad is not None else (eos[0] if eos else 0))
        if forced is not None:
            kwargs["logits_processor"] = LogitsProcessorList([_Force(forced, inputs["input_ids"].shape[1])])
        out = model.generate(**inputs, **kwargs)
        logits = torch.stack([x.float() for x in out.logits], dim=1)
        return logits, out.sequences[:, inputs["input_ids"].shape[1]:][:, :logits.shape[1]]


def reference(model: nn.Module, batches: Sequence, *, tokens: int = 1,
              progress: Callable[[int, int], None] | None = None) -> Reference:
    """The unpruned model's answer distributions on ``batches`` (computed once, compared with every recipe).

    ``batches``: model-input dicts as a processor returns them (optional ``"sample_ids"``), left
    padded (right padding works for ``tokens = 1`` only). Raises :class:`NonFiniteDivergence` when the model's own log-probabilities are
    not finite (a broken checkpoint or dtype overflow: nothing can be compared with them).
    """
    batches, tokens = _check_batches(batches), _check_tokens(tokens)
    dims = get_adapter(model).dims(model)
    log_probs, valid, forced, flops, ids = [], [], [], [], []
    eos = sorted(eos_ids(model))
    for i, batch in enumerate(batches):
        inputs = _inputs(batch)
        logits, greedy = _answer_logits(model, inputs, tokens, None)
        if not torch.isfinite(logits).all():
            raise NonFiniteDivergence(
                f"the unpruned model's logits on calibration batch {i} are not finite (NaN or inf): no divergence "
                "can be measured against them; check the checkpoint and run in float32 or bfloat16, not float16"
            )
        lp = torch.log_softmax(logits, dim=-1)
        ok = torch.ones_like(greedy, dtype=torch.bool)
        if eos and tokens > 1:  # count positions up to and including the first end-of-sequence token
            ended = torch.isin(greedy, torch.tensor(eos, device=greedy.device)).int()
            ok = (torch.cumsum(ended, dim=1) - ended) == 0
        log_probs.append(lp)
        valid.append(ok)
        forced.append(greedy)
        flops.append(_unpruned_flops(dims, inputs))
        names = batch.get("sample_ids")
        ids += [str(n) for n in names] if names is not None else [f"{i}-{j}" for j in range(greedy.shape[0])]
        if progress is not None:
            progress(i + 1, len(batches))
    return Reference(tuple(log_probs), tuple(valid), tuple(forced), tuple(flops), tokens, tuple(ids))


def _unpruned_flops(dims: ModelDims, inputs: Mapping) -> np.ndarray:
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    n = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    return np.array([prefill_flops(dims, [int(x)] * dims.num_layers) for x in n])


def kl_rows(ref_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref ‖ softmax(logits))`` over the last axis, float32; 0 where ``p_ref`` is 0."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    p = ref_log_probs.exp()
    terms = torch.where(p > 0, p * (ref_log_probs - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def divergence(model: nn.Module, batches: Sequence, recipe: Recipe, ref: Reference) -> Divergence:
    """KL(unpruned ‖ pruned) of ``recipe`` on the calibration ``batches`` of ``ref``, and its measured FLOPs.

    One batched pass with the recipe applied (``k`` greedy steps when ``ref.tokens = k > 1``). The
    no-op recipe gives exactly 0: its logits equal the stock model's bit for bit.
    """
    batches = _check_batches(batches)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a fitprune.Recipe, got {type(recipe).__name__}")
    if not isinstance(ref, Reference):
        raise TypeError(f"ref must be the Reference of these batches (fitprune.divergence.reference), got "
                        f"{type(ref).__name__}")
    if len(batches) != len(ref.log_probs):
        raise ValueError(f"{len(batches)} batches but the reference was computed on {len(ref.log_probs)}: "
                         "pass the batches the reference was computed on")
    dims = get_adapter(model).dims(model)
    per_sample, pruned, full = [], 0.0, 0.0
    with apply(model, recipe):
        for i, batch in enumerate(batches):
            inputs = _inputs(batch)
            if inputs["input_ids"].shape[0] != ref.log_probs[i].shape[0]:
                raise ValueError(f"batch {i} has {inputs['input_ids'].shape[0]} samples, the reference "
                                 f"{ref.log_probs[i].shape[0]}: pass the batches the reference was computed on")
            logits, _ = _answer_logits(model, inputs, ref.tokens, ref.forced[i] if ref.tokens > 1 else None)
            valid = ref.valid[i]
            m = logits.shape[1]
            if valid[:, m:].any():
                raise RuntimeError(f"the pruned pass stopped after {m} of {valid.shape[1]} forced answer tokens")
            kl = torch.where(valid[:, :m], kl_rows(ref.log_probs[i][:, :m], logits), torch.zeros((), device=logits.device))
            per_sample.append(kl.sum(1).double().cpu().numpy())
            report = last_report(model)  # None when the recipe prunes no layer
            pruned += math.fsum(ref.flops[i] if report is None else report.flops(dims, "full"))
            full += math.fsum(ref.flops[i])
    values = np.concatenate(per_sample)
    return Divergence(kl=float(values.mean()), per_sample=values, flops_reduction=1.0 - pruned / full if full else 0.0,
                      n_samples=len(values), tokens=ref.tokens, flops_pruned=pruned, flops_full=full)
