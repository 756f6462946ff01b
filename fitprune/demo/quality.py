"""How well the demo model answers: easy-VQA test and the synthetic test split, per question family.

    python -m fitprune.demo.quality --adapter fitprune/data/demo_adapter.safetensors --device cuda

Numbers come from the evaluation harness (batched greedy generation, exact match after the VQA
answer normalisation); failed samples are counted, never dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["demo_benchmarks", "evaluate_demo"]


def demo_benchmarks(easy_vqa: int | None, synthetic: int, seed: int = 0) -> dict[str, list]:
    """{"easy_vqa": first n test questions (None: all 9,673), "synthetic": n test samples (7 families)}."""
    from ..evaluation.easy_vqa import load_easy_vqa
    from ..synthetic import generate

    out = {"easy_vqa": load_easy_vqa("test", limit=easy_vqa)}
    if synthetic:
        out["synthetic"] = generate("test", synthetic, seed=seed)
    return out


def evaluate_demo(model, processor, benchmarks: dict[str, list], *, batch_size: int = 32,
                  max_new_tokens: int = 6, recipe=None, progress=None) -> tuple[dict, dict[str, list]]:
    """(metrics, predictions) for each benchmark; synthetic metrics also per family."""
    from ..evaluation.harness import DemoEncoder, generate_answers, score

    encoder = DemoEncoder(processor)
    metrics, predictions = {}, {}
    for name, samples in benchmarks.items():
        preds = generate_answers(model, encoder, samples, recipe=recipe, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, progress=progress)
        predictions[name] = preds
        metrics[name] = score(preds, "exact_match")
        families = {getattr(s, "family", None) for s in samples} - {None}
        if families:
            by_family = defaultdict(list)
            for s, p in zip(samples, preds):
                by_family[s.family].append(p)
            metrics[name]["by_family"] = {f: score(ps, "exact_match") for f, ps in sorted(by_family.items())}
    return metrics, predictions


def main(argv: list[str] | None = None) -> int:
    from .adapter import MANIFEST_FILE
    from .build import build_demo_model

    p = argparse.ArgumentParser(prog="python -m fitprune.demo.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="trained", help='"trained" (shipped), "none", or an adapter file')
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--easy-vqa", type=int, default=None, help="first n easy-VQA test questions (default: all)")
    p.add_argument("--synthetic", type=int, default=2100, help="synthetic test samples (default 2100 = 300/family)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="write metrics.json and predictions.jsonl here")
    p.add_argument("--update-manifest", action="store_true", help="store the metrics in the adapter's manifest")
    args = p.parse_args(argv)
    adapter = None if args.adapter == "none" else args.adapter
    model, processor = build_demo_model(args.cache_dir, adapter=adapter, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    benchmarks = demo_benchmarks(args.easy_vqa, args.synthetic)
    done = [0]

    def progress(i, n):
        done[0] += 1
        if done[0] % 20 == 0 or i == n:
            print(f"  {i}/{n}", file=sys.stderr, flush=True)

    metrics, preds = evaluate_demo(model, processor, benchmarks, batch_size=args.batch_size, progress=progress)
    metrics["setup"] = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                        "samples": {k: len(v) for k, v in benchmarks.items()}}
    print(json.dumps(metrics, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(out / "predictions.jsonl", "w") as f:
            for name, ps in preds.items():
                for pr in ps:
                    f.write(json.dumps({"benchmark": name, "id": pr.sample_id, "question": pr.question,
                                        "prediction": pr.prediction, "answers": pr.answers, "error": pr.error}) + "\n")
    if args.update_manifest and adapter not in (None, "trained"):
        path = Path(adapter).with_name(MANIFEST_FILE)
        manifest = json.loads(path.read_text())
        manifest["metrics"] = metrics
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
