#!/usr/bin/env python
"""Time the fused selection kernel (``fitprune.kernels.fused_select``) under several warp counts.

For batch 1 and 8 and rows of 3003, 1045 and 651 slots (the scored rows of LLaVA-NeXT-7B, Qwen2-VL-7B and
LLaVA-1.5-7B), on random scores with a tenth of the candidates dropped, it calls
``fused_select_compact`` with each warp count in ``--warps`` (through ``fused_select.warps``, the
library's choice, replaced for the call) and prints µs per call: CUDA events around ``--repeats``
back-to-back calls after three warm-up calls. A call this small is partly host-bound (the wrapper
allocates eight outputs), so only differences above that floor are the kernel's. Each output is
compared with the library's own warp choice; a difference is printed as DIFF. CUDA only::

    python scripts/bench_select_kernel.py [--warps 4,8,16,32] [--repeats 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitprune.kernels import fused_select  # noqa: E402

ROWS = (3003, 1045, 651)


def case(bsz: int, n_slots: int, drop: int):
    """Inputs of ``fused_select_compact``: scores, candidates (all but 35 leading and 40 trailing
    slots), k, valid, idx, visual, text, real."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(bsz, n_slots, device="cuda", generator=gen)
    candidates = torch.zeros(bsz, n_slots, dtype=torch.bool, device="cuda")
    candidates[:, 35:n_slots - 40] = True
    k = torch.full((bsz,), drop, device="cuda", dtype=torch.int64)
    valid = torch.ones(bsz, n_slots, dtype=torch.bool, device="cuda")
    idx = torch.arange(n_slots, device="cuda").expand(bsz, n_slots).contiguous()
    return scores, candidates, k, valid, idx, candidates.clone(), ~candidates, valid.clone()


def per_call_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warps", default="4,8,16,32", help="comma list of warp counts to try")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or fused_select.triton is None:
        p.error("needs a CUDA GPU and Triton (run it through the device tool)")
    try:
        counts = [int(w) for w in args.warps.split(",") if w.strip()]
    except ValueError:
        p.error(f"--warps takes a comma list of integers, e.g. 4,8,16,32; got {args.warps!r}")
    library = fused_select.warps
    print(f"bench_select_kernel: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{args.repeats} calls per figure", flush=True)
    for bsz in (1, 8):
        for n_slots in ROWS:
            inputs = case(bsz, n_slots, n_slots // 10)
            new_len = n_slots - n_slots // 10
            want = fused_select.fused_select_compact(*inputs, new_len)
            line = []
            for count in counts:
                fused_select.warps = lambda block, count=count: count
                try:
                    got = fused_select.fused_select_compact(*inputs, new_len)
                    same = all(torch.equal(got[name], want[name]) for name in want)
                    us = per_call_us(lambda: fused_select.fused_select_compact(*inputs, new_len), args.repeats)
                    line.append(f"{count}w {us:6.1f}us{'' if same else ' DIFF'}")
                except Exception as err:  # noqa: BLE001  a warp count the compiler refuses
                    line.append(f"{count}w failed {str(err)[:60]}")
                finally:
                    fused_select.warps = library
            print(f"B={bsz} L={n_slots}: " + "  ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
