"""Phi-3-vision-128k-instruct: HD transform into 336 px crops plus a global thumbnail.

Reference: the checkpoint's remote code ``image_processing_phi3_v.py`` (``HD_transform``,
``padding_336``, ``calc_hd_transform_size``, ``calc_padded_size`` and
``calc_num_image_tokens_from_image_size``) and ``processing_phi3_v.py`` (each ``<|image_N|>`` tag
becomes ``num_img_tokens`` copies of ``-N``). vLLM's ``phi3v.py`` ``_calc_hd_transform_size``
follows the same file. Phi-3.5-vision-instruct ships the identical rule with a different
``num_crops`` default; ``phi3_5_vision.py`` imports everything shared from here.

The chat format is the checkpoint's ``tokenizer_config.json`` ``chat_template`` (identical for
Phi-3-vision-128k-instruct and Phi-3.5-vision-instruct)::

    {% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content']
    + '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] !=
    'assistant' %}{{- '<|assistant|>\\n' -}}{% endif %}

(public copies: llama.cpp ``tests/test-chat-template.cpp`` "Phi-3-vision", onnxruntime-extensions
``PhiVisionChatTemplate``). The template only concatenates strings; where the images go is the
caller's text, and the model cards write ``<|image_1|>\\n`` before the question (several images:
``<|image_1|>\\n<|image_2|>\\n...``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vlmlab.families.base import Checkpoint, Family, ImageLayout, KVGeometry, OptionSpec
from vlmlab.protocol.core import Chat, ImagePart, TextPart

CROP = 336  # image_processing_phi3_v.py: HD_transform / padding_336 work in 336 px units
# One 336 crop -> 24x24 CLIP ViT-L/14 patches -> 2x2 merged -> 12x12 = 144 features
# (preprocessor_config.json num_img_tokens 144).
FEATURES_PER_CROP = 144
FEATURE_ROWS_PER_CROP = 12  # one sub_GN / glb_GN newline embedding after each of the 12 rows
DEFAULT_NUM_CROPS = 16  # microsoft/Phi-3-vision-128k-instruct preprocessor_config.json num_crops


def hd_scale(width: int, height: int, num_crops: int) -> int:
    """The number of 336 px crops along the long side (``scale`` in ``HD_transform``).

    The largest ``s`` with ``s * ceil(s / ratio) <= num_crops``, ratio = long / short side. The
    reference computes this in float64 (``np.ceil(scale / ratio)``); Python floats are float64, so
    the same expressions give the same answer on every edge case.
    """
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def hd_canvas(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """The (width, height) the HD transform produces, as ``calc_hd_transform_size``.

    Portrait images are transposed so the long side is the width, resized to ``336*s`` wide with
    the height ``int(new_w / ratio)`` (truncated, float64), padded (white, centred) up to a multiple
    of 336, and transposed back. The height can truncate to 0 for images flatter than ``336*s:1``;
    the size arithmetic still answers then (see :func:`phi3v_layout`).
    """
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    new_long = hd_scale(width, height, num_crops) * CROP
    new_short = int(new_long / ratio)
    padded_short = math.ceil(new_short / CROP) * CROP
    return (padded_short, new_long) if transposed else (new_long, padded_short)


def tokens_for_canvas(canvas_width: int, canvas_height: int) -> int:
    """Prompt positions of an HD canvas: ``(rows*cols + 1)*144 + 1 + (rows + 1)*12``.

    ``rows*cols*144`` crop features + ``rows*12`` sub_GN newlines (one per feature row of the
    grid) + 144 global-thumbnail features + 12 global newlines + 1 glb_GN separator. Newlines
    follow the rows of the final (un-transposed) canvas, so the count is not symmetric under
    transpose.
    """
    rows, cols = canvas_height // CROP, canvas_width // CROP
    return (rows * cols + 1) * FEATURES_PER_CROP + 1 + (rows + 1) * FEATURE_ROWS_PER_CROP


def phi3v_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    """The HD-transform layout of one image for ``options["num_crops"]``.

    Tiny images are upscaled to the largest grid (1x1 -> 2x2 at num_crops=4). For images so flat
    that the short side truncates to 0 px (e.g. 6000x1), the real ``HD_transform`` fails when it
    resizes to a zero height, while the reference size function
    ``calc_num_image_tokens_from_image_size`` (what vLLM counts with) still returns a number; we
    return that number (157 for 6000x1) rather than refuse, so planning matches vLLM's count.
    """
    canvas_w, canvas_h = hd_canvas(width, height, options["num_crops"])
    rows, cols = canvas_h // CROP, canvas_w // CROP
    tokens = tokens_for_canvas(canvas_w, canvas_h)
    return ImageLayout(
        tokens=tokens,
        # The whole <|image_N|> tag is replaced by `tokens` copies of -N and every one of those
        # positions takes an embedding from the image module (features or learned newlines).
        vision_embedding_positions=tokens,
        resized=(canvas_w, canvas_h),
        grid=(rows, cols),
        views=rows * cols + 1,  # crops + the 336x336 global thumbnail
    )


# -- chat format ---------------------------------------------------------------------------------


def image_tag(index: int) -> str:
    """``<|image_N|>``, numbered from 1 across the whole conversation (``processing_phi3_v.py``
    requires the ids to be exactly 1..n)."""
    return f"<|image_{index}|>"


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """The chat in the Phi-3(.5)-vision template, ``<|image_N|>\\n`` where each image goes.

    Every message, system included, is ``<|role|>\\n{content}<|end|>\\n``; the generation prompt
    ``<|assistant|>\\n`` is added unless the chat already ends with an assistant turn. Text parts
    are concatenated as they are; each image part becomes ``<|image_N|>\\n`` in place (the model
    cards' layout), so the usual images-then-question message renders exactly as the cards show.
    """
    out: list[str] = []
    image_index = 0
    for message in chat.messages:
        content: list[str] = []
        for part in message.content:
            if isinstance(part, ImagePart):
                image_index += 1
                content.append(image_tag(image_index) + "\n")
            elif isinstance(part, TextPart):
                content.append(part.text)
        out.append(f"<|{message.role}|>\n{''.join(content)}<|end|>\n")
    if add_generation_prompt and chat.messages[-1].role != "assistant":
        out.append("<|assistant|>\n")
    return "".join(out)


def num_crops_option(default: int) -> OptionSpec:
    return OptionSpec(
        "num_crops",
        default,
        int,
        "max 336 px crops of the HD transform (Phi-3.5-vision card: 4 for multi-frame, "
        "16 for single-frame)",
        minimum=1,
    )


# Phi-3-mini text model: config.json num_hidden_layers 32, num_attention_heads 32,
# num_key_value_heads 32 (MHA), hidden_size 3072 -> head_dim 96.
PHI3_MINI_KV = KVGeometry(
    32,
    32,
    96,
    "microsoft/Phi-3-vision-128k-instruct config.json (num_hidden_layers, "
    "num_key_value_heads, hidden_size / num_attention_heads)",
)

FAMILY = Family(
    name="phi3_vision",
    display_name="Phi-3-vision-128k",
    # config.json model_type "phi3_v" is shared with Phi-3.5-vision; it resolves to phi3_5_vision
    # (the newer, recommended checkpoint). Phi-3-vision is reached by name or hub id.
    model_types=(),
    aliases=("phi-3-vision", "phi3-vision-128k"),
    layout_rule=phi3v_layout,
    render_prompt_fn=render_prompt,
    options=(num_crops_option(DEFAULT_NUM_CROPS),),
    # Phi-3-vision is a single-image model: the Phi-3.5-vision model card introduces multi-frame
    # (multi-image) input as new, and the Phi-3-vision card's examples use one <|image_1|>.
    max_images=1,
    image_placeholder=image_tag(1),
    checkpoints=(
        Checkpoint(
            hub_id="microsoft/Phi-3-vision-128k-instruct",
            # Model card: "4.2B parameters" (image encoder, connector, projector, Phi-3-mini);
            # the hub's safetensors count is ~4.15B. Approximate.
            params=4_150_000_000,
            kv=PHI3_MINI_KV,
            max_model_len=131_072,  # config.json max_position_embeddings (128k)
            source="microsoft/Phi-3-vision-128k-instruct model card and config.json (approximate)",
            aliases=("phi-3-vision-128k-instruct",),
        ),
    ),
    source=(
        "image_processing_phi3_v.py calc_hd_transform_size / calc_num_image_tokens_from_image_size"
    ),
    # Placeholders are numbered across the prompt (<|image_1|>, <|image_2|>).
    splice_images=False,
)
