"""Write a random-weight LLaVA-1.5-7B checkpoint and a set of processed inputs for it, so that a whole
sweep (statistics shards, fits, evaluation shards) runs on a 7B geometry where no real checkpoint can
be had: the sweep's scale-out measured where its shards are heavy (issue 13).

    python scripts/random_checkpoint.py /tmp/r7b --samples 256            # on a GPU: ~13.5 GB of bf16 weights
    python scripts/random_checkpoint.py /tmp/rtiny --tiny --samples 8      # tiny geometry, CPU, seconds

writes ``DIR/model`` (``save_pretrained``: the geometry of ``scripts/bench_gpu.py``'s ``llava-1.5-7b``,
LLaMA-7B behind a one-layer CLIP tower at 336 px, 576 visual tokens; no processor) and ``DIR/inputs``
(a ``datasets`` directory of ``--samples`` processed inputs: ``id``, ``input_ids`` = 35 random system
tokens, the 576 image tokens, 40 random question tokens; ``pixel_values`` of random pixels), then
prints the sweep that reads them::

    fitprune sweep --model DIR/model --source hf:DIR/inputs --benchmarks hf:DIR/inputs --device cuda ...

Random weights answer nothing: ``hf:`` inputs are scored by agreement with the unpruned model's next
token, and the numbers that matter are times. The inputs depend only on ``--seed`` and their index.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu, beside this file

import bench_gpu  # noqa: E402  (puts the checkout on sys.path, sets HF_HUB_OFFLINE)
from transformers import LlavaForConditionalGeneration  # noqa: E402


def random_inputs(n: int, vocab: int, image_id: int, n_visual: int, image_size: int, seed: int):
    """``n`` processed inputs as columns: ``id``, ``input_ids`` (int64, system + image tokens + question)
    and ``pixel_values`` (float32, 3 x size x size); sample ``i`` depends only on ``seed`` and ``i``."""
    ids, tokens, pixels = [], [], np.empty((n, 3, image_size, image_size), dtype=np.float32)
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        system = bench_gpu._text_ids(gen, bench_gpu.N_SYSTEM, vocab - 10)  # as bench_gpu's own inputs
        question = bench_gpu._text_ids(gen, bench_gpu.N_TEXT, vocab - 10)
        tokens.append(np.array(system + [image_id] * n_visual + question, dtype=np.int64))
        pixels[i] = torch.randn(3, image_size, image_size, generator=gen).numpy()
        ids.append(f"r{seed}-{i}")
    return {"id": ids, "input_ids": np.stack(tokens), "pixel_values": pixels}


def write_inputs(columns: dict, out: Path) -> None:
    """The columns as a ``datasets`` directory (what the sweep's ``hf:`` source reads)."""
    import datasets

    size = columns["pixel_values"].shape[-1]
    features = datasets.Features({
        "id": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "pixel_values": datasets.Array3D(shape=(3, size, size), dtype="float32"),
    })
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a new (or empty) directory; model/ and inputs/ are written in it")
    p.add_argument("--tiny", action="store_true", help="bench_gpu's tiny geometry (hidden 64, 256 visual tokens)")
    p.add_argument("--samples", type=int, default=256, help="processed inputs to write (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the inputs (default 0)")
    p.add_argument("--device", default=None,
                   help="where the weights are initialised (default cuda when available: a 7B init on the CPU "
                        "takes minutes)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="weight dtype (default bfloat16 on CUDA, float32 on the CPU)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples must be at least 1, got {args.samples}")
    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.error(f"{out} already exists and is not an empty directory; pass a new directory")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    config = bench_gpu.llava_config(args.tiny)
    vocab, image_id = config.text_config.vocab_size, config.image_token_id
    size = config.vision_config.image_size
    n_visual = (size // config.vision_config.patch_size) ** 2
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = bench_gpu._build(LlavaForConditionalGeneration, config, device, dtype)
    n_params = sum(t.numel() for t in model.parameters())
    model.save_pretrained(out / "model")
    del model
    t1 = time.perf_counter()
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"model: {n_params / 1e6:,.1f} M parameters, {dtype_name}, {n_visual} visual tokens → {out / 'model'} "
          f"({t1 - t0:.1f} s)", flush=True)
    write_inputs(random_inputs(args.samples, vocab, image_id, n_visual, size, args.seed), out / "inputs")
    print(f"inputs: {args.samples} samples of {bench_gpu.N_SYSTEM + n_visual + bench_gpu.N_TEXT} tokens → "
          f"{out / 'inputs'} ({time.perf_counter() - t1:.1f} s)")
    print(f"sweep them: fitprune sweep --model {out / 'model'} --source hf:{out / 'inputs'} "
          f"--benchmarks hf:{out / 'inputs'} --device {device.type} --dtype {dtype_name} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
