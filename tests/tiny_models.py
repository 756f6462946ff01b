"""Tiny random-weight models of every supported family, and inputs for them (CPU, milliseconds).

Each factory returns ``(model, make_inputs)`` where ``make_inputs(specs)`` builds a left-padded
batch from a list of sample specs ``(n_system, image, n_text[, sample_seed])``; ``image`` is None
(text only) or a family-specific size. Each sample draws from its own generator (seeded by
``sample_seed``, default its index), so ``make_inputs([spec])`` rebuilds one sample of a batch
exactly. Token ids are random but never collide with the visual token ids.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

VOCAB = 256
IMAGE_ID = 250
VIDEO_ID = 251
PAD_ID = 0
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


def _text(**kw) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def _clip(image_size: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )


def _peaky(model):
    """Scale the text model's query/key weights so attention is far from uniform (random init gives
    near-uniform maps, where head-max and head-mean rank tokens alike and tests could not tell)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def _prompt_ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, IMAGE_ID - 10, (n,), generator=gen).tolist()


def _samples(specs, seed):
    for j, spec in enumerate(specs):
        n_sys, image, n_txt, *rest = spec
        sample_seed = rest[0] if rest else j
        yield n_sys, image, n_txt, torch.Generator().manual_seed(1000 * seed + sample_seed)


def _left_pad(rows: list[list[int]], extra: list[list[int]] | None = None):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    return ids, mask


def tiny_llava(seed: int = 0, attn: str = "sdpa", num_layers: int = 4, num_kv_heads: int = 2):
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_clip(image_size=24, patch=4),  # 36 patches → 36 visual tokens
        text_config=LlamaConfig(**_text(num_hidden_layers=num_layers, num_key_value_heads=num_kv_heads)),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
    )
    config._attn_implementation = attn
    model = _peaky(LlavaForConditionalGeneration(config).eval())
    model.set_attn_implementation(attn)
    n_vis = 36

    def make_inputs(specs, seed: int = 1):
        rows, pixels = [], []
        for n_sys, image, n_txt, gen in _samples(specs, seed):
            row = _prompt_ids(gen, n_sys)
            if image is not None:
                row += [IMAGE_ID] * n_vis
                pixels.append(torch.randn(3, 24, 24, generator=gen))
            rows.append(row + _prompt_ids(gen, n_txt))
        ids, mask = _left_pad(rows)
        out = {"input_ids": ids, "attention_mask": mask}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out

    return model, make_inputs


def tiny_llava_next(seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    config = LlavaNextConfig(
        vision_config=_clip(image_size=16, patch=4),  # 16 patches per tile
        text_config=LlamaConfig(**_text()),
        image_token_id=IMAGE_ID,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
    )
    model = _peaky(LlavaNextForConditionalGeneration(config).eval())
    model.set_attn_implementation(attn)

    def n_features(size) -> int:
        tiles = image_size_to_num_patches(size, pinpoints, 16)
        device = model.device
        pv = torch.zeros(1, tiles, 3, 16, 16, device=device)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pv, image_sizes=torch.tensor([size], device=device))
        feats = getattr(feats, "pooler_output", feats)
        return int(sum(f.shape[0] for f in feats)), tiles

    def make_inputs(specs, seed: int = 1):
        rows, pixels, sizes = [], [], []
        shapes = [n_features(spec[1]) for spec in specs if spec[1] is not None]
        max_tiles = max((t for _, t in shapes), default=0)
        it = iter(shapes)
        for n_sys, image, n_txt, gen in _samples(specs, seed):
            row = _prompt_ids(gen, n_sys)
            if image is not None:
                n_vis, tiles = next(it)
                row += [IMAGE_ID] * n_vis
                pv = torch.zeros(max_tiles, 3, 16, 16)
                pv[:tiles] = torch.randn(tiles, 3, 16, 16, generator=gen)
                pixels.append(pv)
                sizes.append(list(image))
            rows.append(row + _prompt_ids(gen, n_txt))
        ids, mask = _left_pad(rows)
        out = {"input_ids": ids, "attention_mask": mask}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
            out["image_sizes"] = torch.tensor(sizes)
        return out

    return model, make_inputs


def _tiny_qwen(cls, config_cls, seed: int, attn: str):
    torch.manual_seed(seed)
    text = _text(bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    config = config_cls(
        text_config=text,
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, out_hidden_size=64, num_heads=2, intermediate_size=48,
            patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VIDEO_ID + 1,
        vision_end_token_id=VIDEO_ID + 2,
    )
    model = _peaky(cls(config).eval())
    model.set_attn_implementation(attn)
    patch_dim = 3 * 2 * 2 * 2

    def make_inputs(specs, seed: int = 1):
        rows, pixels, grids = [], [], []
        for n_sys, image, n_txt, gen in _samples(specs, seed):
            row = _prompt_ids(gen, n_sys)
            if image is not None:
                h, w = image  # grid in patches (even numbers)
                n_vis = h * w // 4
                row += [VIDEO_ID + 1] + [IMAGE_ID] * n_vis + [VIDEO_ID + 2]
                pixels.append(torch.randn(h * w, patch_dim, generator=gen))
                grids.append([1, h, w])
            rows.append(row + _prompt_ids(gen, n_txt))
        ids, mask = _left_pad(rows)
        out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_ID).long()}
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
            out["image_grid_thw"] = torch.tensor(grids)
        return out

    return model, make_inputs


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa"):
    return _tiny_qwen(Qwen2VLForConditionalGeneration, Qwen2VLConfig, seed, attn)


def tiny_qwen2_5_vl(seed: int = 0, attn: str = "sdpa"):
    return _tiny_qwen(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, seed, attn)


FACTORIES = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}

# Two images of different size per family (NeXT and Qwen give different visual counts).
IMAGES = {
    "llava": ("img", "img"),
    "llava_next": ((16, 32), (32, 32)),
    "qwen2_vl": ((6, 8), (8, 8)),
    "qwen2_5_vl": ((6, 8), (8, 8)),
}
