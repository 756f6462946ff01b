"""The sweep's steps as plain functions over plain data (no Prefect here).

Each step takes and returns JSON-able values — a *model spec* (``tasks.models``), a sample-set
description (``tasks.sources``), recipe JSON, result dicts — so it can run as a Prefect task
(``tasks.sweep``) or be called directly (``flows.sweep.run_sweep``, which is what ``fitprune
sweep`` runs). A model never crosses a step boundary: every step that needs one calls
``load_model(spec)``, which builds or loads it once per process.

Sample sets ``{"source": "easy-vqa:train", "n": 16, "seed": 0, "split": "calib", "id": ...,
"content_hash": ...}`` are made (and recorded in the store's ``calibration_sets``) by
``calibration_set``. Statistics and evaluation run per shard (a sample range):
``collect_stats_shard`` skips shards already stored; ``evaluate_shard`` writes one
``evaluations`` row per (run, recipe, shard) and, for question sources, one ``predictions`` row
per sample (the model's answer, or why the sample failed).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np
import torch

import fitprune
from fitprune import Recipe
from fitprune.baselines import random_recipe
from fitprune.calibration import CalibrationStats
from fitprune.fit import fit
from fitprune.flops import ModelDims, prefill_flops
from fitprune.stats import collect_stats
from storage import catalog, store

from . import sources
from .models import LOCK as _LOCK
from .models import MODEL_KINDS, describe_model, encoder_for, load_model, model_info, normalize_spec

__all__ = [
    "METHODS", "DEFAULT_METHODS", "SEARCH_SIZES", "search_config", "MODEL_KINDS", "SOURCES", "normalize_spec", "describe_model", "encoder_for", "load_model", "model_info",
    "calibration_set",
    "load_samples", "shard_ranges", "content_hash", "record_calibration_set", "calibration_stats",
    "collect_stats_shard", "collect_statistics", "evaluate_shard", "combine_shards", "fit_budgets", "method_recipes",
    "method_recipe_jsons", "recipe_id", "evaluate", "evaluate_recipe", "recipe_row", "eval_row",
    "write_results", "pareto_rows", "versions",
]

METHODS = ("fitprune", "fitprune-paper", "fastv", "pyramid", "random")
DEFAULT_METHODS = ("fitprune", "fitprune-paper", "fastv", "random")
SOURCES = sources.HELP

_REFERENCE: dict[str, list[torch.Tensor]] = {}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dims(info: dict) -> ModelDims:
    return ModelDims(**info["dims"])


def versions() -> dict:
    import transformers

    return {"fitprune": fitprune.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


# --- data ------------------------------------------------------------------------------------
#
# Sources are described in ``tasks.sources``. Question sources (easy-vqa, synthetic, benchmark
# folders) become model inputs through the model's encoder; input sources (toy, hf:) are inputs
# already. Either way ``load_samples`` returns batches ``{input_ids, attention_mask, pixel_values,
# ..., "sample_ids": [...]}``, samples ``start..end-1`` of the set in calibration order.


def calibration_set(n: int, seed: int, split: str = "calib", source: str = "easy-vqa:train", root=None,
                    record: bool = True) -> dict:
    """Describe a sample set and (``record``) record it in the store's ``calibration_sets``.

    Returns ``{"source", "split", "n", "seed", "id", "content_hash"}``. The row is written once
    per (id, content): a re-run finds it; a source whose content changed under the same id is an
    error, since statistics keyed by that id would be stale.
    """
    desc = sources.describe(n, seed, split, source)
    if record:
        desc["content_hash"] = record_calibration_set(desc, root)
    return desc


def content_hash(desc: dict, batch_size: int = 16) -> tuple[str, list[str]]:
    """SHA-256 over the set's samples in order (ids and input bytes, or ids, questions, answers and
    image bytes for question sources); and the ids."""
    if sources.is_question_source(desc["source"]):
        return sources.question_hash(desc)
    h = hashlib.sha256()
    ids: list[str] = []
    for start in range(0, desc["n"], max(batch_size, 1) * 4):
        for batch in _input_range(desc, start, min(desc["n"], start + max(batch_size, 1) * 4), batch_size):
            mask = batch.get("attention_mask")
            pixel_keys = sorted(k for k in batch if k.startswith("pixel") and torch.is_tensor(batch[k]))
            for i, sid in enumerate(batch["sample_ids"]):
                ids.append(str(sid))
                h.update(str(sid).encode() + b"\0")
                tokens = batch["input_ids"][i]
                if mask is not None:
                    tokens = tokens[mask[i].bool()]
                h.update(tokens.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
                for k in pixel_keys:
                    h.update(k.encode() + batch[k][i].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest(), ids


def record_calibration_set(desc: dict, root) -> str:
    """Write the set's ``calibration_sets`` row (idempotent) and return its content hash."""
    digest, ids = content_hash(desc)
    known = store.read_table("calibration_sets", root, filters={"calib_id": desc["id"]})
    hashes = set(known.column("content_hash").to_pylist())
    if hashes and digest not in hashes:
        raise ValueError(
            f"sample set {desc['id']} ({desc['source']}, split {desc['split']}) has changed: content hash "
            f"{digest[:16]}… but the store recorded {sorted(h[:16] for h in hashes)}; statistics under this id "
            "would be stale. Use another seed or sample count, or delete the old set's rows and statistics"
        )
    if not hashes:
        store.write_rows("calibration_sets", [dict(calib_id=desc["id"], source=desc["source"], split=desc["split"],
                                                    n_samples=desc["n"], seed=desc["seed"], content_hash=digest,
                                                    sample_ids=ids)],
                         root=root, write_id=f"{desc['id']}-{digest[:16]}")
    return digest


def _input_range(desc: dict, start: int, end: int, batch_size: int) -> list[dict]:
    src = sources.parse(desc["source"])
    if not 0 <= start <= end <= desc["n"]:
        raise ValueError(f"sample range {start}-{end} is outside the set's {desc['n']} samples")
    if src.kind == "toy":
        from flows import toy

        return toy.toy_batches(end, batch_size, desc["seed"], desc["split"], start=start)
    return _hf_range(src.arg, desc, start, end, batch_size)


def _question_range(spec, desc: dict, start: int, end: int, batch_size: int) -> list[dict]:
    """Encode question samples with the model's encoder; a sample that cannot be encoded is an error
    here (calibration needs every sample), unlike in evaluation where it is a recorded failure."""
    from fitprune.evaluation.harness import collate, encode_sample

    encoder, model = encoder_for(spec), load_model(spec)
    samples = sources.question_samples(desc, start, end)
    batches = []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        encoded = [encode_sample(s, encoder, model) for s in chunk]
        batch = collate(encoded, encoder.pad_token_id)
        batch["sample_ids"] = [str(s.id) for s in chunk]
        batches.append(batch)
    return batches


def _hf_dataset(path: str, split: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"sample source 'hf:{path}' needs the Hugging Face `datasets` package, which is not "
                         "installed here (pip install datasets); or use another source") from None
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        data = datasets.load_from_disk(str(p))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{path} has splits {sorted(data)}, not {split!r}")
            data = data[split]
    elif p.is_file():
        formats = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
        if p.suffix not in formats:
            raise ValueError(f"{path}: unknown data file type {p.suffix!r}; use one of {', '.join(formats)}")
        data = datasets.load_dataset(formats[p.suffix], data_files=str(p), split="train")
    else:
        raise ValueError(f"sample source 'hf:{path}': no such directory or file")
    missing = [c for c in ("input_ids", "pixel_values") if c not in data.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}: the 'hf:' source takes processed model inputs "
                         f"(input_ids, pixel_values; optional attention_mask, image_sizes, id); it has {data.column_names}")
    return data


def _hf_range(path: str, desc: dict, start: int, end: int, batch_size: int) -> list[dict]:
    data = _hf_dataset(path, desc["split"])
    if desc["n"] > len(data):
        raise ValueError(f"{path} holds {len(data)} samples; {desc['n']} asked for")
    order = np.random.default_rng(desc["seed"]).permutation(len(data))[: desc["n"]]  # the set, in calibration order
    rows = data.select(order[start:end].tolist()).with_format("torch")
    batches = []
    for first in range(0, end - start, batch_size):
        items = [rows[i] for i in range(first, min(end - start, first + batch_size))]
        width = max(int(it["input_ids"].shape[-1]) for it in items)
        ids, mask = torch.zeros(len(items), width, dtype=torch.long), torch.zeros(len(items), width, dtype=torch.long)
        for i, it in enumerate(items):  # left padding (the last position is every sample's last token)
            n_tok = int(it["input_ids"].shape[-1])
            ids[i, width - n_tok:] = it["input_ids"].reshape(-1)
            mask[i, width - n_tok:] = it["attention_mask"].reshape(-1) if "attention_mask" in it else 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "pixel_values": torch.stack([it["pixel_values"] for it in items]),
                 "sample_ids": [str(it["id"]) if "id" in it else f"{desc['split']}-{int(order[start + first + i])}"
                                for i, it in enumerate(items)]}
        if "image_sizes" in items[0]:
            batch["image_sizes"] = torch.stack([it["image_sizes"] for it in items])
        batches.append(batch)
    return batches


def load_samples(sample_set: dict, batch_size: int, device: str = "cpu", start: int = 0,
                 end: int | None = None, spec=None) -> list[dict]:
    """Samples ``start..end-1`` of the set (default: all) as model-input batches on ``device``.

    Question sources are encoded by ``spec``'s model (required for them)."""
    end = sample_set["n"] if end is None else end
    if sources.is_question_source(sample_set["source"]):
        if spec is None:
            raise ValueError(f"source {sample_set['source']!r} holds questions: pass the model spec to encode them")
        batches = _question_range(spec, sample_set, start, end, batch_size)
    else:
        batches = _input_range(sample_set, start, end, batch_size)
    if device != "cpu":
        batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    return batches


def shard_ranges(n: int, shard_size: int) -> list[list[int]]:
    """``[[start, end], ...]`` covering ``0..n`` in shards of ``shard_size`` samples."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    return [[s, min(n, s + shard_size)] for s in range(0, n, shard_size)]



# --- statistics ------------------------------------------------------------------------------


def calibration_stats(model, batches, checkpoint: str, calib_id: str, root) -> CalibrationStats:
    """Statistics of the calibration set: read from the store when present, else collected and written."""
    key = {"checkpoint": checkpoint, "calib_id": calib_id}
    tokens = store.read_table("stats_token", root, filters=key)
    if tokens.num_rows:
        _log(f"statistics: reusing {checkpoint}/{calib_id} from the store")
        layers = store.read_table("stats_layer", root, filters=key)
        return CalibrationStats.from_arrow(tokens, layers, checkpoint=checkpoint, calib_id=calib_id)
    with _LOCK:
        stats = collect_stats(model, batches, checkpoint=checkpoint, calib_id=calib_id)
    tokens, layers = stats.to_arrow()
    write_id = f"{checkpoint}-{calib_id}"
    store.write_rows("stats_layer", layers, root=root, write_id=write_id, partition=key)
    store.write_rows("stats_token", tokens, root=root, write_id=write_id, partition=key)  # written last: marks done
    return stats


def stats_shard_id(checkpoint: str, calib_id: str, start: int, end: int) -> str:
    return f"{checkpoint}-{calib_id}-{start}-{end}"


def stats_shard_present(checkpoint: str, calib_id: str, start: int, end: int, root) -> bool:
    """Whether the shard's token part (written last) is published, or the whole set's (older layout) is."""
    key = {"checkpoint": checkpoint, "calib_id": calib_id}
    return (store.part_exists("stats_token", stats_shard_id(checkpoint, calib_id, start, end), root, key)
            or store.part_exists("stats_token", f"{checkpoint}-{calib_id}", root, key))


def stats_present(checkpoint: str, calib_id: str, root) -> bool:
    key = {"checkpoint": checkpoint, "calib_id": calib_id}
    return store.read_table("stats_token", root, filters=key).num_rows > 0


def collect_stats_shard(spec, calib: dict, checkpoint: str, start: int, end: int, batch_size: int, root) -> dict:
    """Statistics of samples ``start..end-1`` of the set, unless the store already holds that shard.

    Writes ``stats_layer`` then ``stats_token`` (the marker of a finished shard) with write id
    ``<checkpoint>-<calib_id>-<start>-<end>``: a retried or concurrent shard writes nothing twice.
    """
    out = {"checkpoint": checkpoint, "calib_id": calib["id"], "start": start, "end": end}
    if stats_shard_present(checkpoint, calib["id"], start, end, root):
        return {**out, "reused": True, "seconds": 0.0}
    t0 = time.perf_counter()
    spec = normalize_spec(spec)
    model = load_model(spec)
    batches = load_samples(calib, batch_size, spec["device"], start, end, spec=spec)
    with _LOCK:  # statistics hooks are per model: one collection at a time per process
        stats = collect_stats(model, batches, checkpoint=checkpoint, calib_id=calib["id"])
    tokens, layers = stats.to_arrow()
    key = {"checkpoint": checkpoint, "calib_id": calib["id"]}
    write_id = stats_shard_id(checkpoint, calib["id"], start, end)
    store.write_rows("stats_layer", layers, root=root, write_id=write_id, partition=key)
    store.write_rows("stats_token", tokens, root=root, write_id=write_id, partition=key)  # written last: marks done
    return {**out, "reused": False, "seconds": time.perf_counter() - t0}


def collect_statistics(spec, calib: dict, checkpoint: str, batch_size: int, root, shard_size: int = 64) -> dict:
    """Make sure the store holds statistics for checkpoint + calibration set, shard by shard.

    Only missing shards run; says whether everything was reused.
    """
    done = [collect_stats_shard(spec, calib, checkpoint, s, e, batch_size, root)
            for s, e in shard_ranges(calib["n"], shard_size)]
    reused = all(d["reused"] for d in done)
    if reused:
        _log(f"statistics: reusing {checkpoint}/{calib['id']} from the store")
    return {"checkpoint": checkpoint, "calib_id": calib["id"], "n": calib["n"], "reused": reused}


def _read_stats(checkpoint: str, calib_id: str, root, n: int | None = None) -> CalibrationStats:
    """All shards of the set's statistics, samples in calibration order (as recorded in ``calibration_sets``)."""
    key = {"checkpoint": checkpoint, "calib_id": calib_id}
    tokens = store.read_table("stats_token", root, filters=key)
    if not tokens.num_rows:
        raise ValueError(f"no statistics in the store for {checkpoint}/{calib_id}; collect them first")
    layers = store.read_table("stats_layer", root, filters=key)
    sets = store.read_table("calibration_sets", root, filters={"calib_id": calib_id})
    if sets.num_rows:
        position = {s: i for i, s in enumerate(sets.column("sample_ids")[0].as_py())}
        samples = layers.column("sample").to_pylist()
        if all(s in position for s in samples):
            layers = layers.take(np.argsort([position[s] for s in samples], kind="stable"))
    stats = CalibrationStats.from_arrow(tokens, layers, checkpoint=checkpoint, calib_id=calib_id)
    if n is not None and len(stats.sample_ids) != n:
        raise ValueError(f"statistics for {checkpoint}/{calib_id} cover {len(stats.sample_ids)} of {n} samples; "
                         "re-run the sweep to collect the missing shards")
    return stats


# --- recipes ---------------------------------------------------------------------------------


SEARCH_SIZES = ("auto", "small", "full")


def search_config(size: str, device: str):
    """The divergence search of the ``fitprune`` method: ``small`` on a CPU, ``full`` on a GPU (``auto``)."""
    from fitprune.search import SearchConfig

    if size not in SEARCH_SIZES:
        raise ValueError(f"search size {size!r}; known: {', '.join(SEARCH_SIZES)}")
    if size == "auto":
        size = "small" if str(device).startswith("cpu") else "full"
    return SearchConfig.small() if size == "small" else SearchConfig.full()


def method_recipes(method: str, budgets, fitted: dict, searcher) -> list[Recipe]:
    """One recipe per budget for ``method``, every baseline matched to the budget on the calibration counts.

    ``fitted[b]``: the divergence search's result (``fitprune``); ``fitted[("paper", b)]``: the
    authors' statistical α-walk (``fitprune-paper``). ``random`` prunes ``fitprune``'s schedule at random.
    """
    recipes = []
    for budget in budgets:
        if method == "fitprune":
            recipe = fitted[budget].recipe
        elif method == "fitprune-paper":
            recipe = fitted[("paper", budget)].recipe.with_updates(method="fitprune-paper")
        elif method in ("fastv", "pyramid"):
            recipe = searcher.baseline(method, budget)
        elif method == "random":
            recipe = random_recipe(fitted[budget].recipe, seed=0)
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        recipes.append(recipe)
    return recipes


def fit_budgets(info: dict, stats_ref: dict, budgets, methods, convention: str, root, spec=None, calib=None,
                batch_size: int = 8, search: str = "auto") -> dict:
    """The budget grid per method: ``{method: [recipe JSON, ...]}`` (budget order).

    ``fitprune`` is the divergence search (:mod:`fitprune.search`) on the calibration set ``calib``
    (batches of the ``spec`` model; a held-out part decides), ``fitprune-paper`` the authors'
    statistical α-walk on the stored statistics, the baselines are matched to each budget on the
    calibration token counts. Every recipe carries, in its metadata, its divergence on the
    calibration set (held-out and search parts) and its measured FLOPs reduction there.
    """
    from fitprune.search import RecipeSearch

    if spec is None or calib is None:
        raise ValueError("fit_budgets needs the model spec and the calibration set: the fitprune method searches "
                         "recipes by their output divergence on the calibration samples")
    if convention != "full":
        raise ValueError(f"the sweep measures FLOPs from executed token counts ('full' convention), not {convention!r}")
    stats = _read_stats(stats_ref["checkpoint"], stats_ref["calib_id"], root, stats_ref.get("n"))
    dims = _dims(info)
    budgets = list(budgets)
    spec = normalize_spec(spec)
    model = load_model(spec)
    # at least four batches, so the search has two to search on and two to decide on
    per = max(1, min(batch_size, calib["n"] // 4))
    batches = load_samples(calib, per, spec["device"], spec=spec)
    t0 = time.perf_counter()
    with _LOCK:
        searcher = RecipeSearch(model, batches, stats, dims, config=search_config(search, spec["device"]),
                                convention=convention, family=info["family"], log=_log)
        # the authors' α-walk on the whole calibration set; also a seed of the search, so it cannot win there
        paper = fit(stats, budgets, dims, convention=convention, family=info["family"])
        fitted: dict = {("paper", b): r for b, r in zip(budgets, paper)}
        if {"fitprune", "random"} & set(methods):
            seeds = {b: [r.recipe.with_updates(method="fitprune-paper")] for b, r in zip(budgets, paper) if r.feasible}
            fitted.update({r.budget: r for r in searcher.fit(budgets, seeds=seeds)})
        _log(f"fit: {len(budgets)} budgets in {time.perf_counter() - t0:.1f}s")
        out = {}
        for m in methods:
            recipes = []
            for r in method_recipes(m, budgets, fitted, searcher):
                r = r.with_updates(checkpoint=info["checkpoint"], flops_convention=convention)
                recipes.append(r.with_updates(metadata={**r.metadata, "calibration_divergence": searcher.measure(r)}))
            out[m] = [r.to_json() for r in recipes]
    return out


def method_recipe_jsons(method: str, fitted_grid: dict) -> list[str]:
    return list(fitted_grid[method])


def recipe_id(recipe: Recipe) -> str:
    return "r-" + hashlib.sha256(recipe.to_json().encode()).hexdigest()[:16]


# --- evaluation ------------------------------------------------------------------------------


def evaluate(model, batches, recipe: Recipe | None, reference: list[torch.Tensor], dims) -> dict:
    """Next-token agreement with the unpruned model and FLOPs measured from executed token counts."""
    start = time.perf_counter()
    agree, total, flops_pruned, flops_full = 0, 0, 0.0, 0.0
    L = dims.num_layers
    for batch, ref in zip(batches, reference):
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        if recipe is None:
            with torch.no_grad():
                logits = model(**inputs).logits[:, -1]
            per_sample = [prefill_flops(dims, [int(n)] * L) for n in inputs["attention_mask"].sum(1)]
            pruned = per_sample
        else:
            with fitprune.apply(model, recipe):
                with torch.no_grad():
                    logits = model(**inputs).logits[:, -1]
                report = fitprune.last_report(model)
            pruned = report.flops(dims, "full").tolist()
            per_sample = [prefill_flops(dims, [int(n)] * L) for n in report.attn_tokens[:, 0]]
        agree += int((logits.argmax(-1) == ref).sum())
        total += len(ref)
        flops_pruned += sum(pruned)
        flops_full += sum(per_sample)
    return {
        "metric": agree / total,
        "n_samples": total,
        "flops_reduction": 1.0 - flops_pruned / flops_full,
        "prefill_flops": flops_pruned / total,
        "wall_s": time.perf_counter() - start,
    }


def reference_tokens(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**{k: v for k, v in b.items() if k != "sample_ids"}).logits[:, -1].argmax(-1) for b in batches]


def evaluate_recipe(spec, info: dict, eval_set: dict, recipe_json: str | None, batch_size: int) -> dict:
    """Evaluate one recipe (``None``: the unpruned model) on the evaluation set; a result dict."""
    spec = normalize_spec(spec)
    model = load_model(spec)
    if sources.is_question_source(eval_set["source"]):
        recipe = None if recipe_json is None else Recipe.from_dict(json.loads(recipe_json))
        with _LOCK:
            return evaluate_questions(spec, model, eval_set, recipe, 0, eval_set["n"], batch_size)[0]
    batches = load_samples(eval_set, batch_size, spec["device"])
    key = _key([spec, eval_set, batch_size])
    with _LOCK:  # pruning hooks are per model: one evaluation at a time per process
        if key not in _REFERENCE:
            _REFERENCE[key] = reference_tokens(model, batches)
        recipe = None if recipe_json is None else Recipe.from_dict(json.loads(recipe_json))
        return evaluate(model, batches, recipe, _REFERENCE[key], _dims(info))


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def evaluate_questions(spec, model, eval_set: dict, recipe: Recipe | None, start: int, end: int, batch_size: int,
                       max_new_tokens: int = 8) -> tuple[dict, list]:
    """Answers to question samples ``start..end-1`` (harness: batched greedy generation, failures
    recorded), scored with the benchmark's metric; FLOPs from the executed token counts."""
    from fitprune.evaluation.harness import generate_answers, score

    t0 = time.perf_counter()
    samples = sources.question_samples(eval_set, start, end)
    preds = generate_answers(model, encoder_for(spec), samples, recipe=recipe, batch_size=batch_size,
                             max_new_tokens=max_new_tokens)
    metric = sources.metric_for(eval_set["source"])
    summary = score(preds, metric)
    ran = [p for p in preds if p.prefill_flops is not None]
    full = sum(p.prefill_flops_full for p in ran)
    pruned = sum(p.prefill_flops for p in ran)
    result = {  # POPE's per-sample score is yes/no correctness, so "value" is its accuracy
        "metric": 0.0 if summary["n_scored"] == 0 else float(summary["value"]), "metric_name": metric,
        "n_samples": len(preds), "n_failed": summary["n_failed"],
        "flops_reduction": 1.0 - pruned / full if full else 0.0,
        "prefill_flops": pruned / len(ran) if ran else 0.0,
        "wall_s": time.perf_counter() - t0,
    }
    return result, preds


def evaluate_shard(spec, info: dict, eval_set: dict, recipe_json: str | None, start: int, end: int,
                   batch_size: int, run_id: str, method: str, benchmark: str, root, max_new_tokens: int = 8) -> dict:
    """Evaluate one recipe (``None``: unpruned) on samples ``start..end-1``; write and return its row.

    Question sources: generated answers scored with the benchmark's metric, one ``predictions`` row
    per sample; input sources: next-token agreement with the unpruned model. The ``evaluations``
    row's write id is ``<run>-<set id>-<recipe>-<start>-<end>``, so a retried shard writes once;
    ``evaluation_summary`` (SQL) combines a recipe's shards.
    """
    from fitprune.evaluation.harness import sample_score, to_rows

    spec = normalize_spec(spec)
    model = load_model(spec)
    recipe = None if recipe_json is None else Recipe.from_dict(json.loads(recipe_json))
    rid = "none" if recipe is None else recipe_id(recipe)
    write_id = f"{run_id}-{eval_set['id']}-{rid}-{start}-{end}"  # one per (run, benchmark set, recipe, shard)
    if sources.is_question_source(eval_set["source"]):
        with _LOCK:  # pruning hooks are per model: one evaluation at a time per process
            result, preds = evaluate_questions(spec, model, eval_set, recipe, start, end, batch_size, max_new_tokens)
        metric = result["metric_name"]
        rows = to_rows(preds, run_id=run_id, recipe_id=rid, checkpoint=info["checkpoint"], method=method,
                       benchmark=benchmark, shard=f"{start}-{end}")
        for row, pred in zip(rows, preds):
            row["score"] = sample_score(pred, metric)
        store.write_rows("predictions", rows, root=root, write_id=write_id)
    else:
        batches = load_samples(eval_set, batch_size, spec["device"], start, end)
        key = _key([spec, eval_set, batch_size, start, end])
        with _LOCK:
            if key not in _REFERENCE:
                _REFERENCE[key] = reference_tokens(model, batches)
            result = evaluate(model, batches, recipe, _REFERENCE[key], _dims(info))
    row = eval_row(result, run_id, rid, info["checkpoint"], method, benchmark, versions())
    row["shard"] = f"{start}-{end}"
    store.write_rows("evaluations", [row], root=root, write_id=write_id)
    return row


def combine_shards(rows: list[dict]) -> dict:
    """One recipe's shard rows as one result: metric weighted by scored samples, FLOPs by samples."""
    n = sum(r["n_samples"] for r in rows)
    scored = [(r["n_samples"] - r.get("n_failed", 0), r) for r in rows]
    n_scored = sum(k for k, _ in scored)
    return {
        "metric": sum(r["metric"] * k for k, r in scored) / n_scored if n_scored else 0.0,
        "metric_name": rows[0].get("metric_name", "agreement"),
        "n_samples": n,
        "n_failed": sum(r.get("n_failed", 0) for r in rows),
        "flops_reduction": sum(r["flops_reduction"] * r["n_samples"] for r in rows) / n,
        "prefill_flops": sum(r["prefill_flops"] * r["n_samples"] for r in rows) / n,
        "wall_s": sum(r["wall_s"] for r in rows),
    }


# --- results ---------------------------------------------------------------------------------


def recipe_row(recipe: Recipe, method: str, family: str, run_id: str, convention: str) -> dict:
    div = recipe.metadata.get("calibration_divergence") or {}
    return dict(
        recipe_id=recipe_id(recipe), checkpoint=recipe.checkpoint, family=family, method=method,
        scoring=recipe.scoring, budget=recipe.budget, flops_convention=convention,
        alpha=recipe.metadata.get("alpha"),
        predicted_reduction=float(recipe.metadata.get("predicted_reduction", recipe.budget)),
        drop_fractions=list(recipe.drop_fractions), recipe_json=recipe.to_json(), run_id=run_id,
        divergence=_finite_or_none(div.get("divergence")), divergence_search=_finite_or_none(div.get("divergence_search")),
        divergence_calib_id=div.get("calib_id"), divergence_samples=div.get("n_heldout"),
        measured_reduction=div.get("measured_reduction"),
    )


def _finite_or_none(x):
    return None if x is None or not np.isfinite(x) else float(x)


def eval_row(result: dict, run_id: str, rid: str, checkpoint: str, method: str, benchmark: str, vers: dict) -> dict:
    result = {"n_failed": 0, "metric_name": "agreement", **result}
    return dict(run_id=run_id, recipe_id=rid, checkpoint=checkpoint, method=method, benchmark=benchmark,
                shard=f"0-{result['n_samples']}", versions=vers, **result)


def write_results(run_id: str, recipe_rows: list[dict], eval_rows: list[dict], parameters: dict, started: float,
                  root, flow: str = "sweep") -> None:
    """Append the run's recipes, run row and any ``eval_rows`` not yet stored (idempotent per run id)."""
    from datetime import datetime, timezone

    def ts(t):
        return datetime.fromtimestamp(t, tz=timezone.utc)

    store.write_rows("recipes", recipe_rows, root=root, write_id=run_id)
    if eval_rows:  # rows not already written by ``evaluate_shard``
        store.write_rows("evaluations", eval_rows, root=root, write_id=run_id)
    store.write_rows("runs", [dict(run_id=run_id, flow=flow, parameters=parameters, status="completed",
                                   started_at=ts(started), ended_at=ts(time.time()), versions=versions())],
                     root=root, write_id=run_id)


def pareto_rows(root, checkpoint: str | None, benchmark: str | None) -> list[dict]:
    """The Pareto front from the DuckDB catalog as plain rows (timestamps as text)."""
    front = catalog.pareto(root, checkpoint=checkpoint, benchmark=benchmark)
    rows = []
    for row in front.to_pylist():
        rows.append({k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in row.items()})
    return rows
