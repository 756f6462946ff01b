"""The generation harness on tiny random models of all four families (CPU, seconds).

A tiny encoder maps (PIL image, question) to the family's inputs through ``make_inputs``: the image
size picks the visual geometry, the question's word count the prompt length and its hash the tokens,
so prompts in a batch are ragged and every sample is rebuilt identically on its own.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image
from tiny_models import FACTORIES, FAMILIES, IMAGES, PAD_ID

from fitprune import Recipe
from fitprune.baselines import fastv
from fitprune.evaluation import EvalSample
from fitprune.evaluation.harness import (HFEncoder, Prediction, collate, format_question, generate_answers,
                                         sample_answers, score, to_rows)

POISON_ID = 249  # a text token no random prompt contains (they draw from [1, 240))


class TinyEncoder:
    pad_token_id = PAD_ID

    def __init__(self, family, make_inputs):
        self.family, self.make_inputs = family, make_inputs

    def encode(self, image, question):
        if image is None or "noimg" in question:
            spec = None
        elif self.family == "llava":
            spec = "img"
        else:
            spec = (image.height, image.width)  # NeXT: image size; Qwen: patch grid
        seed = zlib.crc32(question.encode()) % 997
        out = self.make_inputs([(3, spec, len(question.split()), seed)])
        if "poison" in question:
            out["input_ids"][0, -1] = POISON_ID
        return out

    def decode(self, ids):
        return " ".join(str(int(t)) for t in ids)


@dataclass
class PilSample:  # like SyntheticSample: the image is a PIL object
    id: str
    question: str
    image: Image.Image | None
    answer: str = "x"
    metadata: dict = field(default_factory=dict)


def _image(family, k):
    spec = IMAGES[family][k]
    h, w = (24, 24) if spec == "img" else spec
    return Image.new("RGB", (w, h), (40 * k, 90, 200))


def _samples(family, n=7):
    words = ["what", "is", "in", "the", "picture", "now", "please", "tell", "me", "quickly", "ok"]
    return [PilSample(f"s{i}", " ".join(words[: 2 + (3 * i) % 9]), _image(family, i % 2)) for i in range(n)]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, make_inputs = FACTORIES[request.param]()
    return request.param, model, TinyEncoder(request.param, make_inputs)


def _texts(preds):
    assert all(p.ok for p in preds), [p.error for p in preds]
    return [p.prediction for p in preds]


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_batched_equals_per_sample(family_model):
    family, model, enc = family_model
    samples = _samples(family)
    calls = []
    batched = generate_answers(model, enc, samples, batch_size=4, max_new_tokens=6,
                               progress=lambda done, total: calls.append((done, total)))
    alone = generate_answers(model, enc, samples, batch_size=1, max_new_tokens=6)
    assert _texts(batched) == _texts(alone)
    assert [p.sample_id for p in batched] == [s.id for s in samples]
    assert calls == [(4, 7), (7, 7)]
    assert all(p.visual_tokens > 0 and p.visual_kept == p.visual_tokens for p in batched)
    # the harness decodes exactly the new tokens of a plain generate, cut at EOS
    single = enc.encode(samples[2].image, samples[2].question)
    with torch.no_grad():
        out = model.generate(**single, max_new_tokens=6, do_sample=False, pad_token_id=PAD_ID)
    new = out[0, single["input_ids"].shape[1]:].tolist()
    new = new[: new.index(2)] if 2 in new else new
    assert batched[2].prediction == " ".join(map(str, new))


@pytest.mark.parametrize("kind", ["fitprune", "fastv"])
def test_recipe_batched_equals_per_sample_and_is_removed(family_model, kind):
    family, model, enc = family_model
    recipe = (Recipe(drop_fractions=(0.0, 0.25, 0.3, 0.0), family=family) if kind == "fitprune"
              else fastv(4, layer=2, ratio=0.5, family=family))
    samples = _samples(family, n=5)
    hooks, impl = _hook_count(model), model.model.language_model.config._attn_implementation
    stock = generate_answers(model, enc, samples, batch_size=5, max_new_tokens=5)
    batched = generate_answers(model, enc, samples, recipe=recipe, batch_size=3, max_new_tokens=5)
    alone = generate_answers(model, enc, samples, recipe=recipe, batch_size=1, max_new_tokens=5)
    assert _texts(batched) == _texts(alone)
    for p, s in zip(batched, stock):
        assert p.visual_tokens == s.visual_tokens
        assert p.visual_kept == p.visual_tokens - sum(recipe.drop_counts(p.visual_tokens))
    assert [p.visual_kept for p in batched] == [p.visual_kept for p in alone]
    assert not hasattr(model, "_fitprune")
    assert _hook_count(model) == hooks
    assert model.model.language_model.config._attn_implementation == impl
    assert _texts(generate_answers(model, enc, samples, batch_size=5, max_new_tokens=5)) == _texts(stock)


@pytest.fixture(scope="module")
def llava():
    model, make_inputs = FACTORIES["llava"]()
    return model, TinyEncoder("llava", make_inputs)


def test_failures_are_recorded_and_the_run_goes_on(llava, tmp_path):
    model, enc = llava
    good = tmp_path / "good.png"
    _image("llava", 0).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really an image")
    buf = __import__("io").BytesIO()
    _image("llava", 1).save(buf, format="PNG")

    class Unreadable:  # an image property that reads a file that is gone
        id, question, answer = "gone", "what is it", "x"

        @property
        def image(self):
            raise FileNotFoundError(2, "No such file", "/nowhere/gone.png")

    samples = [
        EvalSample("ok1", str(good), "what colour is it", ["blue"]),
        EvalSample("missing", str(tmp_path / "nope.jpg"), "what is it", ["x"]),
        EvalSample("corrupt", str(corrupt), "what is it", ["x"]),
        EvalSample("empty", str(good), "   ", ["x"]),
        PilSample("novis", "noimg what is it", _image("llava", 0)),
        EvalSample("textonly", None, "what is it", ["x"]),
        Unreadable(),
        EvalSample("embedded", None, "what is shown here", ["x"], metadata={"image_bytes": buf.getvalue()}),
        PilSample("ok2", "and what is this", _image("llava", 1)),
    ]
    preds = generate_answers(model, enc, samples, batch_size=3, max_new_tokens=3)
    assert [p.sample_id for p in preds] == ["ok1", "missing", "corrupt", "empty", "novis", "textonly", "gone",
                                           "embedded", "ok2"]
    errors = {p.sample_id: p.error for p in preds}
    assert errors["missing"] == f"missing image: {tmp_path / 'nope.jpg'}"
    assert errors["corrupt"].startswith(f"corrupt image: {corrupt}: UnidentifiedImageError")
    assert errors["empty"] == "empty question"
    assert errors["novis"] == "no visual tokens"
    assert errors["textonly"] == "no image"
    assert errors["gone"] == "missing image: /nowhere/gone.png"
    assert {k for k, v in errors.items() if v is None} == {"ok1", "embedded", "ok2"}
    assert all((p.prediction is not None) == p.ok for p in preds)
    assert preds[0].answers == ["blue"] and preds[-1].answers == ["x"]
    s = score(preds, "exact_match")
    assert (s["n"], s["n_scored"], s["n_failed"]) == (9, 3, 6)
    assert s["failures"] == {"missing image": 2, "corrupt image": 1, "empty question": 1, "no visual tokens": 1,
                             "no image": 1}
    # text-only samples run when asked for
    text = generate_answers(model, enc, [samples[5], samples[0]], allow_text_only=True, max_new_tokens=3)
    assert [p.ok for p in text] == [True, True] and text[0].visual_tokens == 0


def test_generation_error_retries_one_by_one(llava, monkeypatch):
    model, enc = llava
    samples = _samples("llava", n=6)
    samples[4].question = "poison " + samples[4].question
    clean = generate_answers(model, enc, samples, batch_size=3, max_new_tokens=4)
    stock_generate, sizes = model.generate, []

    def flaky(**kw):
        sizes.append(kw["input_ids"].shape[0])
        if (kw["input_ids"] == POISON_ID).any():
            raise RuntimeError("boom\nsecond line")
        return stock_generate(**kw)

    monkeypatch.setattr(model, "generate", flaky)
    preds = generate_answers(model, enc, samples, batch_size=3, max_new_tokens=4)
    assert sizes == [3, 3, 1, 1, 1]
    assert [p.error for p in preds] == [None] * 4 + ["generation failed: RuntimeError: boom", None]
    others = [i for i in range(6) if i != 4]
    assert [preds[i].prediction for i in others] == [clean[i].prediction for i in others]


def test_rows_finished_early_are_cut_at_eos(llava, monkeypatch):
    model, enc = llava
    samples = _samples("llava", n=3)
    free = generate_answers(model, enc, samples, max_new_tokens=6)
    eos = int(free[0].prediction.split()[1])  # sample 0 stops after one token, the others may run on
    monkeypatch.setattr(model.generation_config, "eos_token_id", eos)
    batched = generate_answers(model, enc, samples, batch_size=3, max_new_tokens=6)
    alone = generate_answers(model, enc, samples, batch_size=1, max_new_tokens=6)
    assert _texts(batched) == _texts(alone)
    assert batched[0].prediction == free[0].prediction.split()[0]
    assert any(len(p.prediction.split()) > 1 for p in batched)


def test_keyboard_interrupt_propagates_and_recipe_is_removed(llava, monkeypatch):
    model, enc = llava

    def interrupt(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "generate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate_answers(model, enc, _samples("llava", 2), recipe=fastv(4, family="llava"))
    assert not hasattr(model, "_fitprune")


def test_argument_errors(llava):
    model, enc = llava
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, enc, [], batch_size=0)
    with pytest.raises(TypeError, match="HFEncoder"):
        generate_answers(model, object(), [])
    with pytest.raises(ValueError, match="family"):  # a recipe for another family fails before any work
        generate_answers(model, enc, _samples("llava", 1), recipe=fastv(4, family="qwen2_vl"))
    assert not hasattr(model, "_fitprune")
    assert generate_answers(model, enc, []) == []


# --- collate ---------------------------------------------------------------------------------------

def test_collate_pads_sequences_left_and_pixels_with_zeros():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "mm_token_type_ids": torch.tensor([[0, 1, 0]]),
         "pixel_values": torch.ones(1, 2, 3, 4, 4), "image_sizes": torch.tensor([[16, 32]])}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.tensor([[1]]),
         "mm_token_type_ids": torch.tensor([[1]]),
         "pixel_values": torch.full((1, 4, 3, 4, 4), 2.0), "image_sizes": torch.tensor([[32, 32]])}
    out = collate([a, b], pad_token_id=9)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert out["pixel_values"].shape == (2, 4, 3, 4, 4)
    assert out["pixel_values"][0, 2:].abs().sum() == 0 and (out["pixel_values"][0, :2] == 1).all()
    assert out["image_sizes"].tolist() == [[16, 32], [32, 32]]
    # Qwen2-VL: patch rows and grid rows just stack; a text-only sample contributes none
    q = [{"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.randn(48, 24),
          "image_grid_thw": torch.tensor([[1, 6, 8]])},
         {"input_ids": torch.tensor([[3]])},
         {"input_ids": torch.tensor([[4]]), "pixel_values": torch.randn(64, 24),
          "image_grid_thw": torch.tensor([[1, 8, 8]])}]
    out = collate(q, pad_token_id=0)
    assert out["pixel_values"].shape == (112, 24) and out["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 8]]
    with pytest.raises(ValueError, match="expected \\(1, 2\\)"):
        collate([{"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1]])}], 0)


# --- helpers and scoring ---------------------------------------------------------------------------

def test_sample_answers_and_format_question():
    assert sample_answers(EvalSample("a", None, "q", ["x", "y"])) == ["x", "y"]
    assert sample_answers(PilSample("b", "q", None, answer="red")) == ["red"]
    mc = EvalSample("c", None, "Which animal?", ["B"], choices=["cat", "dog"], metadata={"hint": "A pet."})
    assert format_question(mc) == ("A pet.\nWhich animal?\nA. cat\nB. dog\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert format_question(EvalSample("d", None, "Which?", ["x"])) == "Which?"


def _p(pred, answers, error=None, choices=None):
    return Prediction("id", "q", pred, answers, error=error, choices=choices)


def test_score_exact_match_and_failures():
    preds = [_p("Two", ["2"]), _p("cat", ["cat"]), _p("dog", ["bird"]), _p(None, ["x"], error="missing image: a.png")]
    s = score(preds, "exact_match")
    assert (s["n"], s["n_scored"], s["n_failed"]) == (4, 3, 1)
    assert s["value"] == pytest.approx(2 / 3) and s["value_all"] == pytest.approx(0.5)
    assert s["stderr"] == pytest.approx(1 / 3)  # sample variance 1/3, over n = 3
    assert s["failures"] == {"missing image": 1}


def test_score_vqa_accuracy():
    tens = ["a"] * 9 + ["b"]
    s = score([_p("b", tens), _p("a", tens)], "vqa_accuracy")
    assert s["value"] == pytest.approx(0.65)  # 0.3 and 1.0
    assert s["stderr"] == pytest.approx(0.35)


def test_score_pope():
    preds = [_p("Yes", ["yes"]), _p("No", ["yes"]), _p("yes there is", ["no"]), _p("no", ["no"]),
             _p(None, ["no"], error="no visual tokens")]
    s = score(preds, "pope")
    assert s["value"] == s["accuracy"] == pytest.approx(0.5)
    assert (s["precision"], s["recall"], s["f1"], s["yes_ratio"]) == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert s["stderr"] == pytest.approx(math.sqrt(1 / 12))
    assert s["n_failed"] == 1 and s["value_all"] == pytest.approx(0.4)


def test_score_multiple_choice_and_errors():
    ch = ["cat", "dog"]
    s = score([_p(reply, ["B"], choices=ch) for reply in ("B", "(A)", "dog")], "multiple_choice")
    assert s["value"] == pytest.approx(2 / 3) and s["stderr"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="choices"):
        score([_p("B", ["B"])], "multiple_choice")
    with pytest.raises(ValueError, match="unknown metric"):
        score([], "bleu")
    with pytest.raises(ValueError, match="no reference answers"):
        score([_p("x", [])], "exact_match")
    one = score([_p("x", ["x"]), _p(None, ["x"], error="empty question")], "exact_match")
    assert one["value"] == 1.0 and math.isnan(one["stderr"])
    none = score([_p(None, ["x"], error="empty question")], "pope")
    assert none["n_scored"] == 0 and math.isnan(none["value"]) and math.isnan(none["f1"])


def test_to_rows_for_parquet():
    pa = pytest.importorskip("pyarrow")
    preds = [_p("cat", ["cat", "kitty"]), _p(None, ["x"], error="empty question", choices=["a", "b"])]
    rows = to_rows(preds, run_id="r1", budget=0.6)
    assert rows[0] == {"sample_id": "id", "question": "q", "prediction": "cat", "answers": ["cat", "kitty"],
                       "choices": None, "error": None, "visual_tokens": None, "visual_kept": None,
                       "prefill_flops": None, "prefill_flops_full": None, "prefill_flops_paper": None,
                       "prefill_flops_paper_full": None, "run_id": "r1", "budget": 0.6}
    table = pa.Table.from_pylist(rows)
    assert table.column("answers").type == pa.list_(pa.string()) and table.num_rows == 2
    with pytest.raises(ValueError, match="collide"):
        to_rows(preds, error="x")


# --- HFEncoder over stock HF processors (word-level tokenizer built in code, tiny image sizes) -------

_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}IMG {% else %}"
             "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


def _tokenizer(image_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: 10 + i for i, w in enumerate("USER: ASSISTANT: what is in the picture colour shape here".split())})
    vocab.update(image_tokens)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(image_tokens)})
    return fast


def _hf_processor(family):
    import transformers as tf

    if family == "llava":  # 24 px, patch 4: 36 tokens
        return tf.LlavaProcessor(
            image_processor=tf.CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}),
            tokenizer=_tokenizer({"<image>": 250}), patch_size=4, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, image_token="<image>", chat_template=_TEMPLATE.replace("IMG", "<image>"))
    if family == "llava_next":  # the tiny model's pinpoints: images give 3 or 5 tiles
        return tf.LlavaNextProcessor(
            image_processor=tf.LlavaNextImageProcessorPil(
                size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]]),
            tokenizer=_tokenizer({"<image>": 250}), patch_size=4, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, image_token="<image>", chat_template=_TEMPLATE.replace("IMG", "<image>"))

    class QwenProcessor(tf.Qwen2VLProcessor):
        # Without torchvision, transformers 5.23 cannot type-check video_processor=None (its lazy
        # VIDEO_PROCESSOR_MAPPING lookup raises AttributeError); images never need it.
        def check_argument_for_proper_class(self, name, argument):
            return type(argument)

    return QwenProcessor(
        image_processor=tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 64 * 64}, patch_size=2,
                                                   merge_size=2, temporal_patch_size=2),
        tokenizer=_tokenizer({"<|image_pad|>": 250, "<|video_pad|>": 251, "<|vision_start|>": 252,
                              "<|vision_end|>": 253}),
        chat_template=_TEMPLATE.replace("IMG", "<|vision_start|><|image_pad|><|vision_end|>"))


def test_hf_encoder_with_stock_processors(family_model):
    family, model, _ = family_model
    enc = HFEncoder(_hf_processor(family))
    sizes = [(30, 20), (20, 30), (32, 32), (17, 40)]
    questions = ["what is here", "what colour", "what shape is in the picture", "what"]
    samples = [PilSample(f"h{i}", q, Image.new("RGB", wh, (30 * i, 100, 50)))
               for i, (q, wh) in enumerate(zip(questions, sizes))]
    first = enc.encode(samples[0].image, samples[0].question)
    assert first["input_ids"][0, :2].tolist() == [10, 250 if family.startswith("llava") else 252]
    batched = generate_answers(model, enc, samples, batch_size=4, max_new_tokens=5)
    alone = generate_answers(model, enc, samples, batch_size=1, max_new_tokens=5)
    assert _texts(batched) == _texts(alone)
    if family != "llava":  # ragged visual counts (NeXT tiles, Qwen grids) went through one batch
        assert len({p.visual_tokens for p in batched}) > 1


def test_demo_processor_is_wrapped(llava):
    from fitprune.demo.build import DemoProcessor

    model, _ = llava
    tok = _tokenizer({"<image>": 250})
    tok.chat_template = "{% for m in messages %}USER: {{ m['content'] }}{% endfor %} ASSISTANT:"
    processor = DemoProcessor(tok, image_size=24, patch_size=4)  # 36 tokens, as the tiny LLaVA
    samples = [PilSample(f"d{i}", q, _image("llava", i)) for i, q in enumerate(["what colour", "what is in the picture"])]
    batched = generate_answers(model, processor, samples, batch_size=2, max_new_tokens=4)
    alone = generate_answers(model, processor, samples, batch_size=1, max_new_tokens=4)
    assert _texts(batched) == _texts(alone) and [p.visual_tokens for p in batched] == [36, 36]
    assert generate_answers(model, processor, [EvalSample("t", None, "what", ["x"])],
                            allow_text_only=True)[0].error.startswith("encode failed: ValueError")


def test_hf_encoder_validates_prompt():
    class Proc:
        chat_template = None
        tokenizer = type("Tok", (), {"pad_token_id": None, "eos_token_id": 7})()

    with pytest.raises(ValueError, match="chat template"):
        HFEncoder(Proc())
    with pytest.raises(ValueError, match="placeholder"):
        HFEncoder(Proc(), "USER: <image> ASSISTANT:")
    enc = HFEncoder(Proc(), "USER: <image>\n{question} ASSISTANT:")
    assert enc.pad_token_id == 7 and enc.text("a {b}") == "USER: <image>\na {b} ASSISTANT:"
