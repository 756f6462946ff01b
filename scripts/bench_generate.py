#!/usr/bin/env python
"""End-to-end ``generate`` benchmark: time to first token and decode speed, pruned against stock.

Builds the random-weight geometries of ``scripts/bench_gpu.py`` (imported from it: the same 7B
language models, tiny vision towers, the same prompts and recipes) and, per geometry and batch
size (default 1, 8, 32), runs greedy ``generate`` of a fixed-length answer (``--new-tokens``,
default 32; min = max new tokens, so every configuration decodes the same number of steps) for:

* ``unpruned`` — stock ``generate`` with its default ``DynamicCache``: the reference of every ratio;
* ``unpruned+static`` — stock ``generate`` with ``cache_implementation="static"``; on a CUDA device
  transformers then compiles the decode step (``torch.compile``, CUDA graphs), the fastest form stock
  transformers offers. On the CPU transformers does not compile it (label ``unpruned+static-eager``);
* each FitPrune recipe of the geometry (``--fastv`` adds FastV at the same FLOPs), with the
  ``DynamicCache`` fitprune prunes by default, and again with ``cache_implementation="static"``
  (label ``+static``): fitprune then lays each layer's static buffer out at its pruned length
  (:mod:`fitprune.static_cache`) and ``generate`` compiles the decode step as for the stock model;
* with ``--cuda-graphs both`` (the default on a GPU) the unpruned model and every recipe again with
  the language-model prefill replayed from CUDA graphs (``fitprune.graph_prefill``, label ``+graphs``,
  ratios against the graphed unpruned model; decode stays eager).

Measured (CUDA events on a GPU, ``perf_counter`` on the CPU; median of ``--repeats`` timed calls after
one untimed warm-up call with the same settings, which also compiles the static decode):

* ``ttft_ms`` — time to first token: from the ``generate`` call to the end of its first forward
  (generate's setup, the vision tower, the prefill, the first token's logits);
* ``decode_tok_s`` = batch × (new tokens − 1) / decode time, ``decode_step_ms``; decode time runs from
  the end of the first forward to the return of ``generate``; ``generate_ms`` the whole call;
* the time split, from one more call: ``split_vision_ms`` (vision tower and projector modules),
  ``split_lm_prefill_ms`` (the language model's prefill call), ``split_scoring_ms`` (fitprune's
  ``scoring``, ``selection``, ``dart`` and ``input_stage`` stages of that prefill, from
  ``fitprune.profiling.StageTimer``: CUDA events around each stage, no synchronisation), ``split_prune_other_ms``
  (its ``compaction`` and ``reslice`` stages), ``split_decode_ms`` and ``split_decode_reslice_ms``
  (masks re-sliced in the decode steps). A graph replay runs no host code, so graphed rows have no
  stage split;
* ``kv_cache_bytes`` — keys and values held at the end of ``generate``.

Every row carries ``ratio_vs_unpruned`` (against ``unpruned`` of the same geometry, batch and graph
mode, measured in the same run) and ``flops_ratio`` (the prefill's executed language-model FLOPs over
unpruned, "full" convention, from ``fitprune.last_report``). The KV-cache ratio is the one to read
next to decode speed. Rows go to ``--out`` as ``{"meta", "errors", "rows"}`` JSON in the format of
``bench_gpu.py`` (``fitprune import-benchmarks`` loads them), rewritten after every geometry and batch.

    python scripts/bench_generate.py                                  # H200: 3 geometries × batches 1, 8, 32
    python scripts/bench_generate.py --geometries llava-1.5-7b --batches 8 --budgets 70
    python scripts/bench_generate.py --tiny                           # tiny geometries on the CPU, batches 1, 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402  (puts the repository root on sys.path, sets HF_HUB_OFFLINE)
from bench_gpu import Bench, CallTimer, Geometry, Method  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import fitprune  # noqa: E402
from fitprune import profiling  # noqa: E402
from fitprune.prune import cache_of  # noqa: E402

STATIC = "+static"  # label suffix: stock generate with a static cache
SCORING_STAGES = ("scoring", "selection", "dart", "input_stage")
OTHER_STAGES = ("compaction", "reslice")


# ------------------------------------------------------------------------------------------ timing


class PhaseTimer:
    """Marks every forward of ``model`` (call 0 = the prefill, then one per decode step), the calls of the
    vision modules and of the language model, and times fitprune's stages separately in the prefill
    and in the decode steps (one :class:`fitprune.profiling.StageTimer` each)."""

    def __init__(self, geo: Geometry, clock: bench_gpu.Clock, device: torch.device, split: bool):
        model = geo.model
        self.clock, self.split = clock, split
        self.calls = CallTimer(model, clock)
        self.vision = [CallTimer(m, clock) for m in vision_modules(model)] if split else []
        self.lm = CallTimer(model.model.language_model, clock) if split else None
        self.stages = {"prefill": profiling.StageTimer(device), "decode": profiling.StageTimer(device)}
        self._active: profiling.StageTimer | None = None
        self._forwards = 0
        self._hooks = []
        if split:
            self._hooks = [model.register_forward_pre_hook(self._enter, prepend=True),
                           model.register_forward_hook(self._exit)]

    def _enter(self, module, args):
        self._active = self.stages["prefill" if self._forwards == 0 else "decode"]
        self._forwards += 1
        self._active.__enter__()

    def _exit(self, module, args, output):
        if self._active is not None:
            self._active.__exit__(None, None, None)
            self._active = None

    def reset(self) -> None:
        self._forwards = 0
        for timer in [self.calls, *self.vision] + ([self.lm] if self.lm else []):
            timer.calls.clear()
        for stage_timer in self.stages.values():
            stage_timer.reset()

    def close(self) -> None:
        self._exit(None, None, None)
        for h in self._hooks:
            h.remove()
        for timer in [self.calls, *self.vision] + ([self.lm] if self.lm else []):
            timer.close()


def vision_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision tower and projector of a LLaVA / LLaVA-NeXT / Qwen2-VL model (as transformers names them)."""
    inner = getattr(model, "model", model)
    found = [getattr(inner, name) for name in ("vision_tower", "visual", "multi_modal_projector")
             if isinstance(getattr(inner, name, None), torch.nn.Module)]
    if not found:
        raise RuntimeError(f"no vision tower found on {type(model).__name__}")
    return found


def generate_once(geo: Geometry, inputs: dict, n_new: int, static: bool):
    kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True,
                  return_dict_in_generate=True)
    if static:
        kwargs["cache_implementation"] = "static"
    return geo.model.generate(**inputs, **kwargs)


def measure_generate(bench: Bench, geo: Geometry, inputs: dict, static: bool) -> dict:
    """Median TTFT / decode figures of ``--repeats`` timed calls, then the split from one more call."""
    args, clock = bench.args, bench.clock
    batch, length = inputs["input_ids"].shape
    n_new = args.new_tokens
    res: dict[str, list[float]] = defaultdict(list)
    timer = PhaseTimer(geo, clock, bench.device, split=False)
    try:
        for i in range(1 + args.repeats):
            timer.reset()
            clock.sync()
            g0 = clock.mark()
            out = generate_once(geo, inputs, n_new, static)
            g1 = clock.mark()
            clock.sync()
            generated = out.sequences.shape[1] - length
            calls = timer.calls.calls
            if generated != n_new or len(calls) != n_new:
                raise RuntimeError(f"generate produced {generated} tokens in {len(calls)} forwards, expected {n_new}")
            kv = bench_gpu.cache_bytes(cache_of(out))
            del out
            if i == 0:  # warm-up: same settings (a static cache's compiled decode is built here)
                continue
            # decode ends when generate returns: in a compiled decode step the timer's hooks are traced
            # into the graph, so their CUDA events are never recorded (the prefill runs eagerly)
            decode_s = clock.seconds(calls[0][1], g1)
            res["ttft"].append(clock.seconds(g0, calls[0][1]))
            res["prefill_forward"].append(clock.seconds(*calls[0]))
            res["decode"].append(decode_s)
            res["total"].append(clock.seconds(g0, g1))
            res["tok_s"].append(batch * (n_new - 1) / decode_s)
            res["step"].append(decode_s / (n_new - 1))
    finally:
        timer.close()
    figures = {k: bench_gpu._median(v) for k, v in res.items()}
    figures["kv_bytes"] = kv
    if not static:  # the compiled static decode inlines the timer's hooks, so its events are never recorded
        figures.update(measure_split(bench, geo, inputs, static))
    return figures


def measure_split(bench: Bench, geo: Geometry, inputs: dict, static: bool) -> dict:
    """Vision tower, LM prefill, fitprune's stages and decode of one more call (seconds)."""
    clock = bench.clock
    timer = PhaseTimer(geo, clock, bench.device, split=True)
    try:
        clock.sync()
        out = generate_once(geo, inputs, bench.args.new_tokens, static)
        clock.sync()
        del out
        timer.calls.durations()  # synchronises
        calls = timer.calls.calls
        lm = timer.lm.durations()
        vision = sum(sum(t.durations()) for t in timer.vision)
        prefill, decode = timer.stages["prefill"], timer.stages["decode"]
        split = {"split_vision": vision, "split_lm_prefill": lm[0] if lm else float("nan"),
                 "split_decode": clock.seconds(calls[0][1], calls[-1][1])}  # as decode_tok_s counts it
        if prefill.counts:  # stages ran (eager pruned prefill)
            split["split_scoring"] = prefill.total(*SCORING_STAGES)
            split["split_prune_other"] = prefill.total(*OTHER_STAGES)
        if decode.counts:
            split["split_decode_reslice"] = decode.total("reslice")
        return split
    finally:
        timer.close()


# ------------------------------------------------------------------------------------------ one batch


def configurations(bench: Bench, geo: Geometry) -> list[tuple[Method, bool]]:
    """(method, static cache) pairs to measure, the unpruned reference first."""
    stock = Method("unpruned", "unpruned", None, None, "stock model, DynamicCache")
    compiled = bench.device.type == "cuda"
    suffix = STATIC + ("" if compiled else "-eager")
    how = ", decode compiled by generate" if compiled else ", eager decode (transformers compiles it on CUDA only)"
    static = Method("unpruned" + suffix, "stock-static", None, None, "stock model, static cache" + how)
    methods = [stock]
    for m in geo.recipes:
        methods.append(m)
        if bench.args.fastv:
            methods.append(bench_gpu._fastv_match(geo, m))
    if bench.graphs == "both":
        methods += [bench_gpu._graphs_twin(m) for m in methods]
    pruned_static = [Method(m.label + suffix, m.method, m.budget, m.recipe,
                            f"{m.source}; static cache at the pruned lengths (fitprune.static_cache){how}",
                            of=m.of, graphs=m.graphs) for m in methods if m.recipe is not None]
    return [(m, False) for m in methods] + [(static, True)] + [(m, True) for m in pruned_static]


def run_batch(bench: Bench, geo: Geometry, batch: int) -> None:
    inputs = geo.make_inputs(batch)
    full = bench_gpu.unpruned_flops(geo)
    for m, static in configurations(bench, geo):
        bench_gpu.guarded(bench, geo, batch, m, lambda m=m, static=static: measure(bench, geo, batch, inputs, m,
                                                                                   static, full))


def measure(bench: Bench, geo: Geometry, batch: int, inputs: dict, m: Method, static: bool, full: float) -> None:
    handle = (fitprune.apply(geo.model, m.recipe, fused_scores=bench.fused_setting(False))
              if m.recipe is not None else contextlib.nullcontext())
    graphed = fitprune.graph_prefill(geo.model, max_graphs=1) if m.graphs else contextlib.nullcontext()
    with handle, graphed, torch.no_grad():
        d = measure_generate(bench, geo, inputs, static)
        fr = 1.0
        if m.recipe is not None:
            report = fitprune.last_report(geo.model)
            if report is None:
                raise RuntimeError("fitprune.last_report is None after a pruned generate")
            fr = float(report.flops(geo.dims, "full").sum() / (full * batch))
    if static and bench.device.type == "cuda" and getattr(geo.model, "_compiled_call", None) is None:
        bench.errors.append(f"{geo.name} b{batch} {m.label}: generate did not compile the static decode step")
    add = lambda metric, value, unit: bench.add(geo, batch, m, metric, value, unit, fr)  # noqa: E731
    add("ttft_ms", d["ttft"] * 1e3, "ms")
    add("generate_prefill_ms", d["prefill_forward"] * 1e3, "ms")
    add("decode_tok_s", d["tok_s"], "tokens/s")
    add("decode_step_ms", d["step"] * 1e3, "ms")
    add("generate_ms", d["total"] * 1e3, "ms")
    add("kv_cache_bytes", d["kv_bytes"], "bytes")
    for key, value in d.items():
        if key.startswith("split_"):
            add(key + "_ms", value * 1e3, "ms")


# ------------------------------------------------------------------------------------------ output


def print_tables(rows: list[dict]) -> None:
    order, keyed = bench_gpu.keyed_rows(rows)
    fmt = bench_gpu._fmt
    for geometry, batch in order:
        print(f"\n== {geometry}  batch {batch}  (× = ratio against unpruned in the same run; FLOPs× of the prefill; "
              "ms of the split from one call)")
        labels = [lab for (g, b, lab) in keyed if (g, b) == (geometry, batch)]
        best_ttft = min((keyed[(geometry, batch, lab)]["ttft_ms"]["value"] for lab in labels
                         if lab.startswith("unpruned") and "ttft_ms" in keyed[(geometry, batch, lab)]), default=None)
        best_tok = max((keyed[(geometry, batch, lab)]["decode_tok_s"]["value"] for lab in labels
                        if lab.startswith("unpruned") and "decode_tok_s" in keyed[(geometry, batch, lab)]), default=None)
        header = ["config", "FLOPs×", "KV×", "TTFT ms", "×", "×best", "decode tok/s", "×", "×best", "generate ms", "×",
                  "vision", "LM prefill", "scoring", "prune other", "decode"]
        table = [header]
        for lab in labels:
            r = keyed[(geometry, batch, lab)]

            def v(metric, spec=".1f", how="value"):
                row = r.get(metric)
                return fmt(row and row[how], spec)

            ttft, tok = r.get("ttft_ms"), r.get("decode_tok_s")
            table.append([
                lab, fmt(next(iter(r.values()))["flops_ratio"], ".3f"), v("kv_cache_bytes", ".3f", "ratio_vs_unpruned"),
                v("ttft_ms"), v("ttft_ms", ".3f", "ratio_vs_unpruned"),
                fmt(ttft and best_ttft and ttft["value"] / best_ttft, ".3f"),
                v("decode_tok_s"), v("decode_tok_s", ".3f", "ratio_vs_unpruned"),
                fmt(tok and best_tok and tok["value"] / best_tok, ".3f"),
                v("generate_ms"), v("generate_ms", ".3f", "ratio_vs_unpruned"),
                v("split_vision_ms"), v("split_lm_prefill_ms"), v("split_scoring_ms"), v("split_prune_other_ms"),
                v("split_decode_ms"),
            ])
        bench_gpu.print_table(table)
    print("\n×best: against the faster stock form (DynamicCache or static cache) of the same batch.")


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny geometries (hidden 64) on the CPU: a smoke run")
    p.add_argument("--geometries", default=",".join(bench_gpu.GEOMETRIES),
                   help=f"comma list of {', '.join(bench_gpu.GEOMETRIES)}")
    p.add_argument("--budgets", default=None, help="comma list of FitPrune budgets in percent (default: all of "
                                                   "the geometry's recipes)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,8,32; --tiny: 1,2)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed generate calls, median reported (default 3; "
                                                             "--tiny: 1)")
    p.add_argument("--fastv", action="store_true", help="also FastV (K=2) at each recipe's FLOPs")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--sdpa-backends", default="flash,efficient,math", help="as in bench_gpu.py")
    p.add_argument("--fused-scores", choices=("on", "off"), default="on",  # checked by bench_gpu.setup
                   help="FitPrune scores by the fused Triton kernel (on; needs CUDA and Triton, else off) or the torch path")
    p.add_argument("--cuda-graphs", choices=("off", "both"), default="both",
                   help="also measure every configuration with the prefill replayed from CUDA graphs (GPU only)")
    p.add_argument("--out", default=None, help="JSON file; default $OUT/bench_generate.json if OUT is set, else "
                                               "./bench_generate.json")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8,32")).split(",") if b.strip()]
    args.repeats = args.repeats or (1 if args.tiny else 3)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed needs a decode step)")
    args.geometries = [g.strip() for g in args.geometries.split(",") if g.strip()]
    bad = sorted(set(args.geometries) - set(bench_gpu.GEOMETRIES))
    if bad:
        p.error(f"unknown geometries {bad}; known: {', '.join(bench_gpu.GEOMETRIES)}")
    args.budgets = None if args.budgets is None else {int(b) for b in args.budgets.split(",") if b.strip()}
    if args.out is None:
        args.out = str(Path(os.environ["OUT"]) / "bench_generate.json") if os.environ.get("OUT") else "bench_generate.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # every static configuration (stock, each recipe, graphed or not, each batch) compiles its own decode
    # step on one model; torch's default limit of 8 compiled variants would send the later ones to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    device, dtype, meta = bench_gpu.setup(args)
    gpu, fused = meta["gpu"], meta["fused_scores"]
    bench = Bench(args, device, meta)
    notes: list[str] = []
    run_meta = {**meta, "benchmark": "bench_generate", "batches": args.batches, "repeats": args.repeats,
                "new_tokens": args.new_tokens, "notes": notes}
    out = Path(args.out)
    print(f"bench_generate: {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, {meta['dtype']}, "
          f"batches {args.batches}, {args.new_tokens} new tokens, geometries {args.geometries}"
          f"{' (tiny)' if args.tiny else ''}, fused scores {fused} → {out}", flush=True)
    t_start = time.perf_counter()
    for name in args.geometries:
        geo = bench_gpu.build_geometry(bench, name, dtype)
        if geo is None:
            continue
        print(f"{name}: built in {geo.build_s:.1f} s, {geo.n_visual} visual + {geo.n_other} other tokens; recipes: "
              + "; ".join(f"{m.label} = {m.source}" for m in geo.recipes), flush=True)
        for batch in args.batches:
            run_batch(bench, geo, batch)
            bench_gpu.fill_ratios(bench.rows)
            bench_gpu.write_rows(out, bench.rows, run_meta, bench.errors)
        geo.model = None
        del geo
        bench_gpu._free(device)
    bench_gpu.fill_ratios(bench.rows)
    bench_gpu.write_rows(out, bench.rows, run_meta, bench.errors)
    print_tables(bench.rows)
    for note in notes:
        print(f"note: {note}")
    return bench_gpu.finish(bench, out, t_start)


if __name__ == "__main__":
    sys.exit(main())
