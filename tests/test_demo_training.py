"""The demo model's training pieces on a tiny LLaVA: LoRA, adapter files, projector init, loss, data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fitprune.demo.adapter import (ADAPTER_FILE, MANIFEST_FILE, AdapterError, add_lora, load_adapter, merge_adapter,
                                   read_manifest, save_adapter)
from fitprune.demo.build import DemoProcessor
from fitprune.demo.train import IGNORE, Batcher, _continue_from, MixedDataset, answer_loss, init_projector, normalize_pixels, \
    vision_features
from fitprune.evaluation.loaders import EvalSample
from tiny_models import IMAGE_ID, tiny_llava


def _inputs(make_inputs):
    return make_inputs([(3, True, 5), (2, True, 7)])


def _randomize_lora(loras, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in loras.values():
            lora.B.copy_(torch.randn(lora.B.shape, generator=gen) * 0.05)
            lora.A.copy_(lora.A.half().float())  # the file stores float16: compare like with like
            lora.B.copy_(lora.B.half().float())


def test_saved_adapter_merges_into_a_plain_model_with_the_same_outputs(tmp_path):
    model, make_inputs = tiny_llava(seed=3)
    inputs = _inputs(make_inputs)
    loras = add_lora(model, rank=2, alpha=4.0)
    assert len(loras) == 4 * 7  # 4 layers × q k v o gate up down
    _randomize_lora(loras)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias.add_(0.3)
        expected = model(**inputs).logits
    path = save_adapter(model, loras, tmp_path, {"seed": 3})

    plain, _ = tiny_llava(seed=3)
    with torch.no_grad():
        before = plain(**inputs).logits
    state, scale, manifest = load_adapter(path)
    assert scale == 2.0 and manifest["seed"] == 3 and manifest["parameters"] > 0
    merge_adapter(plain, state, scale)
    with torch.no_grad():
        merged = plain(**inputs).logits
    assert not any(type(m).__name__ == "LoRALinear" for m in plain.modules())
    assert (before - expected).abs().max() > 1e-2  # the adapter changes the model...
    torch.testing.assert_close(merged, expected, atol=2e-4, rtol=1e-4)  # ...and merging reproduces it


def test_projector_only_adapter(tmp_path):
    model, make_inputs = tiny_llava(seed=1)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(-1)
    path = save_adapter(model, {}, tmp_path, {})
    state, scale, _ = load_adapter(path)
    assert scale is None and all(k.startswith("projector.") for k in state)
    plain, _ = tiny_llava(seed=1)
    merge_adapter(plain, state, scale)
    inputs = _inputs(make_inputs)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, model(**inputs).logits)


def test_corrupt_or_missing_adapter_is_refused(tmp_path):
    model, _ = tiny_llava()
    path = save_adapter(model, add_lora(model, 2, 2.0), tmp_path, {})
    with pytest.raises(AdapterError, match="missing"):
        read_manifest(tmp_path / "nowhere" / ADAPTER_FILE)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="SHA-256"):
        load_adapter(path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(AdapterError, match="format_version"):
        read_manifest(path)


def test_adapter_for_another_geometry_is_refused(tmp_path):
    model, _ = tiny_llava()
    loras = add_lora(model, 2, 2.0)
    path = save_adapter(model, loras, tmp_path, {})
    state, scale, _ = load_adapter(path)
    state = {k.replace("layers.0.", "layers.9."): v for k, v in state.items()}
    with pytest.raises(AdapterError, match="not a linear layer"):
        merge_adapter(tiny_llava()[0], state, scale)


def test_normalize_pixels_matches_the_processor():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 336, 336, 3), dtype=np.uint8)
    proc = DemoProcessor(tokenizer=None)
    expected = torch.cat([proc.pixel_values(Image.fromarray(im)) for im in images])
    torch.testing.assert_close(normalize_pixels(torch.from_numpy(images)), expected, atol=0, rtol=0)


def test_init_projector_standardises_features_and_matches_the_embedding_scale():
    model, make_inputs = tiny_llava(seed=2)
    pixels = make_inputs([(1, True, 1, s) for s in range(6)])["pixel_values"] * 3 + 5  # offset, wide features
    stats = init_projector(model, pixels)
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        feats = vision_features(model, pixels).reshape(-1, proj.linear_1.in_features)
        standardised = (feats - feats.mean(0)) / feats.std(0)
        # linear_1 now sees standardised inputs: W' x + b' == W (x - μ)/σ + b for the original W, b
        w = proj.linear_1.weight * feats.std(0)
        b = proj.linear_1.bias + proj.linear_1.weight @ feats.mean(0)
        torch.testing.assert_close(proj.linear_1(feats), standardised @ w.T + b, atol=1e-4, rtol=1e-4)
        out_rms = proj(feats).pow(2).mean().sqrt()
        emb_rms = model.model.language_model.embed_tokens.weight.pow(2).mean().sqrt()
    torch.testing.assert_close(out_rms, emb_rms, atol=1e-4, rtol=1e-3)
    assert stats["linear_2_scale"] > 0


def test_answer_loss_trains_the_projector():
    model, make_inputs = tiny_llava(seed=4)
    batch = make_inputs([(2, True, 4, s) for s in range(4)])
    labels = torch.full_like(batch["input_ids"], IGNORE)
    labels[:, -2:] = batch["input_ids"][:, -2:]  # the last two tokens are the "answer"
    batch = {**batch, "labels": labels}
    model.requires_grad_(False)
    proj = model.model.multi_modal_projector.requires_grad_(True)
    opt = torch.optim.AdamW(proj.parameters(), lr=3e-2)
    first, first_acc = answer_loss(model, batch)
    for _ in range(60):
        loss, acc = answer_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the random tiny LM caps how far the loss falls, but the answers become its top choice
    assert first_acc.item() < 0.5 and acc.item() == 1.0 and loss.item() < 0.85 * first.item()
    with torch.no_grad():  # the loss equals the model's own label loss over the same tokens
        ref = model(**batch).loss
    torch.testing.assert_close(answer_loss(model, batch)[0], ref, atol=1e-5, rtol=1e-5)


class _CharTokenizer:
    """A stand-in tokenizer: one id per character, <image> = IMAGE_ID, <|im_end|> = 1."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for token, tid in (("<image>", IMAGE_ID), ("<|im_end|>", 1)):
                if text.startswith(token, i):
                    ids.append(tid)
                    i += len(token)
                    break
            else:
                ids.append(2 + ord(text[i]) % 200)
                i += 1
        return {"input_ids": ids}


class _Processor:
    tokenizer = _CharTokenizer()

    def prompt(self, question):
        return "<image>" * 4 + "\n" + question + "\nA:"


def test_batcher_labels_only_the_answer_and_end_token():
    batcher = Batcher(_Processor())
    img = np.zeros((8, 8, 3), np.uint8)
    out = batcher([(img, "what?", "red"), (img, "which shape is it?", "circle")])
    for row in range(2):
        ids, labels, mask = out["input_ids"][row], out["labels"][row], out["attention_mask"][row]
        n = int(mask.sum())
        assert (ids[n:] == 0).all() and (labels[n:] == IGNORE).all()  # right padding, not trained on
        answer = ["red", "circle"][row]
        assert labels[n - 1] == 1 and (labels[n - 1 - len(answer): n] != IGNORE).all()
        assert (labels[: n - 1 - len(answer)] == IGNORE).all()
        assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()
    assert out["images"].shape == (2, 8, 8, 3) and out["images"].dtype == torch.uint8


def test_mixed_dataset_is_deterministic_and_mixes_sources(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    easy = [EvalSample(id="e0", image=str(path), question="what color is the shape?", answers=["red"])]
    data = MixedDataset(easy, length=40, synthetic_fraction=0.5, seed=0, image_size=56)
    items = [data[k] for k in range(40)]
    from_easy = [k for k, (_, q, _) in enumerate(items) if q == "what color is the shape?"]
    assert 8 <= len(from_easy) <= 32  # both sources drawn
    img, q, a = data[from_easy[0]]
    assert img.shape == (56, 56, 3) and img.dtype == np.uint8 and a == "red"
    again = MixedDataset(easy, length=40, synthetic_fraction=0.5, seed=0, image_size=56)
    assert all((again[k][0] == items[k][0]).all() and again[k][1:] == items[k][1:] for k in (0, 5, 39))
    with pytest.raises(ValueError, match="easy-VQA"):
        MixedDataset([], 4, 0.5, 0)


def test_training_continues_from_a_saved_adapter(tmp_path):
    model, _ = tiny_llava(seed=5)
    loras = add_lora(model, rank=2, alpha=4.0)
    _randomize_lora(loras)
    path = save_adapter(model, loras, tmp_path, {"samples_seen": 10})
    fresh, _ = tiny_llava(seed=6)
    fresh_loras = add_lora(fresh, rank=2, alpha=4.0)
    info = _continue_from(path, fresh.model.multi_modal_projector, fresh_loras)
    assert info["previous_samples"] == 10
    for name, lora in loras.items():
        torch.testing.assert_close(fresh_loras[name].B, lora.B.half().float())
    torch.testing.assert_close(fresh.model.multi_modal_projector.linear_1.weight,
                               model.model.multi_modal_projector.linear_1.weight)
    other, _ = tiny_llava(seed=6)
    with pytest.raises(ValueError, match="LoRA layers do not match"):
        _continue_from(path, other.model.multi_modal_projector, add_lora(other, 2, 4.0, targets=("q_proj",)))
