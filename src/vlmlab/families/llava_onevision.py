"""LLaVA-OneVision: SigLIP-so400m 384/14 tiles on a 6x6 anyres grid, capped by ``anyres_max_9``.

Reference: transformers ``models/llava_onevision/processing_llava_onevision.py``
(``LlavaOnevisionProcessor.replace_image_token``, ``_get_number_of_features``,
``_get_unpadded_features``), built with the llava-hf checkpoints' values:
processor_config.json ``num_image_tokens 729``, ``vision_feature_select_strategy "full"``,
``vision_aspect_ratio "anyres_max_9"``; preprocessor_config.json ``size 384x384`` and the 36
``image_grid_pinpoints`` 384*i x 384*j (i, j = 1..6). Selection and unpadding are LLaVA-NeXT's
(shared helpers in :mod:`vlmlab.families.llava_next`) with tile 384 and 27x27 features.

A prompt (sample) with more than one image skips anyres: each image is only its base view,
729 features + 1 image_newline (``replace_image_token``: ``num_image_tokens + 1`` when the
sample's ``batch_num_images != 1``). :func:`multi_image_tokens` is that rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from vlmlab.families.base import Checkpoint, Family, ImageLayout, KVGeometry, OptionSpec
from vlmlab.families.llava_next import select_best_resolution, unpadded_feature_grid
from vlmlab.protocol.core import Chat, ImagePart, TextPart

TILE = 384  # preprocessor_config.json size {"height": 384, "width": 384}
SIDE = 27  # sqrt(num_image_tokens): SigLIP 384 px / 14 px patches
BASE_FEATURES = SIDE * SIDE  # 729 = processor_config.json num_image_tokens; "full" keeps all
MAX_NUM_PATCHES = 9  # vision_aspect_ratio "anyres_max_9"
DOWNSAMPLE_THRESHOLD = 1.1  # _get_unpadded_features: bilinear downsample only when ratio > 1.1
# preprocessor_config.json image_grid_pinpoints, (height, width), row-major over i then j.
PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (TILE * i, TILE * j) for i in range(1, 7) for j in range(1, 7)
)
IMAGE_PLACEHOLDER = "<image>"


def llava_onevision_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    """One image alone in its prompt: 729 base features + unpadded (and, past 9 tiles' worth,
    downsampled) tile features + one image_newline per remaining feature row.

    ``grid`` is the tile grid before the anyres_max_9 downsample; every position is an
    ``<image>`` token filled by the vision path. With ``multi_image`` (the image shares its
    prompt with others): the base view of the image padded to a square, 729 + 1 tokens.
    """
    if options.get("multi_image"):
        return ImageLayout(tokens=BASE_FEATURES + 1, vision_embedding_positions=BASE_FEATURES + 1, resized=(TILE, TILE), grid=(1, 1), views=1)
    canvas_h, canvas_w = select_best_resolution(height, width, PINPOINTS)
    rows, cols = canvas_h // TILE, canvas_w // TILE
    feat_h, feat_w = unpadded_feature_grid(height, width, rows, cols, SIDE)
    unpadded, newlines = feat_h * feat_w, feat_h
    ratio = math.sqrt(feat_h * feat_w / (MAX_NUM_PATCHES * SIDE**2))
    if ratio > DOWNSAMPLE_THRESHOLD:
        # Float floor division, then int(), exactly as the reference.
        unpadded = int(feat_h // ratio) * int(feat_w // ratio)
        newlines = int(feat_h // ratio)
    tokens = BASE_FEATURES + unpadded + newlines
    return ImageLayout(
        tokens=tokens,
        vision_embedding_positions=tokens,
        resized=(canvas_w, canvas_h),
        grid=(rows, cols),
        views=rows * cols + 1,
    )


def multi_image_tokens(sizes: Sequence[tuple[int, int]], options: Mapping[str, Any]) -> list[int]:
    """Per-image tokens when several images share one prompt: 729 + 1 each, whatever the size."""
    del options
    return [BASE_FEATURES + 1 for _ in sizes]


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """llava-hf/llava-onevision-qwen2-*-ov-hf chat_template.json, as plain Python.

    Every message is ``<|im_start|>{role} `` (a space, not a newline) + all of its ``<image>``
    placeholders first + ``\\n{text}`` for each text part + ``<|im_end|>``, with no newline
    between turns and no default system prompt; the generation prompt is
    ``<|im_start|>assistant\\n``. Model card example:
    ``<|im_start|>user <image>\\nWhat is shown in this image?<|im_end|><|im_start|>assistant\\n``.
    (Same template string as transformers' tests/models/llava_onevision processor tests.)
    """
    out: list[str] = []
    for message in chat.messages:
        out.append(f"<|im_start|>{message.role} ")
        out.append(IMAGE_PLACEHOLDER * sum(isinstance(p, ImagePart) for p in message.content))
        out.extend("\n" + p.text for p in message.content if isinstance(p, TextPart))
        out.append("<|im_end|>")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# Parameter counts: the Hub pages' safetensors totals (8.03B, 894M); a meta-device
# instantiation of LlavaOnevisionForConditionalGeneration with the config values (SigLIP with 26
# layers and no pooling head, Qwen2 text model) gives 8,030,348,832 and 893,618,208; the last
# few hundred thousand depend on the padded vocabulary size, hence approximate.
CHECKPOINTS = (
    Checkpoint(
        hub_id="llava-hf/llava-onevision-qwen2-7b-ov-hf",
        params=8_030_000_000,  # approximate (8.03B)
        # text_config = Qwen2-7B-Instruct: 28 layers, 4 KV heads, 3584/28 = 128
        kv=KVGeometry(
            28, 4, 128, "llava-hf/llava-onevision-qwen2-7b-ov-hf config.json text_config"
        ),
        max_model_len=32_768,  # Qwen2-7B-Instruct max_position_embeddings
        source="llava-hf/llava-onevision-qwen2-7b-ov-hf config.json and model page (8.03B params)",
        aliases=("llava-onevision-qwen2-7b-ov", "llava-ov-7b"),
    ),
    Checkpoint(
        hub_id="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        params=894_000_000,  # approximate (894M)
        # text_config = Qwen2-0.5B-Instruct: 24 layers, 2 KV heads, 896/14 = 64
        kv=KVGeometry(
            24, 2, 64, "llava-hf/llava-onevision-qwen2-0.5b-ov-hf config.json text_config"
        ),
        max_model_len=32_768,  # Qwen2-0.5B-Instruct max_position_embeddings
        source="llava-hf/llava-onevision-qwen2-0.5b-ov-hf config.json and model page (894M params)",
        aliases=("llava-onevision-qwen2-0.5b-ov", "llava-ov-0.5b"),
    ),
)

FAMILY = Family(
    name="llava_onevision",
    display_name="LLaVA-OneVision",
    model_types=("llava_onevision",),
    aliases=("llava-onevision", "llava-ov"),
    layout_rule=llava_onevision_layout,
    render_prompt_fn=render_prompt,
    options=(
        OptionSpec(
            "multi_image", False, bool,
            "the image shares its prompt with other images: only its base view, padded to a square (729 + 1 tokens); "
            "set per image by the engine, as the processor does for such prompts",
        ),
    ),  # fmt: skip
    # The OneVision stage trains single-image, multi-image and video samples together (model
    # card: "supports multi-image and multi-prompt generation"). No hard limit exists; the
    # paper keeps the visual budget per sample about equal across scenarios (single image up to
    # 729 * (1 + 9) tokens), i.e. roughly 10 base views at 730 tokens, used here as the bound.
    max_images=10,
    image_placeholder=IMAGE_PLACEHOLDER,
    # One <image> per feature: anyres, unpadded, newline rows as LLaVA-NeXT for an image alone;
    # 729 + 1 for each of several (multi_image). Which applies depends on the other images of
    # the prompt, so the server's cache cannot key an image by its bytes alone (splice_images).
    expand_placeholder=lambda layout: IMAGE_PLACEHOLDER * layout.tokens,
    checkpoints=CHECKPOINTS,
    source="transformers LlavaOnevisionProcessor._get_number_of_features (llava-hf config values)",
    multi_image_rule=multi_image_tokens,
    # Several images in one prompt skip anyres, so one image's expansion depends on the others.
    splice_images=False,
)
