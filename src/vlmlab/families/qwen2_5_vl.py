"""Qwen2.5-VL: the same 14 px / 2x2-merge ``smart_resize`` rule and chat format as Qwen2-VL.

Reference: transformers ``models/qwen2_5_vl/processing_qwen2_5_vl.py``, which uses
``Qwen2VLImageProcessor`` unchanged (Qwen2.5-VL changed the vision transformer: window
attention, RMSNorm, SwiGLU, not the patching). The Qwen/Qwen2.5-VL-*-Instruct
preprocessor_config.json files ship the same min_pixels 3136 / max_pixels 12845056 as Qwen2-VL,
and chat_template.json is the Qwen2-VL template. The rule lives in :mod:`vlmlab.families.qwen2_vl`.
"""

from __future__ import annotations

from vlmlab.families.base import Checkpoint, Family, KVGeometry
from vlmlab.families.qwen2_vl import (
    IMAGE_PLACEHOLDER,
    MAX_IMAGES,
    expand_placeholder,
    qwen_layout,
    qwen_options,
    render_prompt,
)


def _kv(layers: int, kv_heads: int, repo: str) -> KVGeometry:
    return KVGeometry(
        layers,
        kv_heads,
        128,  # hidden_size / num_attention_heads = 128 for every Qwen2.5 size
        f"{repo} config.json (num_hidden_layers, num_key_value_heads, "
        "hidden_size / num_attention_heads)",
    )


# Parameter counts: a meta-device instantiation of Qwen2_5_VLForConditionalGeneration with each
# checkpoint's config.json values (72B: vision intermediate_size 3456); they equal the Hub
# pages' safetensors totals (3.75B, 8.29B, 73.4B). max_model_len = max_position_embeddings
# (128000) in each config.json.
CHECKPOINTS = (
    Checkpoint(
        hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
        params=8_292_166_656,
        kv=_kv(28, 4, "Qwen/Qwen2.5-VL-7B-Instruct"),  # hidden 3584, 28 heads, 4 KV heads
        max_model_len=128_000,
        source="Qwen/Qwen2.5-VL-7B-Instruct config.json max_position_embeddings; safetensors",
        aliases=("qwen2.5-vl-7b", "qwen2.5-vl-7b-instruct"),
    ),
    Checkpoint(
        hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
        params=3_754_622_976,
        kv=_kv(36, 2, "Qwen/Qwen2.5-VL-3B-Instruct"),  # hidden 2048, 16 heads, 2 KV heads
        max_model_len=128_000,
        source="Qwen/Qwen2.5-VL-3B-Instruct config.json max_position_embeddings; safetensors",
        aliases=("qwen2.5-vl-3b", "qwen2.5-vl-3b-instruct"),
    ),
    Checkpoint(
        hub_id="Qwen/Qwen2.5-VL-72B-Instruct",
        params=73_410_777_344,
        kv=_kv(80, 8, "Qwen/Qwen2.5-VL-72B-Instruct"),  # hidden 8192, 64 heads, 8 KV heads
        max_model_len=128_000,
        source="Qwen/Qwen2.5-VL-72B-Instruct config.json max_position_embeddings; safetensors",
        aliases=("qwen2.5-vl-72b", "qwen2.5-vl-72b-instruct"),
    ),
)

FAMILY = Family(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    aliases=("qwen2.5-vl",),
    layout_rule=qwen_layout,
    render_prompt_fn=render_prompt,
    options=qwen_options(),
    max_images=MAX_IMAGES,  # same planning bound as Qwen2-VL (see there)
    image_placeholder=IMAGE_PLACEHOLDER,
    checkpoints=CHECKPOINTS,
    expand_placeholder=expand_placeholder,
    source=(
        "transformers Qwen2VLImageProcessor smart_resize, used by Qwen2_5_VLProcessor "
        "(variant=hf); qwen-vl-utils 0.0.14 fetch_image + processor (variant=qwen_vl_utils)"
    ),
)
