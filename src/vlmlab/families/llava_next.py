"""LLaVA-NeXT (LLaVA-1.6): CLIP-L/14-336 tiles on an "anyres" pinpoint grid, plus a base view.

Reference: transformers ``models/llava_next/processing_llava_next.py``
(``LlavaNextProcessor._get_number_of_features`` / ``_get_unpadded_features``) and
``image_processing_utils.select_best_resolution``, built with the llava-hf checkpoints'
values: preprocessor_config.json ``crop_size 336``, ``size.shortest_edge 336``,
``image_grid_pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]]``;
processor_config.json ``patch_size 14``, ``vision_feature_select_strategy "default"``,
``num_additional_image_tokens 1``. vLLM and SGLang count with the same processor.

The anyres helpers here (:func:`select_best_resolution`, :func:`unpadded_feature_grid`) are
shared with LLaVA-OneVision (:mod:`vlmlab.families.llava_onevision`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlmlab.families.base import Checkpoint, Family, ImageLayout, KVGeometry
from vlmlab.protocol.core import Chat, ImagePart, Message, TextPart

TILE = 336  # preprocessor_config.json crop_size / size.shortest_edge
PATCH = 14  # processor_config.json patch_size (CLIP ViT-L/14)
SIDE = TILE // PATCH  # 24 feature rows/cols per tile
# 576: the 336x336 base view; CLS is added (+1), then dropped by strategy "default".
BASE_FEATURES = SIDE * SIDE
# preprocessor_config.json image_grid_pinpoints, read as (height, width) by transformers.
PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)
IMAGE_PLACEHOLDER = "<image>"


def select_best_resolution(
    height: int, width: int, pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The (height, width) pinpoint canvas transformers picks for an image.

    Most effective (downscaled, capped at original) pixels first, then least wasted canvas,
    then the earliest pinpoint. Pinpoints are (height, width) as in transformers; the original
    LLaVA code reads them as (width, height), which only matters on ties (tiny images).
    """
    best = pinpoints[0]
    best_effective = 0
    best_wasted = float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        # Strict comparisons: on a full tie the earlier pinpoint stays (also when every
        # effective area is 0 for extreme strips: the first pinpoint wins on waste).
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def unpadded_feature_grid(
    height: int, width: int, rows: int, cols: int, side: int
) -> tuple[int, int]:
    """(feature rows, feature cols) of the tile grid after removing the letterbox padding.

    The image was fitted into ``rows x cols`` tiles of ``side x side`` features and padded
    symmetrically; the padded feature rows (or cols) are dropped, an even number of them.
    ``round(..., 7)`` guards float noise exactly as the reference does.
    """
    current_height = side * rows
    current_width = side * cols
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        current_height -= 2 * ((current_height - new_height) // 2)
    else:
        new_width = int(round(width * (current_height / height), 7))
        current_width -= 2 * ((current_width - new_width) // 2)
    return current_height, current_width


def llava_next_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    """``576`` base features + the unpadded tile features + one image_newline per feature row.

    Every one of those positions is an ``<image>`` token whose embedding is replaced by the
    vision path (image_newline is a learned vector), so all of them are vision positions.
    """
    del options  # LLaVA-NeXT has no processor option that changes the count
    canvas_h, canvas_w = select_best_resolution(height, width, PINPOINTS)
    rows, cols = canvas_h // TILE, canvas_w // TILE
    feat_h, feat_w = unpadded_feature_grid(height, width, rows, cols, SIDE)
    tokens = BASE_FEATURES + feat_h * feat_w + feat_h
    return ImageLayout(
        tokens=tokens,
        vision_embedding_positions=tokens,
        resized=(canvas_w, canvas_h),
        grid=(rows, cols),
        views=rows * cols + 1,
    )


# -- chat formats ------------------------------------------------------------------------------


def _first_text(message: Message) -> str:
    # The templates read message['content'][0]['text']: only the first part. System and
    # assistant messages never hold images (core.Message enforces it), so that is text.
    first = message.content[0] if message.content else None
    return first.text if isinstance(first, TextPart) else ""


def render_prompt_mistral(chat: Chat, add_generation_prompt: bool = True) -> str:
    """llava-hf/llava-v1.6-mistral-7b-hf chat_template.json, as plain Python.

    System: ``<<SYS>>\\n{text}\\n<</SYS>>\\n\\n``. User: ``[INST] `` + one ``<image>\\n`` per image
    (all images of the turn first) + the turn's text parts joined + `` [/INST]``. Assistant:
    `` {text}</s> ``. The template has no generation prompt: ``[/INST]`` already ends the turn,
    so ``add_generation_prompt`` changes nothing. (An older revision of that file wrote
    ``<\\s>`` for ``</s>``; the current one, used here, writes ``</s>``.) Model card example:
    ``[INST] <image>\\nWhat is shown in this image? [/INST]``.
    """
    del add_generation_prompt
    out: list[str] = []
    for message in chat.messages:
        if message.role == "system":
            out.append("<<SYS>>\n" + _first_text(message) + "\n<</SYS>>\n\n")
        elif message.role == "user":
            out.append("[INST] ")
            out.append("<image>\n" * len(message.images))
            out.extend(p.text for p in message.content if isinstance(p, TextPart))
            out.append(" [/INST]")
        else:
            out.append(" " + _first_text(message) + "</s> ")
    return "".join(out)


def render_prompt_vicuna(chat: Chat, add_generation_prompt: bool = True) -> str:
    """llava-hf/llava-v1.6-vicuna-7b-hf chat_template.json (the llava-1.5 template).

    Each non-system message starts with ``USER: `` / ``ASSISTANT: ``; a system message's text is
    emitted bare. All ``<image>\\n`` of a message come first, then each text part followed by a
    space; the generation prompt is ``ASSISTANT:``. Model card example (with the Vicuna system
    text as a system message): ``... USER: <image>\\nWhat is shown in this image? ASSISTANT:``.
    """
    out: list[str] = []
    for message in chat.messages:
        if message.role != "system":
            out.append(message.role.upper() + ": ")
        out.append("<image>\n" * sum(isinstance(p, ImagePart) for p in message.content))
        out.extend(p.text + " " for p in message.content if isinstance(p, TextPart))
    if add_generation_prompt:
        out.append("ASSISTANT:")
    return "".join(out)


# Parameter counts: a meta-device instantiation of LlavaNextForConditionalGeneration with each
# checkpoint's config values (CLIP-L/14-336 + 2-layer projector + text model with the 32064
# vocab); they equal the Hub pages' safetensors totals (7.57B, 7.06B).
CHECKPOINTS = (
    Checkpoint(
        hub_id="llava-hf/llava-v1.6-mistral-7b-hf",
        params=7_566_747_648,
        # text_config = Mistral-7B-Instruct-v0.2: 32 layers, 8 KV heads, 4096/32 = 128
        kv=KVGeometry(32, 8, 128, "llava-hf/llava-v1.6-mistral-7b-hf config.json text_config"),
        max_model_len=32_768,  # text_config max_position_embeddings (Mistral-7B-v0.2)
        source="llava-hf/llava-v1.6-mistral-7b-hf config.json and safetensors total",
        aliases=("llava-v1.6-mistral-7b", "llava-next-mistral-7b"),
    ),
    Checkpoint(
        hub_id="llava-hf/llava-v1.6-vicuna-7b-hf",
        params=7_063_431_168,
        # text_config = Vicuna-7B v1.5 (Llama-2-7B): 32 layers, MHA 32 KV heads, 4096/32 = 128
        kv=KVGeometry(32, 32, 128, "llava-hf/llava-v1.6-vicuna-7b-hf config.json text_config"),
        max_model_len=4_096,  # Llama-2 max_position_embeddings
        source="llava-hf/llava-v1.6-vicuna-7b-hf config.json and safetensors total",
        aliases=("llava-v1.6-vicuna-7b", "llava-next-vicuna-7b"),
    ),
)

FAMILY = Family(
    name="llava_next",
    display_name="LLaVA-NeXT (1.6)",
    model_types=("llava_next",),
    aliases=("llava-next", "llava-v1.6", "llava-1.6"),
    layout_rule=llava_next_layout,
    # The family record holds one renderer: the default (mistral) checkpoint's template. The
    # vicuna checkpoint's template is render_prompt_vicuna above.
    render_prompt_fn=render_prompt_mistral,
    options=(),
    # llava-hf/llava-v1.6-mistral-7b-hf discussion #19 (llava-hf): several images are
    # accepted, "but since the model was not pre-trained with several images interleaved in
    # one prompt, it might not perform well".
    max_images=1,
    image_placeholder=IMAGE_PLACEHOLDER,
    checkpoints=CHECKPOINTS,
    expand_placeholder=lambda layout: IMAGE_PLACEHOLDER * layout.tokens,  # one <image> per feature
    source="transformers LlavaNextProcessor._get_number_of_features (llava-hf config values)",
)
