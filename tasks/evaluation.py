"""Evaluation of one stored recipe (or the unpruned model) on one shard of a sample set.

``evaluate_shard`` writes one ``evaluations`` row per (run, sample set, recipe, shard) and one
``predictions`` row per sample, so every standard error is computed in one place from per-sample
scores (``storage/sql/run_evaluations.sql``):

* question sources: greedy answers scored with the benchmark's metric;
* input sources (toy, hf:): agreement of the pruned model's next token with the unpruned
  model's, a 0/1 score per sample (``prediction`` and ``answers`` hold the two token ids).

FLOPs come from the executed token counts. Rows name their sample set (``eval_set``, its
content hash) and the stored recipe they evaluated.
"""

from __future__ import annotations

import time

import torch

import fitprune
from fitprune import Recipe
from fitprune.adapters import get_adapter
from fitprune.evaluation.harness import PAPER, Prediction, generate_answers, sample_score, to_rows
from fitprune.flops import ModelDims, prefill_flops
from storage import store

from . import sources
from .models import LOCK, encoder_for, load_model, normalize_spec
from .progress import ShardProgress
from .recipes import load_recipe
from .runs import versions
from .samples import load_samples

__all__ = ["AGREEMENT", "agreement_predictions", "evaluate_shard"]

AGREEMENT = "agreement"
_REFERENCE: dict[str, list[torch.Tensor]] = {}  # unpruned next tokens per (model, set, shard, batching)


def _next_tokens(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "sample_ids"}).logits[:, -1].argmax(-1)


def agreement_predictions(model, batches, recipe: Recipe | None, reference: list[torch.Tensor],
                          dims: ModelDims, progress=None) -> list[Prediction]:
    """Per sample: the pruned model's next token against the unpruned model's (``reference``), with
    the prefill FLOPs of the executed token counts and of the same prompt unpruned."""
    preds, L = [], dims.num_layers
    for batch, ref in zip(batches, reference):
        if recipe is None:
            tokens = _next_tokens(model, batch)
            lengths = [int(n) for n in batch["attention_mask"].sum(1)]
            pruned = [prefill_flops(dims, [n] * L) for n in lengths]
            visual = [int(n) for n in get_adapter(model).visual_mask(model, batch["input_ids"]).sum(1)]
            paper = [prefill_flops(dims, [v] * L, convention=PAPER) for v in visual]
            kept = visual
        else:
            with fitprune.apply(model, recipe):
                tokens = _next_tokens(model, batch)
                report = fitprune.last_report(model)
            pruned = report.flops(dims, "full").tolist()
            lengths = [int(n) for n in report.input_tokens]
            visual, kept = report.n_visual.tolist(), report.mlp_visual[:, -1].tolist()
            paper = report.flops(dims, PAPER).tolist()
        for i, sid in enumerate(batch["sample_ids"]):
            preds.append(Prediction(sample_id=str(sid), question="", prediction=str(int(tokens[i])),
                                    answers=[str(int(ref[i]))], visual_tokens=visual[i], visual_kept=kept[i],
                                    prefill_flops=float(pruned[i]),
                                    prefill_flops_full=float(prefill_flops(dims, [lengths[i]] * L)),
                                    prefill_flops_paper=float(paper[i]),
                                    prefill_flops_paper_full=float(prefill_flops(dims, [visual[i]] * L,
                                                                                 convention=PAPER))))
        if progress is not None:
            progress(len(preds))
    return preds


def _agreement_shard(spec, model, eval_set: dict, recipe, start: int, end: int, batch_size: int, dims, root,
                     progress=None):
    batches = load_samples(eval_set, batch_size, spec["device"], start, end, spec=spec, root=root)
    key = repr([sorted(spec.items()), eval_set["id"], eval_set.get("content_hash"), batch_size, start, end])
    if key not in _REFERENCE:
        _REFERENCE[key] = [_next_tokens(model, b) for b in batches]
    preds = agreement_predictions(model, batches, recipe, _REFERENCE[key], dims, progress=progress)
    return preds, [float(p.prediction == p.answers[0]) for p in preds]


def evaluate_shard(spec, info: dict, eval_set: dict, recipe_id: str, start: int, end: int, batch_size: int,
                   run_id: str, benchmark: str, root, max_new_tokens: int, label: str | None = None) -> dict:
    """Evaluate stored recipe ``recipe_id`` (``"none"``: the unpruned model) on samples ``start..end-1``.

    ``label`` names the recipe in task run names and progress lines (e.g. ``fitprune −50 %``); default
    its id. Progress within the shard: ``tasks.progress``.

    Writes its ``predictions`` rows, then its ``evaluations`` row (write id ``<run>-<set id>-<recipe>-
    <start>-<end>``, so a retried shard writes once) and returns that row.
    """
    spec = normalize_spec(spec)
    model = load_model(spec, root)
    recipe = None if recipe_id == "none" else load_recipe(recipe_id, root)
    method = "none" if recipe is None else recipe.method
    dims = ModelDims(**info["dims"])
    t0 = time.perf_counter()
    progress = ShardProgress(f"eval {benchmark} {label or recipe_id} samples {start}-{end}", end - start)
    with LOCK:  # pruning hooks are per model: one evaluation at a time per process
        if sources.is_question_source(eval_set["source"]):
            metric = sources.metric_for(eval_set["source"])
            preds = generate_answers(model, encoder_for(spec, root), sources.question_samples(eval_set, start, end),
                                     recipe=recipe, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     progress=progress)
            scores = [sample_score(p, metric) for p in preds]
        else:
            metric = AGREEMENT
            preds, scores = _agreement_shard(spec, model, eval_set, recipe, start, end, batch_size, dims, root,
                                             progress)
    wall = time.perf_counter() - t0
    shard, write_id = f"{start}-{end}", f"{run_id}-{eval_set['id']}-{recipe_id}-{start}-{end}"
    rows = to_rows(preds, run_id=run_id, recipe_id=recipe_id, checkpoint=info["checkpoint"], method=method,
                   benchmark=benchmark, shard=shard, eval_set=eval_set["id"])
    for row, s in zip(rows, scores):
        row["score"] = s
    store.write_rows("predictions", rows, root=root, write_id=write_id)
    scored = [s for s in scores if s is not None]
    ran = [p for p in preds if p.prefill_flops is not None]
    pruned, full = sum(p.prefill_flops for p in ran), sum(p.prefill_flops_full for p in ran)
    paper = [p for p in ran if p.prefill_flops_paper is not None and p.prefill_flops_paper_full is not None]
    row = dict(run_id=run_id, recipe_id=recipe_id, checkpoint=info["checkpoint"], method=method, benchmark=benchmark,
               n_samples=len(preds), n_failed=len(preds) - len(scored), metric_name=metric,
               metric=sum(scored) / len(scored) if scored else 0.0,
               flops_reduction=1.0 - pruned / full if full else 0.0,
               prefill_flops=pruned / len(ran) if ran else 0.0,
               prefill_flops_full=full / len(ran) if ran else None,
               prefill_flops_paper=sum(p.prefill_flops_paper for p in paper) / len(paper) if paper else None,
               prefill_flops_paper_full=sum(p.prefill_flops_paper_full for p in paper) / len(paper) if paper else None,
               wall_s=wall, shard=shard, versions=versions(), eval_set=eval_set["id"],
               eval_content_hash=eval_set.get("content_hash"))
    store.write_rows("evaluations", [row], root=root, write_id=write_id)
    return row
