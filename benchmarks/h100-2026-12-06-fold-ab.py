"""Same-process A/B of this session's compaction changes: A = torch.gather rows + generic-sum fold (the
old engine), B = take_rows without the survivors sum, C = take_rows + survivors sum (the new engine).
Eager LM forward (logits_to_keep=1) of bench_gpu's geometries at batch 8, CUDA events, rounds
alternate the variants (A B C, C B A, ...). A keeps the new put_rows of the final norm (once per
forward). A record of the run: `OUT=DIR python benchmarks/h100-2026-12-06-fold-ab.py` from the
repository root on a CUDA machine (TINY=1: tiny geometries on the CPU, a smoke run)."""
import json, os, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
import bench_gpu, fitprune
from fitprune import mlp_rows, prune

real_survivors, real_take = mlp_rows.survivors, prune.take_rows

class Off(mlp_rows.Survivors):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

def off(rows, sel, length, zero=None):
    out = torch.Tensor._make_subclass(Off, mlp_rows.stand_in(rows, length, zero))
    out.rows, out.sel, out.taken = rows, sel, False
    return out

old_take = lambda x, sel: torch.gather(x, 1, sel[..., None].expand(-1, -1, x.shape[-1]))
VARIANTS = {"A_gather_nofold": (old_take, off), "B_take_nofold": (real_take, off), "C_take_fold": (real_take, real_survivors)}

def set_variant(v):
    prune.take_rows, mlp_rows.survivors = VARIANTS[v]

TINY = os.environ.get("TINY") == "1"
DEV, DT = (torch.device("cpu"), torch.float32) if TINY else (torch.device("cuda"), torch.bfloat16)
if not TINY:
    bench_gpu.set_sdpa_backends("flash,efficient,math")
out = []
for name, budgets in (("llava-next-7b", (40, 75)), ("qwen2-vl-7b", (40, 75))):
    geo = bench_gpu.BUILDERS[name](TINY, DEV, DT)
    inputs = geo.make_inputs(8)
    for m in [m for m in geo.recipes if round(m.budget * 100) in budgets]:
        times = {v: [] for v in VARIANTS}
        with fitprune.apply(geo.model, m.recipe), torch.no_grad():
            order = list(VARIANTS)
            for rnd in range(6):
                for v in (order if rnd % 2 == 0 else order[::-1]):
                    set_variant(v)
                    for _ in range(2):
                        geo.model(**inputs, use_cache=True, logits_to_keep=1)
                    for _ in range(4):
                        if TINY:
                            t0 = time.perf_counter(); geo.model(**inputs, use_cache=True, logits_to_keep=1)
                            times[v].append((time.perf_counter() - t0) * 1e3); continue
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record(); geo.model(**inputs, use_cache=True, logits_to_keep=1); b.record(); b.synchronize()
                        times[v].append(a.elapsed_time(b))
        set_variant("C_take_fold")
        med = {v: statistics.median(t) for v, t in times.items()}
        row = dict(gpu="cpu" if TINY else torch.cuda.get_device_name(), geometry=name, recipe=m.label, n=len(times["A_gather_nofold"]), median_ms=med,
                   B_over_A=med["B_take_nofold"] / med["A_gather_nofold"], C_over_A=med["C_take_fold"] / med["A_gather_nofold"],
                   C_over_B=med["C_take_fold"] / med["B_take_nofold"], all_ms=times)
        out.append(row)
        print(f"{name} {m.label}: " + ", ".join(f"{v} {ms:.1f}" for v, ms in med.items())
              + f" | B/A {row['B_over_A']:.4f} C/A {row['C_over_A']:.4f} C/B {row['C_over_B']:.4f}", flush=True)
        Path(os.environ["OUT"], "fold_ab.json").write_text(json.dumps(out, indent=1))
    del geo; torch.cuda.empty_cache()
