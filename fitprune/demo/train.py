"""Train the demo model's projector (+ small LoRA adapters) on easy-VQA and the synthetic tasks.

    python -m fitprune.demo.train --out runs/demo --device cuda            # ~5 min on one H100

The vision tower (DINOv2-S) and the language model (SmolLM2-135M) stay frozen; trained are the
LLaVA projector (384 → 576 → 576) and, with ``--lora-rank > 0``, rank-r deltas on every linear of
the language model's layers. The result is one ``demo_adapter.safetensors`` + manifest (data, steps,
seed, config, metrics) which :func:`fitprune.demo.build_demo_model` merges into a stock
``LlavaForConditionalGeneration``. Copy both files to ``fitprune/data/`` to ship them.

Recipe: answers are the assistant turn after the demo prompt, ending with the chat end token; the
loss covers those tokens only. The projector's first layer is initialised to standardise DINOv2's
pre-LayerNorm features (LLaVA reads the last block's output, which has large per-channel offsets)
and its second layer to the language model's embedding scale. AdamW, linear warm-up, cosine decay.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import LORA_TARGETS, add_lora, load_adapter, save_adapter
from .build import CHAT_END, IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, build_demo_model

__all__ = ["Batcher", "MixedDataset", "TrainConfig", "answer_loss", "init_projector", "normalize_pixels", "train"]

IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 96  # the GPU step is launch-bound: larger batches cost little more time
    lr_projector: float = 1e-3
    lr_lora: float = 3e-4
    lora_rank: int = 8  # 0: projector only
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    warmup: int = 50
    synthetic_fraction: float = 0.6  # share of training samples from fitprune.synthetic (rest: easy-VQA train)
    seed: int = 0
    max_minutes: float | None = None  # shrink `steps` to fit, measured after the first steps
    workers: int = 8
    log_every: int = 25
    easy_vqa_train: int | None = None  # first n easy-VQA training questions (None: all 38,575)
    init_adapter: str | None = None  # continue from this adapter file (same LoRA rank) instead of a fresh init
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = projector only), got {self.lora_rank}")


class MixedDataset(torch.utils.data.Dataset):
    """Item k → (uint8 image (S, S, 3), question, answer); the source is drawn per item from seed and k.

    Synthetic items are ``sample_at("train", k)``, so no two items share a scene; easy-VQA items are
    drawn uniformly from ``easy`` (a list of EvalSample with image paths).
    """

    def __init__(self, easy: list, length: int, synthetic_fraction: float, seed: int, image_size: int = IMAGE_SIZE):
        if synthetic_fraction < 1.0 and not easy:
            raise ValueError("no easy-VQA samples given but synthetic_fraction < 1")
        self.easy, self.length, self.fraction, self.seed, self.size = easy, length, synthetic_fraction, seed, image_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int):
        from PIL import Image

        from ..synthetic import sample_at

        rng = np.random.default_rng([self.seed, k])
        if rng.random() < self.fraction:
            s = sample_at("train", k, seed=self.seed)
            image, question, answer = s.image, s.question, s.answer
        else:
            e = self.easy[int(rng.integers(len(self.easy)))]
            with Image.open(e.image) as im:
                image = im.convert("RGB")
            question, answer = e.question, e.answers[0]
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)  # as DemoProcessor
        return np.asarray(image, dtype=np.uint8).copy(), question, answer


class Batcher:
    """Collate (image, question, answer) items: right-padded ids, labels on the answer + end token only."""

    def __init__(self, processor):
        self.processor = processor
        tok = processor.tokenizer
        self.end = CHAT_END
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        tok = self.processor.tokenizer
        prompt = tok(self.processor.prompt(question), add_special_tokens=False)["input_ids"]
        target = tok(answer + self.end, add_special_tokens=False)["input_ids"]
        return prompt + target, [IGNORE] * len(prompt) + target

    def __call__(self, items):
        rows = [self.encode(q, a) for _, q, a in items]
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (i, lab) in enumerate(rows):
            ids[r, : len(i)] = torch.tensor(i)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(i)] = 1
        images = torch.from_numpy(np.stack([im for im, _, _ in items]))  # (B, S, S, 3) uint8
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images}


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 → (B, 3, S, S) float32, exactly DemoProcessor.pixel_values' arithmetic."""
    x = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector: the configured hidden layer, CLS dropped. (B, N, 384)"""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


@torch.no_grad()
def init_projector(model, pixel_values: torch.Tensor) -> dict[str, float]:
    """Fold per-channel standardisation of the vision features into linear_1; scale linear_2's output
    to the embedding table's RMS. Returns the statistics used."""
    proj = model.model.multi_modal_projector
    feats = vision_features(model, pixel_values).float().reshape(-1, proj.linear_1.in_features)
    mean, std = feats.mean(0), feats.std(0).clamp(min=1e-3)
    w = proj.linear_1.weight.float() / std  # (out, in): column j scaled by 1/std_j
    proj.linear_1.weight.copy_(w)
    proj.linear_1.bias.copy_(proj.linear_1.bias.float() - w @ mean)
    out = proj(feats.to(proj.linear_1.weight.dtype)).float()
    emb = model.model.language_model.embed_tokens.weight.float()
    factor = emb.pow(2).mean().sqrt() / out.pow(2).mean().sqrt()
    proj.linear_2.weight.mul_(factor)
    proj.linear_2.bias.mul_(factor)
    return {"feature_abs_mean_max": float(mean.abs().max()), "feature_std_max": float(std.max()),
            "feature_std_min": float(std.min()), "linear_2_scale": float(factor)}


def answer_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over answer tokens (LM head applied to those positions only) and token accuracy."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    sel = target != IGNORE
    logits = model.lm_head(hidden[sel]).float()
    loss = F.cross_entropy(logits, target[sel])
    return loss, (logits.argmax(-1) == target[sel]).float().mean()


@torch.no_grad()
def _continue_from(path, proj, loras) -> dict:
    """Load a saved adapter's projector and LoRA pairs into the modules being trained."""
    state, _, manifest = load_adapter(path)
    proj.load_state_dict({k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")})
    names = {k[len("lora."):-2] for k in state if k.startswith("lora.")}
    if names != set(loras):
        raise ValueError(f"{path}: its LoRA layers do not match this run's (rank and targets must be the same)")
    for name, lora in loras.items():
        lora.A.copy_(state[f"lora.{name}.A"])
        lora.B.copy_(state[f"lora.{name}.B"])
    previous = manifest.get("samples_seen_total", manifest.get("samples_seen"))
    return {"continued_from": str(path), "sha256": manifest["sha256"], "previous_samples": previous}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(config: TrainConfig, cache_dir, out_dir, device: str = "cuda") -> Path:
    """Train, write ``out_dir/demo_adapter.safetensors`` + manifest, return the adapter path."""
    from ..evaluation.easy_vqa import load_easy_vqa

    torch.manual_seed(config.seed)
    model, processor = build_demo_model(cache_dir, seed=config.seed, adapter=None)
    use_amp = device.startswith("cuda")
    # frozen weights in bfloat16 on the GPU (half the memory traffic); trained parameters stay float32
    model.to(device, dtype=torch.bfloat16 if use_amp else torch.float32)
    model.requires_grad_(False)
    proj = model.model.multi_modal_projector.float()
    loras = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets) if config.lora_rank else {}
    proj.requires_grad_(True)

    easy = load_easy_vqa("train", limit=config.easy_vqa_train)
    data = MixedDataset(easy, config.steps * config.batch_size, config.synthetic_fraction, config.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=config.batch_size, shuffle=False, num_workers=config.workers,
                                         collate_fn=Batcher(processor), persistent_workers=config.workers > 0,
                                         prefetch_factor=4 if config.workers else None)
    it = iter(loader)
    first = next(it)
    if config.init_adapter:
        init_stats = _continue_from(config.init_adapter, proj, loras)
    else:
        init_stats = init_projector(model, normalize_pixels(first["images"].to(device)))
    _log(f"projector init: {init_stats}")

    groups = [{"params": list(proj.parameters()), "lr": config.lr_projector}]
    if loras:
        groups.append({"params": [p for m in loras.values() for p in (m.A, m.B)], "lr": config.lr_lora})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98))
    base_lrs = [g["lr"] for g in groups]
    total = config.steps
    log, start, batch = [], time.perf_counter(), first
    for step in range(config.steps):
        if step >= total:
            break
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * _lr_factor(step, config.warmup, total)
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        b["pixel_values"] = normalize_pixels(b.pop("images"))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss, acc = answer_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        if step == 20 and config.max_minutes:  # fit the schedule to the time budget
            per_step = (time.perf_counter() - start) / 21
            total = max(step + 1, min(config.steps, int(config.max_minutes * 60 / per_step)))
            _log(f"{per_step * 1000:.0f} ms/step → {total} steps in {config.max_minutes} min")
        if step % config.log_every == 0 or step == total - 1:
            rec = {"step": step, "loss": loss.item(), "token_acc": acc.item(),
                   "elapsed_s": round(time.perf_counter() - start, 1)}
            log.append(rec)
            _log(json.dumps(rec))
        if step + 1 < total:
            batch = next(it)
    manifest = {
        "config": asdict(config), "steps_run": total, "seed": config.seed, "train_log": log,
        "train_seconds": round(time.perf_counter() - start, 1), "projector_init": init_stats,
        "data": {"easy_vqa": f"train split, {len(easy)} questions (pip easy-vqa==1.0)",
                 "synthetic": f"fitprune.synthetic train split, sample_at(k, seed={config.seed}), "
                              f"fraction {config.synthetic_fraction}"},
        "samples_seen": total * config.batch_size,
        "samples_seen_total": total * config.batch_size + int(init_stats.get("previous_samples") or 0), "device": torch.cuda.get_device_name() if use_amp else device,
        "torch": torch.__version__,
    }
    return save_adapter(model, loras, out_dir, manifest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fitprune.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for demo_adapter.safetensors + demo_adapter.json")
    p.add_argument("--cache-dir", default=None,
                   help="where the base demo checkpoint is built (default: $FITPRUNE_DATA/models, else ~/.cache/fitprune/models)")
    p.add_argument("--device", default="cuda")
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name in ("extra", "lora_targets"):
            continue
        kind = f.type if isinstance(f.type, type) else None
        if name == "init_adapter":
            p.add_argument("--init-adapter", default=None, help="continue training from this adapter file")
        elif name in ("max_minutes",):
            p.add_argument(f"--{name.replace('_', '-')}", type=float, default=f.default)
        elif name == "easy_vqa_train":
            p.add_argument(f"--{name.replace('_', '-')}", type=int, default=f.default)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=kind or type(f.default), default=f.default)
    args = p.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    cache = args.cache_dir or Path(os.environ.get("FITPRUNE_DATA") or "~/.cache/fitprune").expanduser() / "models"
    path = train(TrainConfig(**fields), cache, args.out, args.device)
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
