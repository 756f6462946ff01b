#!/usr/bin/env python
"""Speed benchmark of fitprune on full-size random-weight VLMs (DESIGN.md §7, "Speed").

Speed does not depend on weights, so each geometry is built with random weights directly on the GPU
in bf16: the language model at the real 7B widths, the vision tower deliberately tiny (so build time
and memory go to the language model; the tower still runs, because fitprune finds the visual tokens
in ``input_ids`` and the model needs pixel inputs to fill them).

Geometries (prompt = system + visual + text tokens, every sample of a batch alike, no padding):

* ``llava-1.5-7b``   Llama 4096 wide, 32 layers, 32/32 heads, MLP 11008, vocab 32000; 35 + 576 + 40.
* ``llava-next-7b``  same text model; one 672x672 image = 5 tiles of 336 px → 2928 visual tokens
                     (576 base + 48x48 + 48 newlines, counted from the model); 35 + 2928 + 40.
* ``qwen2-vl-7b``    Qwen2 3584 wide, 28 layers, 28/4 heads, MLP 18944, vocab 152064, M-RoPE
                     [16, 24, 24]; grid 1x44x88 patches → 968 tokens; 35 + (1 + 968 + 1) + 40.

Per geometry and batch size (bf16, SDPA, ``torch.no_grad``, CUDA events, warm-up + median; the first,
cold call of every configuration is reported too, as ``prefill_cold_ms``):

1. unpruned prefill: whole forward and the language model alone (events from hooks on
   ``model.model.language_model``); prefill = ``model(**inputs, use_cache=True, logits_to_keep=1)``,
   as ``generate`` runs it;
2. FitPrune at about -40 / -60 / -75 % FLOPs: LLaVA-1.5 the published presets ``/40 /60 /70``;
   LLaVA-NeXT the presets ``/40 /60`` plus a *uniform stand-in* for 75; Qwen2-VL uniform stand-ins
   at 0.40 / 0.60 / 0.75 (a uniform schedule, scoring="fitprune", sized with
   ``baselines.for_budget``: it stands in for a fitted recipe, which needs real weights and data);
3. FastV (K=2) at the FLOPs each FitPrune recipe really removes (``baselines.for_budget``); with the part
   ``oneshot``, also that schedule scored by FitPrune's rule (label ``oneshot@P``: one pruning layer, c·s
   scores, as the search's one-layer seeds with FitPrune scoring), a schedule chosen for time, not FLOPs;
4. ``collect_stats`` on one batch vs a plain forward of that batch (use_cache=False, full logits);
5. greedy decode after a pruned prefill vs unpruned (``generate`` with min = max new tokens, after a
   short warm-up call; decode time runs from the end of the prefill forward to the end of the last
   forward, so tokens/s = batch x (new tokens - 1) / that time);
6. peak memory (``torch.cuda.max_memory_allocated``, reset before each measurement; total and
   above what was allocated before the call) and KV-cache bytes after a prefill;
7. the share of pruned-prefill time spent scoring, two ways: (a) the library's own stage timer
   (``fitprune.profiling.StageTimer(sync=True)``: a synchronise before and after each of the pruner's
   ``scoring`` and ``selection`` stages) in a separate run (the syncs cost time themselves:
   ``sync_overhead`` = synced / normal prefill time; ``selection`` includes the sort that lays out the
   kept slots),
   (b) the same schedule with scoring="random" (share = 1 - t_random / t_recipe; a lower bound, since
   random scores are drawn on the CPU and copied to the GPU at each pruning layer);
8. FitPrune's scores with and without the fused Triton kernel (``--fused-scores both``, the default on
   a GPU with Triton): each FitPrune recipe is also measured with ``fused_scores=False`` (label
   ``<recipe>/torch-scores``: prefill, memory, synced scoring; no decode, which the kernel does not
   touch), and so is ``collect_stats`` (``collect_stats/torch-scores``). Without CUDA or Triton only
   the torch path runs;
9. the prefill replayed from CUDA graphs (``fitprune.graph_prefill``, ``--cuda-graphs both``, the
   default on a GPU): the unpruned model and every FitPrune / FastV recipe again with the language
   model's prefill captured once per configuration and replayed (label ``<label>+graphs``, rows with
   ``cuda_graphs`` true; prefill, memory, decode). Their ratios are against the unpruned model
   *with graphs*, measured in the same run; ``prefill_cold_ms`` of these rows includes the capture.

SDPA backends: by default only flash / memory-efficient / math are allowed (``--sdpa-backends``). With
torch 2.11 on an H100 the default choice is cuDNN attention, which builds an execution plan for every
new sequence length: a pruned prefill has a new length after each pruning layer, so the first call of
a 26-layer recipe spends seconds there (cold-call profile: 65 % of CPU time in
``aten::_cudnn_attention_forward``), which would eat the run's time budget. ``--sdpa-backends default``
measures torch's own choice.

Every figure is also given as a ratio against the unpruned model measured in the same run
(``ratio_vs_unpruned``), next to ``flops_ratio`` = pruned / unpruned language-model prefill FLOPs
from the executed token counts of ``fitprune.last_report`` ("full" convention; the ideal speed-up is
1 / flops_ratio). Rows go to ``--out`` (JSON, or Parquet if it ends in .parquet), rewritten after
every configuration (method × graph mode of one geometry and batch), so a run cut short keeps every
configuration it finished.

Run from the repository root::

    python scripts/bench_gpu.py                       # all geometries, batches 1 and 8: ~3.5 min on an H100
    python scripts/bench_gpu.py --batches 16          # batch 16 on its own (about as long again)
    python scripts/bench_gpu.py --sdpa-backends default --geometries llava-1.5-7b   # torch's own SDPA choice
    python scripts/bench_gpu.py --tiny                # tiny geometries, end to end in < 1 min (CPU ok)
    python scripts/bench_gpu.py --fused-scores off    # FitPrune scores by the torch path only

``--budgets 60`` / ``--parts prefill,fastv`` / ``--geometries`` narrow a run down.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing fitprune

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches  # noqa: E402

import fitprune  # noqa: E402
from fitprune import baselines, profiling  # noqa: E402
from fitprune.flops import ModelDims, prefill_flops, recipe_reduction  # noqa: E402
from fitprune.kernels import fused_scores  # noqa: E402
from fitprune.presets import preset  # noqa: E402
from fitprune.recipe import Recipe, RecipeError  # noqa: E402
from fitprune.stats import collect_stats  # noqa: E402

GEOMETRIES = ("llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b")
PARTS = ("prefill", "fastv", "random", "scoring", "memory", "decode", "stats", "oneshot")
DEFAULT_PARTS = PARTS[:-1]  # "oneshot" only when asked
TORCH_SCORES = "/torch-scores"  # label suffix: the same recipe scored without the fused kernel
GRAPHS = "+graphs"  # label suffix: the same configuration with the prefill replayed from CUDA graphs
N_SYSTEM, N_TEXT = 35, 40  # LLaVA-1.5's system prompt before the image; a short question after it
MB = 1024 * 1024


# ----------------------------------------------------------------------------------------- timing


class Clock:
    """CUDA events on a GPU (read after a synchronize), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


class CallTimer:
    """Marks the start and end of every call of ``module`` (the pre-hook runs before other hooks,
    the post-hook after fitprune's, so the pruner's own work is inside the interval)."""

    def __init__(self, module: torch.nn.Module, clock: Clock):
        self.clock = clock
        self.calls: list[list] = []
        self._handles = [
            module.register_forward_pre_hook(self._pre, prepend=True),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module, args):
        self.calls.append([self.clock.mark(), None])

    def _post(self, module, args, output):
        self.calls[-1][1] = self.clock.mark()

    def durations(self) -> list[float]:
        self.clock.sync()
        return [self.clock.seconds(a, b) for a, b in self.calls if b is not None]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_fused_scores(requested: str, device: torch.device) -> str:
    """The fused-kernel mode of the run (on, off or both) as it can be measured: without CUDA or Triton
    only the torch path exists, so anything becomes off. Each configuration then passes its setting to
    ``fitprune.apply`` explicitly (:meth:`Bench.fused_setting`)."""
    if requested != "off" and not fused_scores.supported(device):
        print(f"--fused-scores {requested}: the fused kernel needs a CUDA GPU and Triton; measuring the torch "
              "path only", flush=True)
        requested = "off"
    return requested


# ------------------------------------------------------------------------------------ geometries


@dataclass
class Method:
    """One measured configuration: a recipe (None = unpruned) and how it was made."""

    label: str  # unique within a geometry: "unpruned", "fitprune@40", "fastv@40", "fitprune@40/random"
    method: str  # unpruned | fitprune | fastv | random (same schedule as `of`, random picks)
    budget: float | None  # nominal fraction of FLOPs to remove (preset percent / 100, or the target)
    recipe: Recipe | None
    source: str  # where the schedule comes from
    of: str | None = None  # for controls: the label whose schedule they copy
    torch_scores: bool = False  # score with the torch path even where the fused kernel is available
    graphs: bool = False  # language-model prefill replayed from CUDA graphs (fitprune.graph_prefill)


@dataclass
class Geometry:
    name: str
    model: torch.nn.Module
    make_inputs: Callable[[int], dict]
    n_visual: int
    n_other: int
    dims: ModelDims
    family: str
    build_s: float
    recipes: list[Method] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _text_ids(gen: torch.Generator, n: int, high: int) -> list[int]:
    return torch.randint(10, high, (n,), generator=gen).tolist()


def _rows_to_inputs(rows: list[list[int]], device) -> dict:
    ids = torch.tensor(rows, dtype=torch.long, device=device)  # equal lengths: no padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _build(cls, config, device: torch.device, dtype: torch.dtype):
    """Random weights made directly on ``device`` in ``dtype`` (a 7B init on the CPU takes minutes)."""
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    if device.type == "cuda":
        torch.cuda.synchronize()  # initialisation runs asynchronously: count it in the build time
    return model


def _llama_text(tiny: bool, vocab: int) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                           pad_token_id=0, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=0, tie_word_embeddings=False)


def _clip(image_size: int) -> CLIPVisionConfig:
    # deliberately small: 1 layer, 64 wide; patch 14 as in CLIP ViT-L/14-336
    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            image_size=image_size, patch_size=14, projection_dim=64)


def llava_config(tiny: bool) -> LlavaConfig:
    """LLaVA-1.5-7B's language model (or the tiny one) behind a small CLIP tower at 336 px (224 tiny):
    24 x 24 = 576 visual tokens (16 x 16 = 256); the image token is the vocabulary's last id."""
    vocab = 1024 if tiny else 32000
    size = 224 if tiny else 336  # 336 / 14 = 24 → 576 patches
    return LlavaConfig(vision_config=_clip(size), text_config=_llama_text(tiny, vocab), image_token_id=vocab - 1,
                       vision_feature_layer=-1, vision_feature_select_strategy="default")


def build_llava(tiny: bool, device, dtype) -> Geometry:
    config = llava_config(tiny)
    vocab, image_id, size = config.text_config.vocab_size, config.image_token_id, config.vision_config.image_size
    t0 = time.perf_counter()
    model = _build(LlavaForConditionalGeneration, config, device, dtype)
    build_s = time.perf_counter() - t0
    n_vis = (size // 14) ** 2

    def make_inputs(batch: int) -> dict:
        gen = torch.Generator().manual_seed(batch)
        rows = [_text_ids(gen, N_SYSTEM, vocab - 10) + [image_id] * n_vis + _text_ids(gen, N_TEXT, vocab - 10)
                for _ in range(batch)]
        out = _rows_to_inputs(rows, device)
        out["pixel_values"] = torch.randn(batch, 3, size, size, generator=gen).to(device, dtype)
        return out

    geo = Geometry("llava-1.5-7b", model, make_inputs, n_vis, N_SYSTEM + N_TEXT,
                   ModelDims.from_config(config.text_config), "llava", build_s)
    geo.recipes = [
        Method(f"fitprune@{p}", "fitprune", p / 100, preset(f"llava-1.5-7b/{p}"), f"preset llava-1.5-7b/{p}")
        for p in (40, 60, 70)
    ]
    return geo


def build_llava_next(tiny: bool, device, dtype) -> Geometry:
    vocab = 1024 if tiny else 32000
    image_id = vocab - 1
    tile = 112 if tiny else 336
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    image = [2 * tile, 2 * tile]  # 672x672: base tile + 2x2 grid = 5 tiles
    config = LlavaNextConfig(vision_config=_clip(tile), text_config=_llama_text(tiny, vocab), image_token_id=image_id,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                             vision_feature_select_strategy="default")
    t0 = time.perf_counter()
    model = _build(LlavaNextForConditionalGeneration, config, device, dtype)
    build_s = time.perf_counter() - t0
    tiles = image_size_to_num_patches(image, pinpoints, tile)
    with torch.no_grad():  # the feature count (newlines included) as the model computes it
        feats = model.model.get_image_features(
            pixel_values=torch.zeros(1, tiles, 3, tile, tile, device=device, dtype=dtype),
            image_sizes=torch.tensor([image], device=device),
        )
    feats = getattr(feats, "pooler_output", feats)
    n_vis = int(sum(f.shape[0] for f in feats))

    def make_inputs(batch: int) -> dict:
        gen = torch.Generator().manual_seed(batch)
        rows = [_text_ids(gen, N_SYSTEM, vocab - 10) + [image_id] * n_vis + _text_ids(gen, N_TEXT, vocab - 10)
                for _ in range(batch)]
        out = _rows_to_inputs(rows, device)
        out["pixel_values"] = torch.randn(batch, tiles, 3, tile, tile, generator=gen).to(device, dtype)
        out["image_sizes"] = torch.tensor([image] * batch, device=device)
        return out

    dims = ModelDims.from_config(config.text_config)
    geo = Geometry("llava-next-7b", model, make_inputs, n_vis, N_SYSTEM + N_TEXT, dims, "llava_next", build_s)
    geo.recipes = [
        Method(f"fitprune@{p}", "fitprune", p / 100, preset(f"llava-next-7b/{p}"), f"preset llava-next-7b/{p}")
        for p in (40, 60)
    ]
    geo.recipes.append(_uniform_standin(geo, 0.75))
    geo.notes.append(f"{tiles} tiles of {tile} px for a {image[0]}x{image[1]} image → {n_vis} visual tokens")
    return geo


def qwen2_vl_text(tiny: bool) -> dict:
    """Qwen2-VL-7B's language model (or the tiny one) as ``Qwen2VLConfig``'s ``text_config``."""
    if tiny:
        text = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                    num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    else:
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    text.update(max_position_embeddings=32768, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    return text


def build_qwen2_vl(tiny: bool, device, dtype) -> Geometry:
    text = qwen2_vl_text(tiny)
    if tiny:
        grid = (1, 24, 48)
        ids = dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)
    else:
        grid = (1, 44, 88)  # patches of 14 px: a 616x1232 image → 968 tokens after the 2x2 merge
        ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
    vision = dict(depth=1, embed_dim=64, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    t0 = time.perf_counter()
    model = _build(Qwen2VLForConditionalGeneration, config, device, dtype)
    build_s = time.perf_counter() - t0
    t, h, w = grid
    n_vis = t * h * w // 4
    patch_dim = 3 * 2 * 14 * 14
    image_id = ids["image_token_id"]
    high = 150000 if not tiny else 990

    def make_inputs(batch: int) -> dict:
        gen = torch.Generator().manual_seed(batch)
        rows = [_text_ids(gen, N_SYSTEM, high) + [ids["vision_start_token_id"]] + [image_id] * n_vis
                + [ids["vision_end_token_id"]] + _text_ids(gen, N_TEXT, high) for _ in range(batch)]
        out = _rows_to_inputs(rows, device)
        out["mm_token_type_ids"] = (out["input_ids"] == image_id).long()
        out["pixel_values"] = torch.randn(batch * t * h * w, patch_dim, generator=gen).to(device, dtype)
        out["image_grid_thw"] = torch.tensor([list(grid)] * batch, device=device)
        return out

    dims = ModelDims.from_config(model.model.language_model.config)
    geo = Geometry("qwen2-vl-7b", model, make_inputs, n_vis, N_SYSTEM + N_TEXT + 2, dims, "qwen2_vl", build_s)
    geo.recipes = [_uniform_standin(geo, b) for b in (0.40, 0.60, 0.75)]
    return geo


BUILDERS = {"llava-1.5-7b": build_llava, "llava-next-7b": build_llava_next, "qwen2-vl-7b": build_qwen2_vl}


def _uniform_standin(geo: Geometry, budget: float) -> Method:
    """A uniform schedule (scoring="fitprune") that removes ``budget`` of the prefill FLOPs.

    Stand-in for a fitted recipe (fitting needs real weights and calibration data). Tokens go in
    equal steps after layers [1, end); ``end`` is the largest layer count for which dropping all of
    them can still reach the budget, then ``for_budget`` sizes the total fraction.
    """
    n_layers = geo.dims.num_layers
    for end in range(n_layers, 1, -1):
        top = baselines.uniform(n_layers, ratio=1.0, start=1, end=end, family=geo.family)
        if recipe_reduction(top, geo.dims, geo.n_visual, geo.n_other) >= budget:
            break
    else:
        raise RecipeError(f"no uniform schedule reaches {budget:.2f} for {geo.name}")
    recipe = baselines.for_budget(
        lambda p: baselines.uniform(n_layers, ratio=p, start=1, end=end, family=geo.family, scoring="fitprune"),
        geo.dims, budget, geo.n_visual, geo.n_other,
    )
    ratio = recipe.metadata["ratio"]
    return Method(f"fitprune@{round(budget * 100)}", "fitprune", budget, recipe,
                  f"uniform stand-in for a fitted recipe: {ratio:.3f} of the visual tokens in equal steps after "
                  f"layers 1..{end - 1}")


def _fastv_match(geo: Geometry, m: Method) -> Method:
    """FastV (K=2) at the FLOPs reduction ``m``'s recipe predicts for this geometry."""
    target = recipe_reduction(m.recipe, geo.dims, geo.n_visual, geo.n_other)
    n_layers = geo.dims.num_layers
    recipe = baselines.for_budget(lambda r: baselines.fastv(n_layers, layer=2, ratio=r, family=geo.family),
                                  geo.dims, target, geo.n_visual, geo.n_other)
    return Method(m.label.replace("fitprune", "fastv"), "fastv", m.budget, recipe,
                  f"FastV K=2 R={recipe.metadata['R']:.3f}, same FLOPs as {m.label}", of=m.label)


def _oneshot(fastv: Method) -> Method:
    """FastV's schedule (one pruning layer) scored by FitPrune's rule (c·s)."""
    recipe = fastv.recipe.with_updates(scoring="fitprune", method="fitprune")
    return Method(fastv.label.replace("fastv", "oneshot"), "oneshot", fastv.budget, recipe,
                  f"FastV's schedule ({fastv.source.split(',')[0]}), FitPrune's scores", of=fastv.of)


def _torch_scores_twin(m: Method) -> Method:
    return Method(f"{m.label}{TORCH_SCORES}", m.method, m.budget, m.recipe,
                  f"{m.source}; scores by the torch path (fused kernel off)", of=m.label, torch_scores=True)


def _graphs_twin(m: Method) -> Method:
    return Method(f"{m.label}{GRAPHS}", m.method, m.budget, m.recipe,
                  f"{m.source}; prefill replayed from CUDA graphs", of=m.of and m.of + GRAPHS, graphs=True)


def _random_twin(m: Method) -> Method:
    return Method(f"{m.label}/random", "random", m.budget, baselines.random_recipe(m.recipe),
                  f"schedule of {m.label}, random picks", of=m.label)


# ---------------------------------------------------------------------------------- measurements


class Bench:
    def __init__(self, args, device: torch.device, meta: dict):
        self.args = args
        self.device = device
        self.clock = Clock(device)
        self.meta = meta
        self.fused = meta.get("fused_scores", "off")  # on | off | both (set_fused_scores)
        self.graphs = meta.get("cuda_graphs", "off")  # on | off | both
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.saved = lambda: None  # called after every configuration (main: rewrite --out)

    def fused_setting(self, torch_scores: bool) -> bool:
        """``fused_scores=`` for fitprune.apply / collect_stats: the kernel unless the run or this
        configuration scores by the torch path."""
        return self.fused != "off" and not torch_scores

    # rows ------------------------------------------------------------------------------------------
    def add(self, geo: Geometry, batch: int, m: Method | None, metric: str, value, unit: str,
            flops_ratio: float | None = None) -> None:
        self.rows.append({
            **self.meta,
            "geometry": geo.name,
            "batch": batch,
            "method": "unpruned" if m is None else m.method,
            "label": "unpruned" if m is None else m.label,
            "cuda_graphs": False if m is None else m.graphs,
            "budget": None if m is None else m.budget,
            "recipe": "" if m is None else m.source,
            "metric": metric,
            "unit": unit,
            "value": None if value is None or not math.isfinite(float(value)) else float(value),
            "ratio_vs_unpruned": None,
            "flops_ratio": flops_ratio,
        })

    # one prefill configuration ------------------------------------------------------------------
    def prefill(self, geo: Geometry, inputs: dict, warmup: int, repeats: int):
        """Median seconds of the whole forward and of the language model, seconds of the first
        (cold) call, and the last PruneReport."""
        model, clock = geo.model, self.clock
        lm_timer = CallTimer(model.model.language_model, clock)
        whole, lm, cold = [], [], None
        try:
            for i in range(warmup + repeats):
                lm_timer.calls.clear()
                clock.sync()
                a = clock.mark()
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                b = clock.mark()
                del out
                clock.sync()
                if i == 0:
                    cold = clock.seconds(a, b)
                if i >= warmup:
                    whole.append(clock.seconds(a, b))
                    lm.append(sum(lm_timer.durations()))
        finally:
            lm_timer.close()
        graphs = fitprune.prefill_graphs(model)
        if graphs is not None and (graphs.replays < warmup + repeats or graphs.eager):
            raise RuntimeError(f"the prefill was not replayed from a CUDA graph every time: {graphs!r}")
        return _median(whole), _median(lm), cold, fitprune.last_report(model)

    def memory(self, geo: Geometry, inputs: dict) -> tuple[float | None, float | None, int]:
        """(peak bytes, peak above the bytes allocated before, KV-cache bytes) of one prefill."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = geo.model(**inputs, use_cache=True, logits_to_keep=1)
        kv = cache_bytes(out.past_key_values)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        del out
        return (peak, peak - base, kv) if cuda else (None, None, kv)

    def decode(self, geo: Geometry, inputs: dict, warmup: int, repeats: int) -> dict:
        """Greedy ``generate``: ``warmup`` short untimed calls (2 new tokens), then ``repeats`` timed ones."""
        args, clock, model = self.args, self.clock, geo.model
        batch, length = inputs["input_ids"].shape
        timer = CallTimer(model, clock)
        res = defaultdict(list)
        cuda = self.device.type == "cuda"
        try:
            for i in range(warmup + repeats):
                n_new = min(2, args.new_tokens) if i < warmup else args.new_tokens
                timer.calls.clear()
                clock.sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                g0 = clock.mark()
                seqs = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                      use_cache=True)
                g1 = clock.mark()
                clock.sync()
                generated = seqs.shape[1] - length
                del seqs
                if i < warmup:
                    continue
                calls = timer.calls
                steps = len(calls) - 1
                if generated != n_new or steps < 1:
                    raise RuntimeError(f"generate produced {generated} tokens in {len(calls)} forwards")
                decode_s = clock.seconds(calls[0][1], calls[-1][1])
                res["prefill"].append(clock.seconds(*calls[0]))
                res["decode"].append(decode_s)
                res["total"].append(clock.seconds(g0, g1))
                res["tok_s"].append(batch * steps / decode_s)
                res["step"].append(decode_s / steps)
                if cuda:
                    res["peak_extra"].append(torch.cuda.max_memory_allocated() - base)
        finally:
            timer.close()
        return {k: _median(v) for k, v in res.items()}

    def scoring_synced(self, geo: Geometry, inputs: dict, repeats: int) -> dict:
        """Scoring and selection time from the library's stage timer, synchronised around each stage."""
        totals, per = [], defaultdict(list)
        with profiling.StageTimer(self.device, sync=True) as timer:
            for _ in range(repeats):  # shapes are warm already (the timed prefill ran first)
                timer.reset()
                self.clock.sync()
                t0 = time.perf_counter()
                out = geo.model(**inputs, use_cache=True, logits_to_keep=1)
                del out
                self.clock.sync()
                totals.append(time.perf_counter() - t0)
                per["score"].append(timer.total("scoring", "dart", "input_stage"))
                per["select"].append(timer.total("selection"))
        return {"total": _median(totals), "score": _median(per["score"]), "select": _median(per["select"])}


def cache_bytes(cache) -> int:
    """Bytes of keys + values over the cache's layers (DynamicCache of transformers 5)."""
    if cache is None:
        return 0
    tensors = []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    else:  # older layout
        tensors += list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


# ------------------------------------------------------------------------------ one geometry/batch


def unpruned_flops(geo: Geometry) -> float:
    return prefill_flops(geo.dims, [geo.n_visual + geo.n_other] * geo.dims.num_layers)


def run_batch(bench: Bench, geo: Geometry, batch: int) -> None:
    parts = bench.args.parts
    inputs = geo.make_inputs(batch)
    full = unpruned_flops(geo)
    paper_full = prefill_flops(geo.dims, [geo.n_visual] * geo.dims.num_layers, convention="fitprune-paper")
    methods: list[Method] = [Method("unpruned", "unpruned", None, None, "stock model")]
    for m in geo.recipes:
        methods.append(m)
        if bench.fused == "both" and m.method == "fitprune":
            methods.append(_torch_scores_twin(m))
        if "fastv" in parts or "oneshot" in parts:
            try:
                fastv = _fastv_match(geo, m)
                methods += ([fastv] if "fastv" in parts else []) + ([_oneshot(fastv)] if "oneshot" in parts else [])
            except RecipeError as e:
                bench.errors.append(f"{geo.name} b{batch} FastV for {m.label}: {e}")
                print(f"  ! {bench.errors[-1]}", flush=True)
    controls = [_random_twin(m) for m in methods if m.recipe is not None and not m.torch_scores
                and m.method != "oneshot"] if "random" in parts else []  # oneshot: FastV's schedule, its twin
    if bench.graphs == "on":
        methods = [_graphs_twin(m) for m in methods if not m.torch_scores]
        controls = [_graphs_twin(m) for m in controls]
    elif bench.graphs == "both":
        methods += [_graphs_twin(m) for m in methods if not m.torch_scores]

    for m in methods + controls:
        guarded(bench, geo, batch, m,
                lambda m=m: measure_method(bench, geo, batch, inputs, m, full, paper_full, control=m in controls))

    add_random_shares(bench, geo, batch, controls)
    if "stats" in parts:
        try:
            measure_stats(bench, geo, batch, inputs)
        except Exception as e:
            bench.errors.append(f"{geo.name} b{batch} collect_stats: {type(e).__name__}: {e}")
            print(f"  ! {bench.errors[-1]}\n{traceback.format_exc()}", flush=True)
        _free(bench.device)
    del inputs
    _free(bench.device)


def guarded(bench: Bench, geo: Geometry, batch: int, m: Method, run: Callable[[], None]) -> None:
    """Measure one configuration with ``run``: a failure is recorded and the run goes on; the recipe and
    graphs are taken off the model afterwards whatever happened."""
    t_cfg = time.perf_counter()
    try:
        run()
    except torch.cuda.OutOfMemoryError as e:  # a large batch of a large geometry may not fit
        bench.errors.append(f"{geo.name} b{batch} {m.label}: out of memory: {str(e).splitlines()[0]}")
        print(f"  ! {bench.errors[-1]}", flush=True)
    except Exception as e:  # keep measuring the rest; report at the end
        bench.errors.append(f"{geo.name} b{batch} {m.label}: {type(e).__name__}: {e}")
        print(f"  ! {bench.errors[-1]}\n{traceback.format_exc()}", flush=True)
    finally:
        if fitprune.prefill_graphs(geo.model) is not None:
            fitprune.prefill_graphs(geo.model).remove()
        if getattr(geo.model, "_fitprune", None) is not None:
            fitprune.remove(geo.model)
        _free(bench.device)
        bench.saved()  # a run cut short keeps every configuration it finished
    print(f"  {geo.name} b{batch} {m.label:<24} {time.perf_counter() - t_cfg:6.1f} s", flush=True)


def add_random_shares(bench: Bench, geo: Geometry, batch: int, controls: list[Method]) -> None:
    """Scoring share estimated as 1 - t(same schedule, random picks) / t(recipe), per recipe."""
    times = {r["label"]: r for r in bench.rows
             if r["geometry"] == geo.name and r["batch"] == batch and r["metric"] == "prefill_ms"}
    for ctl in controls:
        for scored in (ctl.of, ctl.of + TORCH_SCORES):  # the recipe, and its torch-scored twin if measured
            own, twin = times.get(scored), times.get(ctl.label)
            if own and twin and own["value"] and twin["value"] is not None:
                row = dict(own, metric="scoring_share_vs_random", unit="fraction",
                           value=1.0 - twin["value"] / own["value"], ratio_vs_unpruned=None)
                bench.rows.append(row)


def measure_method(bench: Bench, geo: Geometry, batch: int, inputs: dict, m: Method, full: float,
                   paper_full: float, control: bool) -> None:
    args, parts = bench.args, bench.args.parts
    warmup, repeats = (1, max(1, args.repeats // 2)) if control else (max(1, args.warmup), args.repeats)
    handle = (fitprune.apply(geo.model, m.recipe, fused_scores=bench.fused_setting(m.torch_scores))
              if m.recipe is not None else contextlib.nullcontext())
    # one graph at a time: generate's prefill (a cache argument) is another geometry than the timed prefill's,
    # and each graph keeps a pool of one prefill's activations and KV cache (LLaVA-NeXT at batch 16: ~28 GB)
    graphed = fitprune.graph_prefill(geo.model, max_graphs=1) if m.graphs else contextlib.nullcontext()
    with handle, graphed, torch.no_grad():
        whole, lm, cold, report = bench.prefill(geo, inputs, warmup, repeats)
        if m.recipe is None:
            fr, red_paper = 1.0, 0.0
        else:
            if report is None:
                raise RuntimeError("fitprune.last_report is None after a pruned prefill")
            if not np.all(report.n_visual == geo.n_visual):
                raise RuntimeError(f"report counts {report.n_visual.tolist()} visual tokens, expected {geo.n_visual}")
            fr = float(report.flops(geo.dims, "full").sum() / (full * batch))
            red_paper = 1.0 - float(report.flops(geo.dims, "fitprune-paper").sum() / (paper_full * batch))
        add = lambda metric, value, unit: bench.add(geo, batch, m, metric, value, unit, fr)  # noqa: E731
        if m.method == "unpruned":
            add("prefill_flops", full * batch, "FLOP")
        else:
            add("flops_reduction_full", 1.0 - fr, "fraction")
            add("flops_reduction_paper", red_paper, "fraction")
        add("prefill_ms", whole * 1e3, "ms")
        add("lm_prefill_ms", lm * 1e3, "ms")
        add("prefill_tok_s", batch * (geo.n_visual + geo.n_other) / whole, "tokens/s")
        add("prefill_cold_ms", cold * 1e3, "ms")  # first call of this configuration: new shapes
        if control:
            return
        if "memory" in parts:
            peak, extra, kv = bench.memory(geo, inputs)
            add("kv_cache_bytes", kv, "bytes")
            if peak is not None:
                add("peak_prefill_bytes", peak, "bytes")
                add("peak_prefill_extra_bytes", extra, "bytes")
        if "scoring" in parts and m.recipe is not None and not m.graphs:  # synced timers cannot run in a graph
            s = bench.scoring_synced(geo, inputs, max(1, args.repeats // 2))  # 2 by default
            add("scoring_ms_synced", s["score"] * 1e3, "ms")
            add("select_ms_synced", s["select"] * 1e3, "ms")
            add("prefill_ms_synced", s["total"] * 1e3, "ms")
            add("scoring_share_synced", (s["score"] + s["select"]) / s["total"], "fraction")
            add("sync_overhead", s["total"] / whole, "ratio")
        if "decode" in parts and not m.torch_scores:  # decode does not score
            d = bench.decode(geo, inputs, args.decode_warmup, args.decode_repeats)
            add("decode_tok_s", d["tok_s"], "tokens/s")
            add("decode_step_ms", d["step"] * 1e3, "ms")
            add("generate_ms", d["total"] * 1e3, "ms")
            add("generate_prefill_ms", d["prefill"] * 1e3, "ms")
            if "peak_extra" in d:
                add("peak_generate_extra_bytes", d["peak_extra"], "bytes")


def measure_stats(bench: Bench, geo: Geometry, batch: int, inputs: dict) -> None:
    """``collect_stats`` on one batch vs a plain forward of it (both use_cache=False, full logits)."""
    clock, model = bench.clock, geo.model
    reps = max(1, bench.args.repeats // 2)
    cuda = bench.device.type == "cuda"

    def timed(fn) -> tuple[float, float | None]:
        times, extra = [], []
        for i in range(1 + reps):
            clock.sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            fn()
            clock.sync()
            if i:
                times.append(time.perf_counter() - t0)
                if cuda:
                    extra.append(torch.cuda.max_memory_allocated() - base)
        return _median(times), (_median(extra) if cuda else None)

    def plain():
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
        del out

    def stats(torch_scores: bool):
        collect_stats(model, [inputs], fused_scores=bench.fused_setting(torch_scores))

    t_plain, m_plain = timed(plain)
    unpruned = Method("unpruned", "unpruned", None, None, "stock model")
    bench.add(geo, batch, unpruned, "forward_nocache_ms", t_plain * 1e3, "ms", 1.0)
    if cuda:
        bench.add(geo, batch, unpruned, "peak_forward_nocache_extra_bytes", m_plain, "bytes", 1.0)
    source = "fitprune.stats.collect_stats, one batch"
    variants = [Method("collect_stats", "collect_stats", None, None, source)]
    if bench.fused == "both":
        variants.append(Method("collect_stats" + TORCH_SCORES, "collect_stats", None, None,
                               source + "; scores by the torch path (fused kernel off)", torch_scores=True))
    for stats_m in variants:
        t_stats, m_stats = timed(lambda: stats(stats_m.torch_scores))
        bench.add(geo, batch, stats_m, "stats_ms", t_stats * 1e3, "ms", 1.0)
        if cuda:
            bench.add(geo, batch, stats_m, "peak_stats_extra_bytes", m_stats, "bytes", 1.0)


# metrics whose unpruned reference is another metric (collect_stats vs a plain forward)
_BASE_METRIC = {"stats_ms": "forward_nocache_ms", "peak_stats_extra_bytes": "peak_forward_nocache_extra_bytes"}


def fill_ratios(rows: list[dict]) -> None:
    """Ratio against the unpruned model of the same geometry, batch and graph mode."""
    base = {(r["geometry"], r["batch"], r.get("cuda_graphs", False), r["metric"]): r["value"]
            for r in rows if r["method"] == "unpruned"}
    for r in rows:
        metric = _BASE_METRIC.get(r["metric"], r["metric"])
        ref = base.get((r["geometry"], r["batch"], r.get("cuda_graphs", False), metric))
        if ref and r["value"] is not None and math.isfinite(ref):
            r["ratio_vs_unpruned"] = r["value"] / ref


# ------------------------------------------------------------------------------------------ output


def write_rows(path: Path, rows: list[dict], meta: dict, errors: list[str]) -> None:
    """Atomically (temp file + rename): JSON {"meta", "errors", "rows"}, or Parquet rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"meta": meta, "errors": errors, "rows": rows}, fh, indent=1, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def keyed_rows(rows: list[dict]) -> tuple[list[tuple], dict[tuple, dict]]:
    """(the (geometry, batch) pairs in order, {(geometry, batch, label): {metric: row}})."""
    keyed: dict[tuple, dict] = defaultdict(dict)
    order: list[tuple] = []
    for r in rows:
        k = (r["geometry"], r["batch"])
        if k not in order:
            order.append(k)
        keyed[k + (r["label"],)][r["metric"]] = r
    return order, keyed


def print_table(table: list[list[str]]) -> None:
    """Rows of cells, the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def print_tables(rows: list[dict], geo_info: dict) -> None:
    order, keyed = keyed_rows(rows)
    cols = [  # (header, metric, how)
        ("prefill ms", "prefill_ms", "v"), ("×", "prefill_ms", "r"),
        ("LM ms", "lm_prefill_ms", "v"), ("×", "lm_prefill_ms", "r"),
        ("LM speedup/ideal", None, "eff"), ("LM×stock", None, "stock"),
        ("decode tok/s", "decode_tok_s", "v"), ("×", "decode_tok_s", "r"),
        ("peak+ MB", "peak_prefill_extra_bytes", "mb"), ("×", "peak_prefill_extra_bytes", "r"),
        ("KV MB", "kv_cache_bytes", "mb"), ("×", "kv_cache_bytes", "r"),
        ("score% sync", "scoring_share_synced", "pct"), ("score% rand", None, "rand"),
    ]
    for geometry, batch in order:
        info = geo_info.get(geometry, {})
        print(f"\n== {geometry}  batch {batch}  ({info.get('n_visual')} visual + {info.get('n_other')} other tokens; "
              "× = ratio pruned/unpruned, same run; FLOPs× from executed counts; ideal speed-up = 1/FLOPs×)")
        labels = [lab for (g, b, lab) in keyed if (g, b) == (geometry, batch) and not lab.startswith("collect_stats")]
        header = ["method", "budget", "FLOPs×", "ideal"] + [c[0] for c in cols]
        table = [header]
        for lab in labels:
            metrics = keyed[(geometry, batch, lab)]
            any_row = next(iter(metrics.values()))
            fr = any_row["flops_ratio"]
            line = [lab, _fmt(any_row["budget"], ".2f"), _fmt(fr, ".3f"), _fmt(1 / fr if fr else None, ".2f")]
            for _, metric, how in cols:
                r = metrics.get(metric) if metric else None
                if how == "v":
                    line.append(_fmt(r and r["value"], ".1f"))
                elif how == "r":
                    line.append(_fmt(r and r["ratio_vs_unpruned"], ".3f"))
                elif how == "mb":
                    line.append(_fmt(r and r["value"] / MB, ".0f"))
                elif how == "pct":
                    line.append(_fmt(r and 100 * r["value"], ".1f"))
                elif how == "eff":
                    lm = metrics.get("lm_prefill_ms")
                    ok = lm and lm["ratio_vs_unpruned"] and fr
                    line.append(_fmt((1 / lm["ratio_vs_unpruned"]) / (1 / fr) if ok else None, ".2f"))
                elif how == "stock":  # against the eager unpruned model: what a user of stock transformers sees
                    lm = metrics.get("lm_prefill_ms")
                    stock = keyed.get((geometry, batch, "unpruned"), {}).get("lm_prefill_ms")
                    ok = lm and stock and lm["value"] and stock["value"]
                    line.append(_fmt(lm["value"] / stock["value"] if ok else None, ".3f"))
                elif how == "rand":
                    r = metrics.get("scoring_share_vs_random")
                    line.append(_fmt(r and 100 * r["value"], ".1f"))
            table.append(line)
        print_table(table)
        fw = keyed.get((geometry, batch, "unpruned"), {}).get("forward_nocache_ms")
        for stats_label in ("collect_stats", "collect_stats" + TORCH_SCORES):
            st = keyed.get((geometry, batch, stats_label), {}).get("stats_ms")
            if st and fw:
                print(f"  {stats_label} on this batch: {st['value']:.1f} ms vs plain forward {fw['value']:.1f} ms "
                      f"(× {_fmt(st['ratio_vs_unpruned'], '.2f')})")
        for lab in labels:
            m = keyed[(geometry, batch, lab)]
            r = m.get("sync_overhead")
            if r:
                print(f"  {lab}: synced-timer run {m['prefill_ms_synced']['value']:.1f} ms "
                      f"(sync overhead × {r['value']:.2f}), scoring {m['scoring_ms_synced']['value']:.1f} ms "
                      f"+ selection {m['select_ms_synced']['value']:.1f} ms")


# -------------------------------------------------------------------------------------------- main

_SDPA_FLAGS = {"flash": "enable_flash_sdp", "efficient": "enable_mem_efficient_sdp", "cudnn": "enable_cudnn_sdp",
               "math": "enable_math_sdp"}


def set_sdpa_backends(spec: str) -> str:
    """Allow only the named SDPA backends (torch picks among them in its own order); 'default' keeps all."""
    if spec.strip() == "default":
        return "default"
    wanted = {b.strip() for b in spec.split(",") if b.strip()}
    bad = sorted(wanted - set(_SDPA_FLAGS))
    if bad or not wanted:
        raise SystemExit(f"--sdpa-backends: unknown {bad or spec!r}; "
                         f"use 'default' or a comma list of {', '.join(_SDPA_FLAGS)}")
    for name, flag in _SDPA_FLAGS.items():
        fn = getattr(torch.backends.cuda, flag, None)
        if fn is not None:
            fn(name in wanted)
    return ",".join(sorted(wanted))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny geometries (hidden 64), end to end in seconds, CPU ok")
    p.add_argument("--geometries", default=",".join(GEOMETRIES), help=f"comma list of {', '.join(GEOMETRIES)}")
    p.add_argument("--budgets", default=None,
                   help="comma list of FitPrune budgets in percent to measure (default all: 40,60,70 for "
                        "LLaVA-1.5, 40,60,75 for the others)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,8; --tiny: 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed prefill repeats, median reported (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed prefill warm-ups per configuration (default 2)")
    p.add_argument("--decode-repeats", type=int, default=None,
                   help="timed generate calls after one short warm-up call (default 1: each is a mean over "
                        "new-tokens - 1 decode steps)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per decode run (default 32)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma list of {', '.join(PARTS)} (prefill of unpruned + FitPrune always runs)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--sdpa-backends", default="flash,efficient,math",
                   help="SDPA backends allowed on the GPU, from flash, efficient, cudnn, math; 'default' = torch's "
                        "own choice (cuDNN first on Hopper with torch 2.11: it builds a plan per new sequence length, "
                        "and a pruned prefill has a new length after every pruning layer)")
    p.add_argument("--fused-scores", choices=("on", "off", "both"), default="both",
                   help="FitPrune scores by the fused Triton kernel (on), the torch path (off), or both: each "
                        "FitPrune recipe and collect_stats also measured with the torch path, labelled "
                        f"'{TORCH_SCORES}' (default). Without CUDA or Triton: off")
    p.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="both",
                   help="replay the language-model prefill from CUDA graphs (fitprune.graph_prefill): on = every "
                        f"configuration graphed, both = each measured eagerly and again as '<label>{GRAPHS}' "
                        "(default). Without CUDA: off")
    p.add_argument("--out", default=None,
                   help="JSON (or .parquet) file; default $OUT/bench_gpu.json if OUT is set, else ./bench_gpu.json")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batches = [int(b) for b in (args.batches or ("1,2" if tiny else "1,8")).split(",") if b.strip()]
    args.repeats = args.repeats or (1 if tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.decode_repeats = args.decode_repeats or 1
    args.decode_warmup = 1
    args.new_tokens = args.new_tokens or (4 if tiny else 32)
    args.geometries = [g.strip() for g in args.geometries.split(",") if g.strip()]
    args.budgets = None if args.budgets is None else {int(b) for b in args.budgets.split(",") if b.strip()}
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    for name, got, known in (("geometries", args.geometries, GEOMETRIES), ("parts", args.parts, PARTS)):
        bad = sorted(set(got) - set(known))
        if bad:
            p.error(f"unknown {name} {bad}; known: {', '.join(known)}")
    if args.out is None:
        args.out = str(Path(os.environ["OUT"]) / "bench_gpu.json") if os.environ.get("OUT") else "bench_gpu.json"
    return args


def setup(args) -> tuple[torch.device, torch.dtype, dict]:
    """Device, dtype and the meta every row carries, from the common options (``--device``, ``--tiny``,
    ``--sdpa-backends``, ``--fused-scores``, ``--cuda-graphs``); also used by bench_generate.py."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and args.tiny:
        torch.set_num_threads(1)  # tiny matrices: threads only add stalls on a shared CPU
    sdpa = set_sdpa_backends(args.sdpa_backends) if device.type == "cuda" else "cpu"
    fused = check_fused_scores(args.fused_scores, device)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    meta = {
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fitprune": fitprune.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).replace("torch.", ""),
        "attn": "sdpa",
        "sdpa_backends": sdpa,
        "tiny": bool(args.tiny),
        "fused_scores": fused,
        "cuda_graphs": args.cuda_graphs if device.type == "cuda" else "off",
    }
    return device, dtype, meta


def build_geometry(bench: Bench, name: str, dtype: torch.dtype) -> Geometry | None:
    """Geometry ``name`` with its recipes narrowed to ``--budgets``; None (the failure recorded) if it
    cannot be built."""
    args = bench.args
    try:
        geo = BUILDERS[name](args.tiny, bench.device, dtype)
    except Exception as e:
        bench.errors.append(f"{name}: build failed: {type(e).__name__}: {e}")
        print(f"! {bench.errors[-1]}\n{traceback.format_exc()}", flush=True)
        _free(bench.device)
        return None
    if args.budgets is not None:
        geo.recipes = [m for m in geo.recipes if round(m.budget * 100) in args.budgets]
    return geo


def finish(bench: Bench, out: Path, t_start: float) -> int:
    """The closing lines of a run; exit status 1 if anything failed."""
    print(f"\n{len(bench.rows)} rows → {out}; total {time.perf_counter() - t_start:.1f} s")
    if bench.errors:
        print(f"{len(bench.errors)} error(s):\n  " + "\n  ".join(bench.errors))
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, meta = setup(args)
    gpu, fused = meta["gpu"], meta["fused_scores"]
    out = Path(args.out)
    bench = Bench(args, device, meta)
    geo_info: dict[str, dict] = {}
    run_meta = {**meta, "batches": args.batches, "repeats": args.repeats, "warmup": args.warmup,
                "decode_repeats": args.decode_repeats, "new_tokens": args.new_tokens, "parts": sorted(args.parts),
                "geometries": geo_info}
    print(f"bench_gpu: {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, {meta['dtype']}, "
          f"batches {args.batches}, geometries {args.geometries}{' (tiny)' if args.tiny else ''}, fused scores {fused} "
          f"→ {out}", flush=True)
    t_start = time.perf_counter()

    def save() -> None:
        fill_ratios(bench.rows)
        write_rows(out, bench.rows, run_meta, bench.errors)

    bench.saved = save
    for name in args.geometries:
        t_geo = time.perf_counter()
        geo = build_geometry(bench, name, dtype)
        if geo is None:
            continue
        n_params = sum(p.numel() for p in geo.model.parameters())
        geo_info[name] = {"n_visual": geo.n_visual, "n_other": geo.n_other, "layers": geo.dims.num_layers,
                          "params": n_params, "build_s": geo.build_s, "notes": geo.notes,
                          "recipes": {m.label: {"source": m.source, "drop_fractions": list(m.recipe.drop_fractions)}
                                      for m in geo.recipes}}
        print(f"{name}: built in {geo.build_s:.1f} s, {n_params / 1e9:.2f} B params, {geo.n_visual} visual + "
              f"{geo.n_other} other tokens; recipes: " + "; ".join(f"{m.label} = {m.source}" for m in geo.recipes),
              flush=True)
        for batch in args.batches:
            bench.add(geo, batch, None, "build_s", geo.build_s, "s", 1.0)
            run_batch(bench, geo, batch)
            save()
        geo.model = None
        del geo
        _free(device)
        left = f", {torch.cuda.memory_allocated(device) / MB:.0f} MB still allocated" if device.type == "cuda" else ""
        print(f"{name}: done in {time.perf_counter() - t_geo:.1f} s{left}; {time.perf_counter() - t_start:.0f} s "
              "since start", flush=True)
    save()
    print_tables(bench.rows, geo_info)
    return finish(bench, out, t_start)


if __name__ == "__main__":
    sys.exit(main())
