#!/usr/bin/env python
"""Where the GPU time of a pruned prefill goes: kernel time by category, unpruned vs pruned.

Builds a geometry of ``scripts/bench_gpu.py`` (random weights, bf16), runs the prefill eagerly
under ``torch.profiler`` (CUDA kernel times; the same kernels a CUDA-graph replay runs), and prints
per configuration: wall time of one prefill, summed kernel time, the gap between the two (host
launch-bound time), and kernel time per category (GEMM, attention, fused scoring, sort/select,
gather/scatter/index, norm/elementwise, other) with the top kernels. A JSON of the table goes to
``--out``. The "fused scoring" and "sort/select" categories are fitprune's scoring and selection
kernels (the stock model runs no sorts); the small elementwise kernels around them count elsewhere.
The library marks its own stages with profiler ranges (``fitprune.profiling``: input_stage, scoring,
selection, dart, compaction, reslice); the kernel time and launches inside each, and its top kernels,
are printed too. The JSON also holds every kernel (name, ms and launches per prefill), overall and per
range.

    python scripts/profile_prefill.py --geometry llava-1.5-7b --batches 1,8 --recipes 70
    python scripts/profile_prefill.py --geometry llava-next-7b --batches 8 --recipes 40 --twins fastv,random
    python scripts/profile_prefill.py --tiny --batches 1     # tiny geometry on the CPU: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402

import fitprune  # noqa: E402
from fitprune import profiling  # noqa: E402

# fitprune's own work, marked by the library with profiler ranges (fitprune.profiling): kernel time
# launched inside each range is summed
RANGES = {name: profiling.PREFIX + name for name in profiling.STAGES}

CATEGORIES = [  # first match wins; matched against the lower-cased kernel name
    ("fused scoring", r"_row_stats|_cross_self"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|matmul|splitk|aten::(mm|bmm|addmm|linear)$"),
    ("sort/select", r"sort|radix|topk|cub::|scan"),
    ("gather/scatter/index", r"gather|scatter|index|cat|copy"),
    ("norm/elementwise", r"elementwise|reduce|norm|mul|add|silu|exp|pow|rsqrt|mean|vectorized"),
]


# fitprune's Triton kernels and the stage (range) that launches each (fitprune/kernels/)
TRITON_STAGES = {"_row_stats": "scoring", "_cross_self": "scoring", "_select_compact": "selection"}


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def profile_one(model, inputs, repeats: int, graphs: bool = False) -> dict:
    handle = fitprune.graph_prefill(model) if graphs else None
    try:
        return _profile(model, inputs, repeats)
    finally:
        if handle is not None:
            handle.remove()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _profile(model, inputs, repeats: int) -> dict:
    """On a GPU: CUDA kernel time per kernel. On the CPU (``--tiny``): self CPU time per aten op, the
    closest thing to a kernel there."""
    from torch.profiler import ProfilerActivity, profile

    cuda = next(model.parameters()).is_cuda
    with torch.no_grad():
        for _ in range(2):  # warm-up: compiles, plans, caches
            model(**inputs, use_cache=True, logits_to_keep=1)
        _sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(**inputs, use_cache=True, logits_to_keep=1)
        _sync()
        wall = (time.perf_counter() - t0) / repeats
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                model(**inputs, use_cache=True, logits_to_keep=1)
            _sync()
    by_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    if cuda:
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA and not evt.name.startswith(profiling.PREFIX):
                # (the ranges also appear as GPU-side spans: they are no kernels, and they include idle gaps)
                by_kernel[evt.name] += evt.device_time / 1e3 / repeats  # ms per prefill
                counts[evt.name] += 1
    else:
        for avg in prof.key_averages():
            if avg.key.startswith("aten::") and avg.self_cpu_time_total > 0:
                by_kernel[avg.key] += avg.self_cpu_time_total / 1e3 / repeats
                counts[avg.key] += avg.count
    by_cat: dict[str, float] = defaultdict(float)
    for name, ms in by_kernel.items():
        by_cat[category(name)] += ms
    every = sorted(by_kernel.items(), key=lambda kv: -kv[1])
    top = every[:12]
    ranges, range_kernels = _range_times(prof, cuda, repeats, by_kernel, counts)
    return {"wall_ms": wall * 1e3, "kernel_ms": sum(by_kernel.values()), "fitprune_ranges_ms": ranges,
            "range_kernels": range_kernels, "kernels": [(name, ms, counts[name] / repeats) for name, ms in every],
            "launches": sum(counts.values()) / repeats, "by_category": dict(by_cat),
            "top": [(name[:90], ms, counts[name] / repeats) for name, ms in top]}


def _range_times(prof, cuda: bool, repeats: int, by_kernel: dict, counts: dict) -> tuple[dict, dict]:
    """Per fitprune range: the time of the kernels launched inside it (on the CPU: the aten ops' self
    time), ms per prefill, and its kernels, the longest first. Read from the host-side range events and their
    children, so GPU-side annotation spans (which include idle gaps) are not counted. Triton's
    kernels are launched outside any aten op, so no host event carries them: they are added by name
    (:data:`TRITON_STAGES`) from ``by_kernel`` / ``counts`` (ms and launches per kernel name)."""
    names = {name: key for key, name in RANGES.items()}
    per_kernel: dict[str, dict[str, list]] = {key: defaultdict(lambda: [0.0, 0]) for key in RANGES}

    def walk(evt, key):
        if cuda:
            for k in evt.kernels:
                per_kernel[key][k.name][0] += k.duration / 1e3 / repeats
                per_kernel[key][k.name][1] += 1
        elif evt.name.startswith("aten::") and evt.self_cpu_time_total > 0:
            per_kernel[key][evt.name][0] += evt.self_cpu_time_total / 1e3 / repeats
            per_kernel[key][evt.name][1] += 1
        for child in evt.cpu_children:
            walk(child, key)

    for evt in prof.events():
        key = names.get(evt.name)
        if key is not None and evt.device_type == torch.autograd.DeviceType.CPU:
            walk(evt, key)
    for name, ms in by_kernel.items():  # set, not added: counted once even where a host event carried it
        key = TRITON_STAGES.get(name)
        if key is not None:
            per_kernel[key][name] = [ms, counts[name]]  # ms per prefill, launches over all repeats (as walk)
    ranges = {key: sum(ms for ms, _ in kernels.values()) for key, kernels in per_kernel.items()}
    every = {key: sorted(kernels.items(), key=lambda kv: -kv[1][0]) for key, kernels in per_kernel.items()}
    return ranges, {key: [(name[:90], ms, n / repeats) for name, (ms, n) in kernels] for key, kernels in every.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", default="llava-1.5-7b", choices=list(bench_gpu.BUILDERS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--recipes", default="70", help="comma list of budgets in percent among the geometry's recipes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--graphs", choices=("off", "on", "both"), default="off",
                   help="also profile the prefill replayed from CUDA graphs (fitprune.graph_prefill); ranges are "
                        "not seen inside a graph")
    p.add_argument("--twins", default="",
                   help="comma list of fastv, random: also profile, per recipe, FastV at the same FLOPs and the "
                        "recipe's schedule with random picks (scripts/bench_gpu.py's controls): what the schedule "
                        "costs beyond one pruning layer, and what scoring costs beyond the schedule")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "profile_prefill.json"))
    p.add_argument("--tiny", action="store_true",
                   help="a tiny geometry on the CPU (float32, aten-op CPU time instead of CUDA kernels): a smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
        if args.graphs != "off":
            p.error("--graphs needs a CUDA GPU; --tiny runs on the CPU")
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (run it through the device tool), or --tiny for a CPU smoke run")
        bench_gpu.set_sdpa_backends("flash,efficient,math")
        device, dtype = torch.device("cuda"), torch.bfloat16
    geo = bench_gpu.BUILDERS[args.geometry](args.tiny, device, dtype)
    wanted = {int(b) for b in args.recipes.split(",") if b}
    recipes = [m for m in geo.recipes if round(m.budget * 100) in wanted]
    twins = {t for t in args.twins.split(",") if t}
    if twins - {"fastv", "random"}:
        p.error(f"--twins takes fastv and/or random; got {args.twins!r}")
    recipes = [twin for m in recipes for twin in (
        [m] + ([bench_gpu._fastv_match(geo, m)] if "fastv" in twins else [])
        + ([bench_gpu._random_twin(m)] if "random" in twins else []))]
    results = []
    kind = "aten ops (CPU)" if args.tiny else "kernels"
    span = "aten ops' self CPU time inside" if args.tiny else "kernel time inside"
    for batch in [int(b) for b in args.batches.split(",") if b]:
        inputs = geo.make_inputs(batch)
        configs = [("unpruned", None)] + [(m.label, m.recipe) for m in recipes]
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.graphs]
        for (label, recipe), graphs in [(c, g) for g in modes for c in configs]:
            label = label + ("+graphs" if graphs else "")
            handle = fitprune.apply(geo.model, recipe) if recipe is not None else None
            try:
                res = profile_one(geo.model, inputs, args.repeats, graphs)
            finally:
                if handle is not None:
                    handle.remove()
            res.update(geometry=args.geometry, batch=batch, label=label)
            results.append(res)
            print(f"\n== {args.geometry} batch {batch} {label}: wall {res['wall_ms']:.1f} ms, {kind} "
                  f"{res['kernel_ms']:.1f} ms, host-bound gap {res['wall_ms'] - res['kernel_ms']:.1f} ms, "
                  f"{res['launches']:.0f} launches")
            if recipe is not None and not graphs:
                share = {k: 100 * v / res["kernel_ms"] for k, v in res["fitprune_ranges_ms"].items()}
                launches = {k: sum(n for _, _, n in top) for k, top in res["range_kernels"].items()}
                print(f"   fitprune ranges ({span}): " + ", ".join(
                    f"{k} {v:.2f} ms ({share[k]:.1f} %, {launches[k]:.0f} launches)"
                    for k, v in res["fitprune_ranges_ms"].items() if v))
                for key, top in res["range_kernels"].items():
                    for name, ms, n in top[:6]:
                        print(f"     {key:<12} {ms:7.2f} ms  x{n:<5.0f} {name}")
            for cat, ms in sorted(res["by_category"].items(), key=lambda kv: -kv[1]):
                print(f"   {cat:<22} {ms:8.2f} ms  {100 * ms / res['kernel_ms']:5.1f} %")
            for name, ms, n in res["top"]:
                print(f"     {ms:7.2f} ms  x{n:<5.0f} {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
