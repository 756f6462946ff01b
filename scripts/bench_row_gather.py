#!/usr/bin/env python
"""Row gathers of the hidden states: the library's ``fitprune.rows.take_rows`` against the ways torch offers.

A pruning layer gathers the survivors' rows of a (B, L, D) bf16 tensor twice. This times, on the GPU,
each way of doing it at the geometries of ``scripts/bench_gpu.py`` (batch 8, the first pruning layer:
every slot in, the recipe's survivors out), median of ``--iters`` CUDA-event timings, and prints each
as a ratio against ``torch.gather`` with the index broadcast over D (the engine's way before
``take_rows``), with the bandwidth reached. Every way is checked to give the same bits first. The JSON's
rows load into the ``benchmarks`` table (``fitprune import-benchmarks``): metric ``row_gather_ms``,
``ratio_vs_unpruned`` holding the ratio against ``torch.gather`` in the same run.

    python scripts/bench_row_gather.py                      # on a CUDA machine
    python scripts/bench_row_gather.py --device cpu --iters 5   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fitprune import rows  # noqa: E402

SHAPES = {  # name: (batch, slots, hidden size, survivors)
    "llava-1.5-7b": (8, 651, 4096, 420),
    "llava-next-7b": (8, 3003, 4096, 1830),
    "qwen2-vl-7b": (8, 1045, 3584, 660),
}


def _flat_index(sel: torch.Tensor, length: int) -> torch.Tensor:
    base = torch.arange(sel.shape[0], device=sel.device)[:, None] * length
    return (sel + base).reshape(-1)


def _flat(x: torch.Tensor, sel: torch.Tensor, wide: bool, take) -> torch.Tensor:
    """The rows ``sel`` of ``x`` through its flattened (B·L, D) view (in wide words if ``wide``), by ``take``
    (flat rows, flat index) -> rows."""
    src = rows.wide_view(x) if wide else x
    out = take(src.reshape(-1, src.shape[-1]), _flat_index(sel, x.shape[1]))
    return out.view(x.dtype).view(sel.shape[0], sel.shape[1], x.shape[-1])


WAYS = {
    "gather": lambda x, sel: torch.gather(x, 1, sel[..., None].expand(-1, -1, x.shape[-1])),
    "take_rows": rows.take_rows,
    "index_select": lambda x, sel: _flat(x, sel, False, lambda t, i: t.index_select(0, i)),
    "index_select_wide": lambda x, sel: _flat(x, sel, True, lambda t, i: t.index_select(0, i)),
    "indexing_wide": lambda x, sel: _flat(x, sel, True, lambda t, i: t[i]),
}


def time_ms(fn, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "bench_row_gather.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run it through the device tool, or pass --device cpu for a smoke run")
    results = []
    meta = dict(gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), dtype="bfloat16")
    for name, (bsz, slots, dim, kept) in SHAPES.items():
        if device.type == "cpu":
            bsz, slots, kept = 2, slots // 8, kept // 8
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(bsz, slots, dim, generator=gen).to(device, torch.bfloat16)
        sel = torch.stack([torch.randperm(slots, generator=gen)[:kept].sort().values for _ in range(bsz)]).to(device)
        want = WAYS["gather"](x, sel)
        moved = 2 * want.numel() * want.element_size()  # bytes read and written
        base = None
        for way, fn in WAYS.items():
            got = fn(x, sel)
            if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
                raise SystemExit(f"{way} gathers other bits than torch.gather at {name}")
            ms = time_ms(lambda: fn(x, sel), args.iters, device)
            base = ms if base is None else base
            results.append(dict(meta, geometry=name, batch=bsz, method="row-gather", label=way,
                                recipe=f"{slots} slots -> {kept} kept, D {dim}", metric="row_gather_ms", unit="ms",
                                value=ms, ratio_vs_unpruned=ms / base, gb_per_s=moved / ms / 1e6))
            print(f"{name:<14} {way:<18} {ms:8.4f} ms  {ms / base:5.2f} x gather  {moved / ms / 1e6:7.0f} GB/s",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
