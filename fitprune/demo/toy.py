"""The toy model and inputs: fast pipeline tests and smoke runs (``--model toy --source toy``).

A seeded *random-weight* tiny LLaVA (Llama text model, CLIP vision tower) and synthetic inputs:
random-pixel images behind a random system prompt, followed by a random question. With random
weights there is no task accuracy to measure, so a sweep on it measures how often a pruned
model's next token agrees with the unpruned model's. The real default is the demo model.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 1000
VOCAB = 1024
IMAGE_SIZE, PATCH = 48, 4  # 144 visual tokens
N_SYSTEM, N_TEXT = 12, 10


def toy_model(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
        ),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init gives near-uniform attention; sharpen it so pruning matters
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def toy_batches(n_samples: int, batch_size: int, seed: int, prefix: str, start: int = 0) -> list[dict]:
    """Deterministic synthetic samples ``start .. n_samples - 1``, ``batch_size`` per batch, named ``<prefix>-<i>``.

    Each sample depends only on ``seed`` and its index, so any sample range (a shard) is the same
    as in the whole set.
    """
    n_visual = (IMAGE_SIZE // PATCH) ** 2
    batches = []
    for start in range(start, n_samples, batch_size):
        ids, pixels, names = [], [], []
        for i in range(start, min(n_samples, start + batch_size)):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            system = torch.randint(1, IMAGE_TOKEN - 1, (N_SYSTEM,), generator=gen)
            text = torch.randint(1, IMAGE_TOKEN - 1, (N_TEXT,), generator=gen)
            ids.append(torch.cat([system, torch.full((n_visual,), IMAGE_TOKEN), text]))
            pixels.append(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen))
            names.append(f"{prefix}-{i}")
        input_ids = torch.stack(ids)
        batches.append({
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.stack(pixels),
            "sample_ids": names,
        })
    return batches
