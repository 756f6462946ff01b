"""Time one stock decoder layer of a 7B language model at every token count a pruned prefill visits.

A pruned prefill runs each decoder layer on the tokens left there, so its time is close to the sum over
layers of what one stock layer takes on that many tokens. This script measures that curve, ``t(n)`` at
batch ``B`` (random bf16 weights; LLaVA-1.5 and LLaVA-NeXT share Vicuna-7B's widths, Qwen2-VL-7B has
its own), each point replayed from a CUDA graph that runs the layer ``--chain`` times in a row (no launch
gaps, as in a graphed prefill), under SDPA with the causal mask (the stock model's path).
:mod:`fitprune.latency` reads the JSON: what a schedule costs in time with no pruner overhead, and the
fastest schedule at a FLOPs budget (``scripts/latency_ceilings.py``). CUDA only::

    python scripts/bench_layer_latency.py --out benchmarks/layer-latency.json

Writes the JSON (``{"meta": ..., "curves": [{"model", "batch", "tokens", "ms"}], "rows": [...]}``) after
each curve, so a cut-off run keeps what it measured; ``rows`` holds every point in ``bench_gpu.py``'s row
form (metric ``layer_ms``, label ``"<n> tokens"``), so ``fitprune import-benchmarks`` loads the curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import _llama_text, qwen2_vl_text  # noqa: E402

MODELS = ("llama-7b", "qwen2-7b")  # llama-7b: LLaVA-1.5's and LLaVA-NeXT's; qwen2-7b: Qwen2-VL-7B's


def _tokens(spec: str) -> list[int]:
    """``"A:B:S"`` → A, A+S, ... up to B (B included when it falls on the grid), or a comma list."""
    try:
        if ":" in spec:
            lo, hi, step = (int(x) for x in spec.split(":"))
            got = list(range(lo, hi + 1, step))
        else:
            got = [int(x) for x in spec.split(",")]
    except ValueError:
        got = []
    if not got or min(got) < 1:
        raise argparse.ArgumentTypeError(f"tokens {spec!r}: use A:B:STEP (e.g. 16:3072:32) or a comma list of "
                                         "positive counts")
    return got


def text_config(name: str):
    """The language-model config of ``name`` (one of :data:`MODELS`), as the 7B geometries of bench_gpu.py."""
    if name == "llama-7b":
        return _llama_text(False, 32000)
    from transformers import Qwen2VLConfig
    return Qwen2VLConfig(text_config=qwen2_vl_text(False)).text_config


def build(name: str, device: torch.device):
    """(text model with one decoder layer, whether positions are 3D (Qwen2-VL's M-RoPE))."""
    config = text_config(name)
    config.num_hidden_layers = 1
    if name == "llama-7b":
        from transformers import LlamaModel as cls
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel as cls
    with torch.device(device):
        model = cls._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval(), name != "llama-7b"


def layer_ms(model, mrope: bool, batch: int, n: int, chain: int, repeats: int) -> float:
    """Median ms of one layer on ``n`` tokens: a CUDA graph of ``chain`` layer calls, replayed ``repeats``
    times, each replay timed with CUDA events."""
    device = next(model.parameters()).device
    hidden = model.config.hidden_size
    x = torch.randn(batch, n, hidden, device=device, dtype=torch.bfloat16)
    pos = torch.arange(n, device=device)[None].expand(batch, n)
    if mrope:
        pos = pos[None].expand(3, batch, n)
    layer = model.layers[0]
    with torch.no_grad():
        pe = model.rotary_emb(x, pos)

        def step():
            h = x
            for _ in range(chain):
                out = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
                h = out[0] if isinstance(out, tuple) else out
            return h

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / chain)
    del graph
    return sorted(times)[len(times) // 2]


def rows_of(meta: dict, curves: list[dict]) -> list[dict]:
    """Every point of ``curves`` as a ``benchmarks`` row (the fields ``storage.benchmarks`` reads)."""
    common = {k: meta[k] for k in ("gpu", "torch", "transformers", "date", "dtype", "attn")}
    return [dict(common, geometry=c["model"], batch=c["batch"], method="stock layer", label=f"{n} tokens",
                 budget=None, recipe=f"one decoder layer on {n} tokens, graphed, {meta['chain']} in a row",
                 cuda_graphs=True, metric="layer_ms", unit="ms", value=ms, ratio_vs_unpruned=None, flops_ratio=None)
            for c in curves for n, ms in zip(c["tokens"], c["ms"])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=_tokens, default=_tokens("16:3104:32"), help="A:B:STEP or a comma list")
    p.add_argument("--chain", type=int, default=8, help="layer calls per graph replay")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True, help="JSON file, rewritten after each curve")
    args = p.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (it times CUDA graphs)")
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cuda")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": "bfloat16", "attn": "sdpa", "chain": args.chain,
            "repeats": args.repeats, "command": " ".join(sys.argv)}
    import transformers
    meta["transformers"] = transformers.__version__
    curves = []
    out = Path(args.out)
    t0 = time.perf_counter()
    for name in models:
        model, mrope = build(name, device)
        for batch in batches:
            ms = []
            for n in args.tokens:
                ms.append(layer_ms(model, mrope, batch, n, args.chain, args.repeats))
            curves.append({"model": name, "batch": batch, "tokens": list(args.tokens), "ms": ms})
            out.write_text(json.dumps({"meta": meta, "curves": curves, "rows": rows_of(meta, curves)}, indent=1))
            head = ", ".join(f"{n}: {m:.3f}" for n, m in list(zip(args.tokens, ms))[:: max(1, len(ms) // 8)])
            print(f"{name} b{batch}: {len(ms)} points in {time.perf_counter() - t0:.0f} s; ms per layer {head}",
                  flush=True)
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
