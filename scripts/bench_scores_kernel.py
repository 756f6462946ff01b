"""Time FitPrune's fused scoring kernel against the attention of the same layer, in one run.

For each 7B geometry (batch 8, the layer's full visual set: the first pruning layer's case, the most
expensive one), on random bf16 queries and keys:

* ``attention``: stock SDPA (``is_causal``) of the layer, the baseline every ratio is taken against;
* ``scores``: ``fused_scores.fused_cross_self_flags`` as the pruner calls it: both passes (pass 1 computes
  the row log-sum-exp), and pass 2 alone on the attention's own log-sum-exp (``lse_attention``), as the
  pruner runs it under SDPA, where SDPA's backend returns one (for grouped keys, flash);
* with ``--tiles``, the same calls under other tile shapes, warps and pipeline stages of this version
  (``BMxBN:WARPS:STAGES[:ROWS1]``: pass 2's tile rows × keys, warps and stages; ``ROWS1``, pass 1's tile
  rows, default ``fused_scores.ROW_STATS_BLOCK_M``, with 4 warps at 64 rows and 8 at more), each with
  the largest relative difference of its scores from the default tiles';
* with ``--baseline PATH``, the same calls on another version of the kernel, and the largest relative
  difference of its scores from this version's. PATH is a tree holding that version's ``fitprune/kernels``
  (``git archive OLD fitprune | tar -x -C .baseline``, then ``--baseline .baseline``), or that package
  directory itself, or, for versions before the kernels left ``fused_scores.py`` (c473ab1 and earlier: one
  file), that file (``git show OLD:fitprune/kernels/fused_scores.py > /tmp/old.py``).

Prints one table, writes JSON rows (``--out``) as each geometry finishes. CUDA only::

    python scripts/bench_scores_kernel.py --out benchmarks/scores-kernel.json [--baseline .baseline]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitprune import lse_attention  # noqa: E402
from fitprune.kernels import fused_scores  # noqa: E402

# (name, query heads, key heads, head dim, tokens before the image, visual tokens, text tokens after it)
GEOMETRIES = {
    "llava-1.5-7b": (32, 32, 128, 35, 576, 40),
    "llava-next-7b": (32, 32, 128, 35, 2928, 40),
    "qwen2-vl-7b": (28, 4, 128, 36, 968, 41),
}


def _load(path: str):
    """The baseline's ``fused_scores`` module: from a single file, its relative imports resolve inside this
    tree's ``fitprune.kernels``; from a tree, the baseline's whole kernels package is loaded under another
    name, so its ``fused_scores`` launches its own kernels."""
    where = Path(path)
    if where.is_file():
        spec = importlib.util.spec_from_file_location("fitprune.kernels._baseline_scores", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    package = where / "fitprune" / "kernels" if (where / "fitprune" / "kernels").is_dir() else where
    if not (package / "__init__.py").is_file() or not (package / "fused_scores.py").is_file():
        raise SystemExit(f"--baseline {path}: expected a fused_scores.py file, a tree with fitprune/kernels/, or "
                         "a kernels package directory (with __init__.py and fused_scores.py)")
    name = "_baseline_kernels"
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:  # a package loaded before
        del sys.modules[loaded]
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])
    return importlib.import_module(f"{name}.fused_scores")


def _time(fn, repeats: int) -> float:
    """Median ms of ``repeats`` calls, CUDA events around each, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _case(heads: int, kv_heads: int, hd: int, before: int, n_vis: int, after: int, bsz: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    length = before + n_vis + after
    q = torch.randn(bsz, heads, length, hd, device="cuda", generator=gen, dtype=torch.bfloat16) * 1.5
    k = torch.randn(bsz, kv_heads, length, hd, device="cuda", generator=gen, dtype=torch.bfloat16) * 1.5
    v = torch.randn_like(k)
    visual = torch.zeros(bsz, length, dtype=torch.bool, device="cuda")
    visual[:, before:before + n_vis] = True
    text = ~visual
    valid = torch.ones_like(text)
    inverse = torch.tensor([[1 / (before + after), 1 / n_vis]] * bsz, device="cuda")
    return q, k, v, text, valid, visual, inverse


def _tiles(text: str) -> tuple[int, int, int, int, int]:
    try:
        blocks, warps, stages, *rows1 = text.split(":")
        bm, bn = blocks.lower().split("x")
        if len(rows1) > 1:
            raise ValueError(text)
        return int(bm), int(bn), int(warps), int(stages), int(rows1[0]) if rows1 else fused_scores.ROW_STATS_BLOCK_M
    except ValueError:
        raise argparse.ArgumentTypeError(f"tiles {text!r}: use BMxBN:WARPS:STAGES[:ROWS1], e.g. 128x64:8:3 or "
                                         "128x64:8:3:128") from None


def _with_tiles(tiles, fn):
    """``fn()`` with the kernel module's warps and stages set as ``tiles`` says, restored after."""
    _, _, warps, stages, rows1 = tiles
    names = ("ROW_STATS_WARPS", "CROSS_SELF_WARPS", "LSE_WARPS", "STAGES")
    saved = {n: getattr(fused_scores, n) for n in names}
    for n, value in zip(names, ((4 if rows1 <= 64 else 8), warps, warps, stages)):
        setattr(fused_scores, n, value)
    try:
        return fn()
    finally:
        for n, value in saved.items():
            setattr(fused_scores, n, value)


def _max_rel_diff(got, want) -> float:
    return max(float(((a - b).abs() / b.abs().clamp(min=1e-12)).max()) for a, b in zip(got, want))


def bench(name: str, bsz: int, repeats: int, baseline, tiles=()) -> list[dict]:
    heads, kv_heads, hd, before, n_vis, after = GEOMETRIES[name]
    q, k, v, text, valid, visual, inverse = _case(heads, kv_heads, hd, before, n_vis, after, bsz)
    scaling = hd ** -0.5
    row_start = 0
    rows = []

    def add(metric, value, unit, **extra):
        rows.append({"geometry": name, "batch": bsz, "metric": metric, "value": value, "unit": unit, **extra})

    gqa = heads != kv_heads
    attention_ms = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                enable_gqa=gqa), repeats)
    add("attention_ms", attention_ms, "ms")
    lse = None
    choice = lse_attention.backend(q, k, v, scaling)  # grouped keys: flash only (lse_attention)
    if choice is not None:
        lse = lse_attention.attend(q, k, v, scaling, choice)[1]
    modes = [("two passes", None)] + ([("attention LSE", lse)] if lse is not None else [])
    versions = {"this": fused_scores} | ({"baseline": baseline} if baseline is not None else {})
    outputs = {}
    for label, module in versions.items():
        for mode, given in modes:

            def call(module=module, given=given):
                return module.fused_cross_self_flags(q, k, None, scaling, row_start, text, valid, visual, inverse,
                                                     lse=given)

            ms = _time(call, repeats)
            outputs[label, mode] = call()
            add("scores_ms", ms, "ms", version=label, mode=mode)
            add("scores_over_attention", ms / attention_ms, "ratio", version=label, mode=mode)
    if baseline is not None:
        for mode, _ in modes:
            add("max_rel_diff_vs_baseline", _max_rel_diff(outputs["this", mode], outputs["baseline", mode]),
                "ratio", mode=mode)
    for t in tiles:
        label = f"{t[0]}x{t[1]}:{t[2]}:{t[3]}:{t[4]}"
        for mode, given in modes:

            def call(given=given, t=t):
                return _with_tiles(t, lambda: fused_scores.fused_cross_self_flags(
                    q, k, None, scaling, row_start, text, valid, visual, inverse, lse=given, block_m=t[0],
                    block_n=t[1], stats_block_m=t[4]))

            try:
                ms = _time(call, repeats)
            except Exception as err:  # noqa: BLE001  a shape the compiler refuses (shared memory, registers)
                add("tiles_failed", 1.0, "flag", tiles=label, mode=mode, error=str(err)[:200])
                continue
            add("scores_ms", ms, "ms", version="this", mode=mode, tiles=label)
            add("scores_over_attention", ms / attention_ms, "ratio", version="this", mode=mode, tiles=label)
            add("max_rel_diff_vs_default_tiles", _max_rel_diff(call(), outputs["this", mode]), "ratio", mode=mode,
                tiles=label)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--geometries", default=",".join(GEOMETRIES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--baseline", help="another version of the kernel: a tree with fitprune/kernels/, that package "
                                      "directory, or (one-file versions) its fused_scores.py")
    p.add_argument("--tiles", default="", help="comma list of BMxBN:WARPS:STAGES[:ROWS1] tile settings to try too")
    p.add_argument("--out", help="JSON file for the rows (rewritten after each geometry)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not fused_scores.supported(torch.device("cuda")):
        p.error("needs a CUDA GPU of compute capability >= 8.0 and Triton")
    names = [g.strip() for g in args.geometries.split(",") if g.strip()]
    unknown = sorted(set(names) - set(GEOMETRIES))
    if unknown:
        p.error(f"unknown geometries {unknown}; known: {', '.join(GEOMETRIES)}")
    baseline = _load(args.baseline) if args.baseline else None
    try:
        tiles = [_tiles(t.strip()) for t in args.tiles.split(",") if t.strip()]
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    print(f"bench_scores_kernel: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
          f"bf16, median of {args.repeats}", flush=True)
    rows = []
    for name in names:
        got = bench(name, args.batch, args.repeats, baseline, tiles)
        rows += got
        for r in got:
            tag = " ".join(f"{k}={r[k]}" for k in ("version", "mode", "tiles") if k in r)
            print(f"  {name:14s} {r['metric']:30s} {tag:52s} {r['value']:.4g} {r['unit']}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
