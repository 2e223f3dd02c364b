"""InternVL2 (InternLM2-based checkpoints): dynamic 448 px tiles plus a thumbnail.

Reference: the InternVL2 model-card code (``dynamic_preprocess`` / ``find_closest_aspect_ratio``,
``load_image(..., max_num=12)`` and ``chat()``, which replaces each ``<image>`` with
``<img>`` + ``<IMG_CONTEXT>`` * ``num_image_token * num_patches`` + ``</img>``), and its port in
transformers: ``models/got_ocr2/image_processing_got_ocr2.py`` (``get_all_supported_aspect_ratios``,
``get_optimal_tiled_canvas``, ``get_number_of_image_patches``) with ``crop_to_patches=True`` and
``models/internvl/processing_internvl.py`` (``2 + image_seq_length * num_patches``).

Config values (InternVL2-2B/8B/26B ``config.json``): ``force_image_size 448``,
``vision_config.patch_size 14``, ``downsample_ratio 0.5``, ``max_dynamic_patch 12``,
``min_dynamic_patch 1``, ``use_thumbnail true``.

The chat format is the ``chat()`` path of the model card: ``conversation.py`` template
``internlm2-chat`` (``system_template '<|im_start|>system\\n{system_message}'``, roles
``'<|im_start|>user\\n'`` / ``'<|im_start|>assistant\\n'``, ``SeparatorStyle.MPT`` with
``sep '<|im_end|>'``: no newline after ``<|im_end|>``), with InternVL's default system message.
InternVL2-1B/4B/40B/76B use other language models and templates and are not covered here.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from vlmlab.families.base import Checkpoint, Family, ImageLayout, KVGeometry, OptionSpec
from vlmlab.protocol.core import Chat, ImagePart, TextPart

TILE = 448  # config.json force_image_size
# num_image_token = (force_image_size / patch_size)^2 * downsample_ratio^2 = (448/14)^2 / 4
TOKENS_PER_TILE = 256
WRAPPER_TOKENS = 2  # <img> ... </img> around every image (chat(): IMG_START_TOKEN / IMG_END_TOKEN)
DEFAULT_MAX_NUM = 12  # config.json max_dynamic_patch; the model card calls load_image(max_num=12)
MIN_NUM = 1  # config.json min_dynamic_patch

# conversation.py 'internlm2-chat' system_message (the model's default self.system_message).
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)


@lru_cache(maxsize=64)
def candidate_grids(max_num: int, min_num: int = MIN_NUM) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with ``min_num <= cols*rows <= max_num``, sorted by tile count.

    The order inside one tile count matters only on exact ties; it follows transformers'
    ``get_all_supported_aspect_ratios`` (cols-major loop, then a stable sort). The model card's
    set-then-sort order agrees with it on every tested size (spec: 2 x 100k random sizes).
    """
    grids = [
        (cols, rows)
        for cols in range(1, max_num + 1)
        for rows in range(1, max_num + 1)
        if min_num <= cols * rows <= max_num
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def closest_grid(width: int, height: int, max_num: int) -> tuple[int, int]:
    """The (cols, rows) tile grid whose aspect ratio is closest to ``width / height``.

    On an exact tie in ``|W/H - cols/rows|`` (float64, as the reference) the later candidate
    wins iff the image area exceeds half the candidate's canvas area, so large images take
    more tiles and small ones keep fewer.
    """
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * TILE * TILE * cols * rows:
            best = (cols, rows)
    return best


def internvl2_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    """Tiles + thumbnail of one image: ``256 * patches + 2`` prompt tokens.

    The image is resized to ``448*cols x 448*rows`` and cut into tiles; a 448x448 thumbnail of
    the whole image is appended only when there is more than one tile.
    """
    cols, rows = closest_grid(width, height, options["max_num"])
    tiles = cols * rows
    patches = tiles + 1 if tiles != 1 else 1
    return ImageLayout(
        tokens=TOKENS_PER_TILE * patches + WRAPPER_TOKENS,
        vision_embedding_positions=TOKENS_PER_TILE * patches,
        resized=(TILE * cols, TILE * rows),
        grid=(rows, cols),
        views=patches,
    )


# -- chat format ---------------------------------------------------------------------------------

IMAGE_PLACEHOLDER = "<image>"


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """The chat as InternVL2's ``chat()`` builds it, one ``<image>`` per image.

    * System: the chat's system messages (joined by a newline) replace InternVL's default system
      message; there is always a system block (``<|im_start|>system\\n...<|im_end|>``).
    * Each turn is ``<|im_start|>{role}\\n{content}<|im_end|>`` with nothing between turns
      (MPT separator style); a turn with empty content renders as its role header alone, as
      ``Conversation.get_prompt`` does for a falsy message.
    * Images stay where they are in the message. One image in the chat is ``<image>\\n`` (what
      ``chat()`` prepends to a question); several are numbered across the conversation as
      ``Image-1: <image>\\n``, ``Image-2: <image>\\n`` (the model card's multi-image example).
    * ``<|im_start|>assistant\\n`` is the generation prompt (omitted after an assistant turn).
    """
    systems = [m.text for m in chat.messages if m.role == "system"]
    system_message = "\n".join(systems) if systems else DEFAULT_SYSTEM_MESSAGE
    numbered = len(chat.images) > 1
    out = [f"<|im_start|>system\n{system_message}<|im_end|>"]
    image_index = 0
    turns = [m for m in chat.messages if m.role != "system"]
    for message in turns:
        content: list[str] = []
        for part in message.content:
            if isinstance(part, ImagePart):
                image_index += 1
                prefix = f"Image-{image_index}: " if numbered else ""
                content.append(f"{prefix}{IMAGE_PLACEHOLDER}\n")
            elif isinstance(part, TextPart):
                content.append(part.text)
        text = "".join(content)
        header = f"<|im_start|>{message.role}\n"
        out.append(f"{header}{text}<|im_end|>" if text else header)
    if add_generation_prompt and (not turns or turns[-1].role != "assistant"):
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# InternLM2 text models, config.json llm_config: num_hidden_layers, num_key_value_heads and
# hidden_size / num_attention_heads.
_INTERNLM2_5_7B_KV = KVGeometry(
    32,
    8,
    128,
    "OpenGVLab/InternVL2-8B config.json llm_config (internlm2_5-7b-chat: 32 layers, "
    "8 KV heads, 4096/32)",
)
_INTERNLM2_1_8B_KV = KVGeometry(
    24,
    8,
    128,
    "OpenGVLab/InternVL2-2B config.json llm_config (internlm2-chat-1_8b: 24 layers, "
    "8 KV heads, 2048/16)",
)
# Well-known published values of internlm2-chat-20b (hidden 6144, 48 heads, 8 KV heads); not
# re-checked against InternVL2-26B's config.json here.
_INTERNLM2_20B_KV = KVGeometry(
    48,
    8,
    128,
    "OpenGVLab/InternVL2-26B config.json llm_config (internlm2-chat-20b: 48 layers, "
    "8 KV heads, 6144/48; unverified)",
)

def expand_placeholder(layout: ImageLayout) -> str:
    """One image as InternVL expands it (the original ``chat()`` and transformers'
    InternVLProcessor alike): ``<img>`` + ``<IMG_CONTEXT>`` * 256 per tile + ``</img>``."""
    return "<img>" + "<IMG_CONTEXT>" * layout.vision_embedding_positions + "</img>"


FAMILY = Family(
    name="internvl2",
    display_name="InternVL2",
    # config.json "model_type": "internvl_chat" (remote code); "internvl" is transformers' native
    # InternVL model_type, which uses the same tiling (GotOcr2ImageProcessor crop_to_patches).
    model_types=("internvl_chat", "internvl"),
    aliases=("internvl-2", "internvl2-internlm2"),
    layout_rule=internvl2_layout,
    render_prompt_fn=render_prompt,
    options=(
        OptionSpec(
            "max_num",
            DEFAULT_MAX_NUM,
            int,
            "max 448 px tiles per image (config max_dynamic_patch 12; many scripts use 6)",
            minimum=1,
        ),
    ),
    # No hard limit in the code; the model card's multi-image examples use 2 images and its
    # video example 8 frames (one <image> each). 8 images at max_num=12 is ~27k tokens.
    max_images=8,
    image_placeholder=IMAGE_PLACEHOLDER,
    expand_placeholder=expand_placeholder,
    checkpoints=(
        Checkpoint(
            hub_id="OpenGVLab/InternVL2-8B",
            # InternViT-300M-448px + MLP projector + internlm2_5-7b-chat; the hub lists ~8.08B.
            params=8_080_000_000,
            kv=_INTERNLM2_5_7B_KV,
            # llm_config max_position_embeddings 32768 (the model card notes an 8k training
            # context).
            max_model_len=32_768,
            source="OpenGVLab/InternVL2-8B model card and config.json (params approximate)",
            aliases=("internvl2-8b",),
        ),
        Checkpoint(
            hub_id="OpenGVLab/InternVL2-2B",
            # InternViT-300M-448px + MLP projector + internlm2-chat-1_8b; the hub lists ~2.21B.
            params=2_210_000_000,
            kv=_INTERNLM2_1_8B_KV,
            max_model_len=32_768,  # llm_config max_position_embeddings
            source="OpenGVLab/InternVL2-2B model card and config.json (params approximate)",
            aliases=("internvl2-2b",),
        ),
        Checkpoint(
            hub_id="OpenGVLab/InternVL2-26B",
            # InternViT-6B-448px-V1-5 + MLP projector + internlm2-chat-20b; the hub lists ~25.5B.
            params=25_500_000_000,
            kv=_INTERNLM2_20B_KV,
            max_model_len=32_768,  # llm_config max_position_embeddings (unverified)
            source="OpenGVLab/InternVL2-26B model card (params approximate; KV unverified)",
            aliases=("internvl2-26b",),
        ),
    ),
    source=(
        "InternVL2 model card dynamic_preprocess; "
        "transformers GotOcr2ImageProcessor crop_to_patches"
    ),
)
