"""The "Recipes that win" table: fitted recipes against every baseline at equal measured FLOPs.

    python scripts/recipes_that_win.py --device cuda --out runs/rtw            # the README table (one GPU)
    python scripts/recipes_that_win.py --device cpu --calib 16 --synthetic 24 --easy-vqa 24 --search small \\
        --budgets 0.5 --out /tmp/rtw                                         # a smoke run on a CPU

On the demo model: for each calibration source (synthetic train, easy-VQA train) it collects the
unpruned statistics, runs the divergence search (``fitprune``) and the authors' α-walk
(``fitprune-paper``) for every budget, matches FastV (K = 2), the PDrop-style pyramid, DART (K = 2),
the pre-LLM DivPrune and VisionZip, and random pruning (``fitprune``'s schedule) to the same budgets, and evaluates every recipe and the unpruned
model on the synthetic test split and easy-VQA test (harness: batched greedy generation, exact
match). ``fitprune-transfer`` is the search fitted on the *other* task's calibration set.

Reported per benchmark and budget: accuracy, the paired difference against the unpruned model
with its standard error, accuracy retained, measured FLOPs reduction, and each recipe's
divergence on the in-task calibration set's held-out part; then the Spearman rank agreement
between divergence and accuracy, and how much of the in-task gain over the best baseline the
transferred fit keeps. FLOPs are measured from the executed token counts under both the full
convention (all tokens) and the authors' (visual tokens only). A resumed file whose fits lack a
newer baseline gets it matched and evaluated (the rest is reused). Everything is written to ``<out>/recipes_that_win.json`` after every step
(rerun with ``--resume`` to continue a cut-off run) and the tables to ``<out>/recipes_that_win.md``.
``--seven-b`` also times the search per budget on the LLaVA-1.5-7B geometry (random weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitprune import Recipe  # noqa: E402
from fitprune.baselines import random_recipe  # noqa: E402
from fitprune.fit import fit  # noqa: E402
from fitprune.search import RecipeSearch, SearchConfig  # noqa: E402

TASKS = {"synthetic": "synthetic test", "easy_vqa": "easy-VQA test"}
METHODS = ("fitprune", "fitprune-transfer", "fitprune-paper", "fastv", "pyramid", "dart", "divprune", "visionzip",
           "random")
MATCHED = ("fastv", "pyramid", "dart", "divprune", "visionzip")  # baselines matched to each budget on calibration
BASELINES = (*MATCHED, "random")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class CachedEncoder:
    """The demo encoder, memoised on (image bytes, question): every recipe sees the same inputs, encoded once."""

    def __init__(self, encoder):
        self.encoder, self.pad_token_id, self.cache = encoder, encoder.pad_token_id, {}

    def encode(self, image, question):
        key = (hashlib.blake2b(image.tobytes(), digest_size=16).digest(), image.size, question)
        if key not in self.cache:
            self.cache[key] = self.encoder.encode(image, question)
        return self.cache[key]

    def decode(self, ids):
        return self.encoder.decode(ids)


class State:
    """The results file: rewritten atomically after every step, read back with ``--resume``."""

    def __init__(self, path: Path, resume: Path | None):
        self.path = path
        self.data = json.loads(resume.read_text()) if resume and resume.exists() else {}
        self.data.setdefault("fits", {})
        self.data.setdefault("evaluations", {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def calibration_samples(task: str, n: int, seed: int):
    from fitprune.evaluation.easy_vqa import load_easy_vqa
    from fitprune.synthetic import generate

    if task == "synthetic":
        return generate("train", n, seed=seed)
    rng = np.random.default_rng(seed)
    pool = load_easy_vqa("train")
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def test_samples(task: str, n: int):
    from fitprune.evaluation.easy_vqa import load_easy_vqa
    from fitprune.synthetic import generate

    return generate("test", n, seed=0) if task == "synthetic" else load_easy_vqa("test", limit=n)


def batches_of(samples, encoder, model, batch_size: int, device) -> list[dict]:
    from fitprune.evaluation.harness import collate, encode_sample

    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        b = collate([encode_sample(s, encoder, model) for s in chunk], encoder.pad_token_id)
        b = {k: v.to(device) for k, v in b.items()}
        b["sample_ids"] = [str(s.id) for s in chunk]
        out.append(b)
    return out


def fit_task(task: str, model, dims, encoder, args, state: State) -> RecipeSearch:
    """Statistics, the search and every method's recipe for one calibration source (kept in ``state``)."""
    from fitprune.stats import collect_stats

    samples = calibration_samples(task, args.calib, seed=args.seed)
    batches = batches_of(samples, encoder, model, args.calib_batch, args.device)
    t0 = time.perf_counter()
    stats = collect_stats(model, batches, calib_id=f"{task}-train-{args.calib}-seed{args.seed}")
    stats_s = time.perf_counter() - t0
    config = SearchConfig.full() if args.search == "full" else SearchConfig.small()
    searcher = RecipeSearch(model, batches, stats, dims, config=config, family="llava", log=log)
    done = state.data["fits"].get(task)
    if done and all(str(b) in done["recipes"] for b in args.budgets):
        log(f"{task}: recipes from the resumed file")
        for b in args.budgets:  # baselines added after the file was written
            have = done["recipes"][str(b)]
            for name in (m for m in MATCHED if m not in have):
                r = searcher.baseline(name, b)
                have[name] = {"recipe": r.to_dict(), "calibration": searcher.measure(r)}
                log(f"{task} {b}: {name} matched ({r.metadata['predicted_reduction']:.3f} predicted)")
        state.save()
        return searcher
    t0 = time.perf_counter()
    paper = fit(stats, args.budgets, dims, family="llava")
    paper_s = time.perf_counter() - t0
    seeds = {b: [r.recipe.with_updates(method="fitprune-paper")] for b, r in zip(args.budgets, paper) if r.feasible}
    t0 = time.perf_counter()
    results = searcher.fit(args.budgets, seeds=seeds)
    search_s = time.perf_counter() - t0
    recipes = {}
    for b, res, pap in zip(args.budgets, results, paper):
        row = {"fitprune": res.recipe, "fitprune-paper": pap.recipe.with_updates(method="fitprune-paper"),
               "random": random_recipe(res.recipe, seed=0)}
        for name in MATCHED:
            row[name] = searcher.baseline(name, b)
        recipes[str(b)] = {m: {"recipe": r.to_dict(), "calibration": searcher.measure(r)} for m, r in row.items()}
        recipes[str(b)]["search"] = {"seconds": res.seconds, "evaluations": res.evaluations, "origin": res.origin,
                                     "best_seed": res.best_seed, "feasible": res.feasible,
                                     "candidates": list(res.candidates)}
    state.data["fits"][task] = {"stats_seconds": stats_s, "paper_fit_seconds": paper_s, "search_seconds": search_s,
                                "n_calib": args.calib, "calib": searcher.calibration, "recipes": recipes}
    state.save()
    log(f"{task}: fitted {len(args.budgets)} budgets, search {search_s:.1f}s")
    return searcher


def evaluate(task: str, label: str, recipe: Recipe | None, model, encoder, samples, args, state: State) -> None:
    from fitprune.evaluation.harness import generate_answers, sample_score

    evals = state.data["evaluations"].setdefault(task, {})
    if label in evals:
        return
    t0 = time.perf_counter()
    preds = generate_answers(model, encoder, samples, recipe=recipe, batch_size=args.eval_batch,
                             max_new_tokens=args.max_new_tokens)
    scores = [sample_score(p, "exact_match") for p in preds]
    ran = [p for p in preds if p.prefill_flops is not None]
    full = sum(p.prefill_flops_full for p in ran)
    paper = [p for p in ran if p.prefill_flops_paper is not None]
    paper_full = sum(p.prefill_flops_paper_full for p in paper)
    evals[label] = {"correct": "".join("1" if s else "0" for s in scores),
                    "n_failed": sum(p.error is not None for p in preds),
                    "accuracy": float(np.mean([bool(s) for s in scores])),
                    "flops_reduction": 1.0 - sum(p.prefill_flops for p in ran) / full if full else 0.0,
                    "flops_reduction_paper": (1.0 - sum(p.prefill_flops_paper for p in paper) / paper_full
                                              if paper_full else None),
                    "seconds": time.perf_counter() - t0}
    state.save()
    log(f"{task} {label}: {evals[label]['accuracy']:.4f} (−{evals[label]['flops_reduction']:.3f} FLOPs) "
        f"in {evals[label]['seconds']:.1f}s")


def run_demo(args, state: State) -> None:
    from fitprune.demo.build import build_demo_model
    from fitprune.evaluation.harness import DemoEncoder
    from fitprune.flops import ModelDims

    model, processor = build_demo_model(args.cache_dir, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    dims = ModelDims.from_config(model.config.text_config)
    encoder = CachedEncoder(DemoEncoder(processor))
    state.data["setup"] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                           "dtype": args.dtype, "torch": torch.__version__, "budgets": args.budgets,
                           "calib": args.calib, "search": args.search,
                           "test": {"synthetic": args.synthetic, "easy_vqa": args.easy_vqa}}
    searchers = {task: fit_task(task, model, dims, encoder, args, state) for task in TASKS}
    other = {"synthetic": "easy_vqa", "easy_vqa": "synthetic"}
    for task in TASKS:
        n = args.synthetic if task == "synthetic" else args.easy_vqa
        samples = test_samples(task, n)
        evaluate(task, "unpruned", None, model, encoder, samples, args, state)
        for b in args.budgets:
            fits = state.data["fits"][task]["recipes"][str(b)]
            jobs = [(m, fits[m]) for m in ("fitprune", "fitprune-paper", *BASELINES) if m in fits]
            jobs.append(("fitprune-transfer", state.data["fits"][other[task]]["recipes"][str(b)]["fitprune"]))
            for method, entry in jobs:
                recipe = Recipe.from_dict(entry["recipe"])
                if recipe.metadata.get("feasible") is False:  # the shape cannot reach the budget: not compared
                    continue
                label = f"{method}@{b:g}"
                evaluate(task, label, recipe, model, encoder, samples, args, state)
                div = state.data.setdefault("divergence", {}).setdefault(task, {})
                if label not in div:  # every evaluated recipe's divergence on the in-task calibration set
                    div[label] = searchers[task].measure(recipe)
                    state.save()
        encoder.cache.clear()


def run_seven_b(args, state: State) -> None:
    """Search time per budget on the LLaVA-1.5-7B geometry (random weights: the divergences mean nothing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import build_llava

    from fitprune.stats import collect_stats

    if "seven_b" in state.data:
        return
    device = torch.device(args.device)
    geo = build_llava(False, device, getattr(torch, args.dtype))
    batches = [geo.make_inputs(args.seven_b_batch + i) for i in range(4)]
    stats = collect_stats(geo.model, batches)
    config = SearchConfig.full(refine=True, max_evals=args.seven_b_evals)
    t0 = time.perf_counter()
    searcher = RecipeSearch(geo.model, batches, stats, geo.dims, config=config, family="llava", log=log)
    setup_s = time.perf_counter() - t0
    rows = []
    for b in args.seven_b_budgets:
        res = searcher.fit([b])[0]
        rows.append({"budget": b, "seconds": res.seconds, "evaluations": res.evaluations})
        state.data["seven_b"] = {"geometry": "llava-1.5-7b (random weights)", "n_calib": stats.num_samples,
                                 "setup_seconds": setup_s, "budgets": rows, "max_evals": args.seven_b_evals}
        state.save()
        log(f"7B geometry: budget {b}: {res.seconds:.1f}s, {res.evaluations} passes")
    del geo
    torch.cuda.empty_cache() if device.type == "cuda" else None


# -- the tables ------------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        r[x == v] = r[x == v].mean()
    return r


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def tables(data: dict) -> str:
    lines = []
    budgets = data["setup"]["budgets"]
    for task, title in TASKS.items():
        evals = data["evaluations"].get(task, {})
        if "unpruned" not in evals:
            continue
        base = np.array([c == "1" for c in evals["unpruned"]["correct"]], float)
        n = len(base)
        lines.append(f"\n**{title}** (n = {n}; unpruned {base.mean():.3f}; Δ = paired difference against the unpruned "
                     "model, points ± standard error; accuracy retained; FLOPs removed, full convention / authors' "
                     "convention where recorded; KL = divergence on the in-task calibration set's held-out part)\n")
        lines.append("| method | " + " | ".join(f"−{100 * b:.0f} % FLOPs" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        div = data.get("divergence", {}).get(task, {})
        for method in METHODS:
            cells = []
            for b in budgets:
                e = evals.get(f"{method}@{b:g}")
                if e is None:
                    cells.append("—")
                    continue
                x = np.array([c == "1" for c in e["correct"]], float)
                d = x - base
                se = d.std(ddof=1) / np.sqrt(n)
                kl = div.get(f"{method}@{b:g}", {}).get("divergence")
                paper = e.get("flops_reduction_paper")
                flops = f"−{100 * e['flops_reduction']:.1f} %" + ("" if paper is None else f" / −{100 * paper:.1f} %")
                cells.append(f"{x.mean():.3f} ({100 * d.mean():+.1f} ± {100 * se:.1f}; {100 * x.mean() / base.mean():.1f} %;"
                             f" {flops}; KL {kl:.3f})" if kl is not None else
                             f"{x.mean():.3f} ({100 * d.mean():+.1f} ± {100 * se:.1f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        cells = []  # the fitted recipe against the best baseline at each budget, paired on the same samples
        for b in budgets:
            have = [m for m in BASELINES if f"{m}@{b:g}" in evals]
            if f"fitprune@{b:g}" not in evals or not have:
                cells.append("—")
                continue
            best = max(have, key=lambda m: evals[f"{m}@{b:g}"]["accuracy"])
            x = np.array([c == "1" for c in evals[f"fitprune@{b:g}"]["correct"]], float)
            y = np.array([c == "1" for c in evals[f"{best}@{b:g}"]["correct"]], float)
            d = x - y
            cells.append(f"{100 * d.mean():+.1f} ± {100 * d.std(ddof=1) / np.sqrt(n):.1f} vs {best}")
        lines.append("| fitprune − best baseline (pts, paired) | " + " | ".join(cells) + " |")
        # rank agreement between divergence and accuracy
        pts = [(div[k]["divergence"], evals[k]["accuracy"], k.split("@")[1]) for k in evals if k in div]
        if pts:
            kl, acc, bud = map(np.array, zip(*pts))
            within = [spearman(kl[bud == b], -acc[bud == b]) for b in sorted(set(bud), key=float)]
            fmt = lambda v: "n/a" if not np.isfinite(v) else f"{v:.2f}"  # noqa: E731 (constant accuracy: no ranking)
            lines.append(f"\nSpearman(KL, −accuracy) over all {len(pts)} recipes: {fmt(spearman(kl, -acc))}; within "
                         "each budget (" + ", ".join(f"−{100 * float(b):.0f} %" for b in sorted(set(bud), key=float))
                         + "): " + ", ".join(fmt(w) for w in within))
        # transfer: share of the in-task gain over the best baseline that the transferred fit keeps
        keep = []
        for b in budgets:
            acc_of = {m: evals[f"{m}@{b:g}"]["accuracy"] for m in METHODS if f"{m}@{b:g}" in evals}
            best = max(acc_of.get(m, -1) for m in BASELINES)
            if "fitprune" in acc_of and "fitprune-transfer" in acc_of:
                gain, kept = acc_of["fitprune"] - best, acc_of["fitprune-transfer"] - best
                keep.append(f"−{100 * b:.0f} %: in-task {100 * gain:+.1f} pts, transferred {100 * kept:+.1f} pts over the "
                            "best baseline")
        if keep:
            lines.append("\nTransfer (fit on the other task): " + "; ".join(keep))
    fits = data.get("fits", {})
    if fits:
        lines.append("\nFit time (search + α-walk seeds, all budgets): " + ", ".join(
            f"{t}: {f['search_seconds']:.1f} s for {len(f['recipes'])} budgets" for t, f in fits.items()))
    if "seven_b" in data:
        s = data["seven_b"]
        lines.append(f"\n7B geometry ({s['geometry']}, {s['n_calib']} calibration samples): " + ", ".join(
            f"budget {r['budget']}: {r['seconds']:.1f} s ({r['evaluations']} passes)" for r in s["budgets"]))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--cache-dir", default=os.environ.get("FITPRUNE_MODEL_CACHE", "/tmp/fitprune-models"))
    p.add_argument("--budgets", default="0.3,0.5,0.7,0.85")
    p.add_argument("--calib", type=int, default=256, help="calibration samples per source (half held out)")
    p.add_argument("--calib-batch", type=int, default=32)
    p.add_argument("--synthetic", type=int, default=2100)
    p.add_argument("--easy-vqa", type=int, default=1000)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--search", default="full", choices=["full", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", default=None, help="a results file of an earlier, cut-off run")
    p.add_argument("--parts", default="demo",
                   help="demo, seven-b, both (demo,seven-b), or none (only print the tables of --resume)")
    p.add_argument("--seven-b-batch", type=int, default=16)
    p.add_argument("--seven-b-budgets", default="0.5")
    p.add_argument("--seven-b-evals", type=int, default=300)
    args = p.parse_args(argv)
    args.budgets = [float(x) for x in args.budgets.split(",")]
    args.seven_b_budgets = [float(x) for x in args.seven_b_budgets.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = State(out / "recipes_that_win.json", Path(args.resume) if args.resume else None)
    parts = args.parts.split(",")
    if "demo" in parts:
        run_demo(args, state)
    if "seven-b" in parts:
        run_seven_b(args, state)
    state.save()
    if "setup" in state.data:
        md = tables(state.data)
        (out / "recipes_that_win.md").write_text(md + "\n")
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
