"""Qwen2-VL and Qwen2.5-VL.

Images and videos become runs of ``image_token_id`` / ``video_token_id``; the text model uses 3-axis
M-RoPE positions computed at the top level from ``mm_token_type_ids`` and the grid sizes. Pruning
gathers the (already computed) cos/sin of the survivors, so they keep their original positions.
"""

from .base import Adapter, register

QWEN2_VL = register(
    Adapter(
        family="qwen2_vl",
        model_classes=("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
        visual_token_attrs=("image_token_id", "video_token_id"),
    )
)
QWEN2_5_VL = register(
    Adapter(
        family="qwen2_5_vl",
        model_classes=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
        visual_token_attrs=("image_token_id", "video_token_id"),
    )
)
