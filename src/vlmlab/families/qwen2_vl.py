"""Qwen2-VL: 14 px patches merged 2x2, a pixel budget between ``min_pixels`` and ``max_pixels``.

Reference: transformers ``models/qwen2_vl/image_processing_qwen2_vl.py`` (``smart_resize``,
``Qwen2VLImageProcessor.get_number_of_image_patches``) and ``processing_qwen2_vl.py``
(``image_grid_thw.prod() // merge_size**2`` copies of ``<|image_pad|>``). That processor is the
one vLLM and SGLang run, so it is the default (``variant="hf"``). ``variant="qwen_vl_utils"``
follows the model cards' pipeline instead: qwen-vl-utils 0.0.14 ``fetch_image`` resizes with its
own ``smart_resize`` (which clamps each side to >= 28 px *before* the ``min_pixels`` test) and
then the HF processor runs ``smart_resize`` again on the resized image.

The rule, the chat format and the option specs here are shared with Qwen2.5-VL
(:mod:`vlmlab.families.qwen2_5_vl`), which changed the vision transformer, not the patching.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vlmlab.families.base import (
    Checkpoint,
    Family,
    ImageLayout,
    ImageSizeError,
    KVGeometry,
    OptionSpec,
)
from vlmlab.protocol.core import Chat, ImagePart
from vlmlab.protocol.errors import ConfigError

PATCH = 14  # preprocessor_config.json "patch_size"
MERGE = 2  # preprocessor_config.json "merge_size" (2x2 patches -> one LM token)
FACTOR = PATCH * MERGE  # 28: both resized sides are multiples of this
# Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct preprocessor_config.json ship min_pixels 3136
# (4 * 28^2) and max_pixels 12845056 (16384 * 28^2). transformers' *class* default is
# 28*28*1280 = 1003520, which under-counts large images: always build from these values.
MIN_PIXELS = 3136
MAX_PIXELS = 12845056
MAX_ASPECT_RATIO = 200  # smart_resize raises ValueError above this (both references)
WRAPPER_TOKENS = 2  # <|vision_start|> ... <|vision_end|> around the <|image_pad|> run

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
VARIANTS = ("hf", "qwen_vl_utils")


def _check_aspect(height: int, width: int) -> None:
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"a {width}x{height} image has an aspect ratio of {ratio:.1f}; Qwen2-VL's smart_resize "
            f"rejects ratios above {MAX_ASPECT_RATIO}. Crop or pad the image to at most "
            f"{MAX_ASPECT_RATIO}:1"
        )


def hf_smart_resize(
    height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = FACTOR
) -> tuple[int, int]:
    """transformers' ``smart_resize``: the (height, width) the image processor resizes to.

    Both sides become multiples of ``factor`` (Python ``round``, i.e. half-to-even, on
    ``side / factor``); if the area is above ``max_pixels`` the image is scaled down (floor,
    each side >= ``factor``), if below ``min_pixels`` scaled up (ceil). The arithmetic follows
    the reference operation by operation so float edge cases round the same way.

    Raises:
        ImageSizeError: aspect ratio above 200, as the reference's ValueError.
    """
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_vl_utils_smart_resize(
    height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = FACTOR
) -> tuple[int, int]:
    """qwen-vl-utils 0.0.14 ``smart_resize`` (what ``fetch_image`` resizes to).

    Differs from :func:`hf_smart_resize` in two places: each rounded side is clamped to
    ``>= factor`` before the pixel-budget tests (so a 1000x10 strip becomes 1008x28 instead of
    being scaled up to 560x28), and the scale-down branch has no ``>= factor`` clamp.

    Raises:
        ConfigError: ``min_pixels > max_pixels`` (the reference asserts).
        ImageSizeError: aspect ratio above 200, or a side scaled down to 0 px.
    """
    if min_pixels > max_pixels:
        raise ConfigError(
            f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}; qwen-vl-utils "
            "requires min_pixels <= max_pixels",
            param="min_pixels",
        )
    _check_aspect(height, width)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < 1 or w_bar < 1:
        raise ImageSizeError(
            f"qwen-vl-utils scales a {width}x{height} image to {w_bar}x{h_bar} px with "
            f"max_pixels={max_pixels}, which PIL cannot resize to; raise max_pixels"
        )
    return h_bar, w_bar


def resized_size(
    width: int, height: int, *, min_pixels: int, max_pixels: int, variant: str = "hf"
) -> tuple[int, int]:
    """The (width, height) the vision encoder sees for ``variant`` ("hf" or "qwen_vl_utils").

    Raises:
        ImageSizeError: where the chosen pipeline rejects the size.
        ConfigError: for an unknown variant, or min_pixels > max_pixels with qwen_vl_utils.
    """
    if variant == "hf":
        h, w = hf_smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        return w, h
    if variant != "qwen_vl_utils":
        raise ConfigError(
            f"unknown Qwen variant {variant!r}; use one of {VARIANTS}", param="variant"
        )
    h1, w1 = qwen_vl_utils_smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    # The HF processor then runs smart_resize on the already-resized image. That pass is the
    # identity for in-range multiples of 28, but re-checks the aspect ratio of the *resized*
    # image: 12000x60 -> 12012x56 (ratio 214.5) is rejected here though HF alone accepts it.
    ratio = max(h1, w1) / min(h1, w1)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"qwen-vl-utils resizes a {width}x{height} image to {w1}x{h1} (aspect ratio "
            f"{ratio:.1f}), which the Qwen2-VL processor then rejects (limit "
            f"{MAX_ASPECT_RATIO}); crop the image or use variant='hf'"
        )
    h, w = hf_smart_resize(h1, w1, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def qwen_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    """Layout of one image: ``(h/28)*(w/28)`` ``<|image_pad|>`` tokens plus the two wrappers."""
    w, h = resized_size(
        width,
        height,
        min_pixels=options["min_pixels"],
        max_pixels=options["max_pixels"],
        variant=options["variant"],
    )
    rows, cols = h // FACTOR, w // FACTOR
    pads = rows * cols  # image_grid_thw (1, h/14, w/14) .prod() // merge_size**2
    return ImageLayout(
        tokens=pads + WRAPPER_TOKENS,
        vision_embedding_positions=pads,
        resized=(w, h),
        grid=(rows, cols),
        views=1,
    )


# -- chat format ------------------------------------------------------------------------------
# Qwen/Qwen2-VL-*-Instruct chat_template.json (identical in Qwen/Qwen2.5-VL-*-Instruct): a
# default system turn when the first message is not a system message; every message is
# "<|im_start|>{role}\n" + its parts in order + "<|im_end|>\n"; images stay where they are in
# the content, each as <|vision_start|><|image_pad|><|vision_end|>. The template's optional
# `add_vision_id` ("Picture N: ") is off unless a caller passes it; vLLM does not.


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """The chat in Qwen2-VL's ChatML format, one placeholder per image where it appears."""
    out: list[str] = []
    for index, message in enumerate(chat.messages):
        if index == 0 and message.role != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        out.append(f"<|im_start|>{message.role}\n")
        for part in message.content:
            out.append(IMAGE_PLACEHOLDER if isinstance(part, ImagePart) else part.text)
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def qwen_options() -> tuple[OptionSpec, ...]:
    """The processor options both Qwen2-VL and Qwen2.5-VL take, with checkpoint defaults."""
    return (
        OptionSpec(
            "min_pixels",
            MIN_PIXELS,
            int,
            "smallest resized area in pixels (checkpoint preprocessor_config: 3136 = 4*28^2)",
            minimum=1,
        ),
        OptionSpec(
            "max_pixels",
            MAX_PIXELS,
            int,
            "largest resized area in pixels (checkpoint: 12845056 = 16384*28^2; "
            "the model cards suggest 1003520 = 1280*28^2 to save memory)",
            minimum=1,
        ),
        OptionSpec(
            "variant",
            "hf",
            str,
            "'hf' follows transformers' Qwen2VLImageProcessor (vLLM, SGLang); 'qwen_vl_utils' "
            "follows the model cards' qwen-vl-utils fetch_image + processor pipeline",
            choices=VARIANTS,
        ),
    )


# Each image can take up to 16384 + 2 tokens at the default max_pixels. Neither the processor
# nor the chat template caps the number of images, and the model cards show multi-image and
# video chats; 16 is a planning bound (typical 1-2 MP photos cost 1-3k tokens each, so 16 of
# them fit the 32k context of Qwen2-VL), not a documented limit.
MAX_IMAGES = 16


def _kv(layers: int, kv_heads: int, repo: str) -> KVGeometry:
    return KVGeometry(
        layers,
        kv_heads,
        128,  # hidden_size / num_attention_heads = 128 for every Qwen2 / Qwen2.5 size
        f"{repo} config.json (num_hidden_layers, num_key_value_heads, "
        "hidden_size / num_attention_heads)",
    )


# Parameter counts: a meta-device instantiation of Qwen2VLForConditionalGeneration with each
# checkpoint's config.json values; they equal the Hub pages' safetensors totals (2.21B, 8.29B,
# 73.4B). max_model_len = text max_position_embeddings (32768) in each config.json.
CHECKPOINTS = (
    Checkpoint(
        hub_id="Qwen/Qwen2-VL-7B-Instruct",
        params=8_291_375_616,
        kv=_kv(28, 4, "Qwen/Qwen2-VL-7B-Instruct"),  # hidden 3584, 28 heads, 4 KV heads
        max_model_len=32_768,
        source="Qwen/Qwen2-VL-7B-Instruct config.json max_position_embeddings; safetensors",
        aliases=("qwen2-vl-7b", "qwen2-vl-7b-instruct"),
    ),
    Checkpoint(
        hub_id="Qwen/Qwen2-VL-2B-Instruct",
        params=2_208_985_600,
        kv=_kv(28, 2, "Qwen/Qwen2-VL-2B-Instruct"),  # hidden 1536, 12 heads, 2 KV heads
        max_model_len=32_768,
        source="Qwen/Qwen2-VL-2B-Instruct config.json max_position_embeddings; safetensors",
        aliases=("qwen2-vl-2b", "qwen2-vl-2b-instruct"),
    ),
    Checkpoint(
        hub_id="Qwen/Qwen2-VL-72B-Instruct",
        params=73_405_560_320,
        kv=_kv(80, 8, "Qwen/Qwen2-VL-72B-Instruct"),  # hidden 8192, 64 heads, 8 KV heads
        max_model_len=32_768,
        source="Qwen/Qwen2-VL-72B-Instruct config.json max_position_embeddings; safetensors",
        aliases=("qwen2-vl-72b", "qwen2-vl-72b-instruct"),
    ),
)

def expand_placeholder(layout: ImageLayout) -> str:
    """The placeholder as transformers' Qwen2VLProcessor expands it: ``<|image_pad|>`` repeated
    ``image_grid_thw.prod() // merge_size**2`` times inside the vision start / end pair."""
    return "<|vision_start|>" + "<|image_pad|>" * layout.vision_embedding_positions + "<|vision_end|>"


FAMILY = Family(
    name="qwen2_vl",
    display_name="Qwen2-VL",
    model_types=("qwen2_vl",),
    aliases=("qwen2-vl",),
    layout_rule=qwen_layout,
    render_prompt_fn=render_prompt,
    options=qwen_options(),
    max_images=MAX_IMAGES,
    image_placeholder=IMAGE_PLACEHOLDER,
    checkpoints=CHECKPOINTS,
    expand_placeholder=expand_placeholder,
    source=(
        "transformers Qwen2VLImageProcessor smart_resize (variant=hf); qwen-vl-utils 0.0.14 "
        "fetch_image + processor (variant=qwen_vl_utils)"
    ),
)
