"""Idefics3-8B-Llama3: 364 px SigLIP tiles of an image upscaled to a 1456 px long side.

Reference: transformers ``models/idefics3/image_processing_idefics3.py``
(``_resize_output_size_rescale_to_max_len``, ``resize_for_vision_encoder``, ``split_images``,
``get_number_of_image_patches``) and ``processing_idefics3.py`` (``replace_image_token``).
Checkpoint values: ``preprocessor_config.json`` ``size {longest_edge: 1456}`` (4*364),
``max_image_size {longest_edge: 364}``, ``do_image_splitting true``; ``processor_config.json``
``image_seq_len 169`` = (364/14)^2 / scale_factor^2 with ``config.json scale_factor 2``.

Prompt expansion of one split image (``replace_image_token``)::

    for each row:  for each col:  <fake_token_around_image> "<row_i_col_j>" <image>*169
                   "\\n"
    "\\n" <fake_token_around_image> "<global-img>" <image>*169 <fake_token_around_image>

``<row_i_col_j>`` and ``<global-img>`` are *not* special tokens of the Idefics3-8B-Llama3
tokenizer: the Llama-3 BPE splits them into several tokens, and the last row's "\\n" plus the
global block's leading "\\n" form one "\\n\\n" token. transformers' ``_get_num_multimodal_tokens``
assumes single-token tags (true for SmolVLM), which undercounts this checkpoint by 7 per tile + 3.

Chat format: the Idefics2 template (see ``idefics2.py``) prefixed with ``<|begin_of_text|>``, as
the Idefics3-8B-Llama3 ``chat_template`` (public copies: ModernVBert's ``DEFAULT_CHAT_TEMPLATE``
derived from Idefics3, Idefics3 fine-tuning scripts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vlmlab.families.base import Checkpoint, Family, ImageLayout, KVGeometry, OptionSpec
from vlmlab.families.idefics2 import IMAGE_PLACEHOLDER, render_idefics_messages
from vlmlab.protocol.core import Chat

LONGEST_EDGE = 1456  # preprocessor_config.json size.longest_edge (4 * 364)
TILE = 364  # preprocessor_config.json max_image_size.longest_edge (SigLIP input size)
IMAGE_SEQ_LEN = 169  # processor_config.json image_seq_len: 26x26 patches, pixel shuffle 2x2

# Llama-3 token counts of the text tags, from the Llama-3 tiktoken BPE (Meta's tokenizer.model,
# as in the spec's measurement; re-checked with tiktoken + llama-models' llama3/tokenizer.model):
#   "<row_1_col_1>" -> '<' 'row' '_' '1' '_col' '_' '1' '>'   (8; every i, j in 1..4 alike)
#   "<global-img>"  -> '<' 'global' '-img' '>'                (4)
#   "\n" -> 1 token, "\n\n" -> 1 token
ROW_COL_TAG_TOKENS = 8
GLOBAL_TAG_TOKENS = 4
FAKE = 1  # <fake_token_around_image>, an added special token
TILE_TOKENS = FAKE + ROW_COL_TAG_TOKENS + IMAGE_SEQ_LEN  # 178
GLOBAL_TOKENS = FAKE + GLOBAL_TAG_TOKENS + IMAGE_SEQ_LEN + FAKE  # 175


def upscaled_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) after ``_resize_output_size_rescale_to_max_len(max_len=1456)``.

    The long side becomes exactly 1456 (small images are *upscaled*), the short side is
    ``int(1456 / aspect)`` (float64), raised to the next even number, and at least 1. The
    second step of ``get_resize_output_image_size`` (cap at 4096) never applies at 1456.
    """
    aspect = width / height
    if width >= height:
        w = LONGEST_EDGE
        h = int(w / aspect)
        h += h % 2
    else:
        h = LONGEST_EDGE
        w = int(h * aspect)
        w += w % 2
    return max(w, 1), max(h, 1)


def tile_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of 364 px tiles, as ``resize_for_vision_encoder`` + ``split_images``.

    The upscaled image is resized again so each side is a multiple of 364 (long side rounded
    up, short side recomputed from the aspect ratio, then rounded up); an image that ends up no
    larger than one tile is not split and gets (0, 0), as the reference.
    """
    w, h = upscaled_size(width, height)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / TILE) * TILE
        h = math.ceil(int(w / aspect) / TILE) * TILE
    else:
        h = math.ceil(h / TILE) * TILE
        w = math.ceil(int(h * aspect) / TILE) * TILE
    if h > TILE or w > TILE:
        return math.ceil(h / TILE), math.ceil(w / TILE)
    return 0, 0


def idefics3_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    """Tokens of one image: ``178*rows*cols + rows + 175`` split, ``175`` not split.

    Each row of tiles ends in "\\n"; the last one merges with the global block's leading "\\n"
    into one "\\n\\n" token, so the newlines cost ``rows`` tokens. Because every image is
    upscaled to a 1456 px long side, the count depends only on the aspect ratio (4:3 and 16:9
    photos: 3x4 tiles, 2314 tokens; squares, even 1x1: 4x4, 3027 tokens).
    """
    rows, cols = tile_grid(width, height) if options["do_image_splitting"] else (0, 0)
    if rows == 0:
        # Not split: the image is squashed to one 364x364 view (`resize` to max_image_size).
        return ImageLayout(
            tokens=GLOBAL_TOKENS,
            vision_embedding_positions=IMAGE_SEQ_LEN,
            resized=(TILE, TILE),
            grid=(0, 0),
            views=1,
        )
    tiles = rows * cols
    return ImageLayout(
        tokens=TILE_TOKENS * tiles + rows + GLOBAL_TOKENS,
        vision_embedding_positions=IMAGE_SEQ_LEN * (tiles + 1),
        resized=(TILE * cols, TILE * rows),
        grid=(rows, cols),
        views=tiles + 1,  # tiles + the 364x364 global image
    )


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """``<|begin_of_text|>User:<image>question<end_of_utterance>\\nAssistant:``."""
    return "<|begin_of_text|>" + render_idefics_messages(chat, add_generation_prompt)


# Llama-3.1-8B text model: config.json text_config num_hidden_layers 32,
# num_key_value_heads 8, hidden_size 4096 / num_attention_heads 32 = 128.
_LLAMA3_8B_KV = KVGeometry(
    32,
    8,
    128,
    "HuggingFaceM4/Idefics3-8B-Llama3 config.json text_config (Llama-3.1-8B: "
    "32 layers, 8 KV heads, 4096/32)",
)

def expand_placeholder(layout: ImageLayout) -> str:
    """``<image>`` as transformers' Idefics3Processor expands it: per tile
    ``<fake_token_around_image><row_R_col_C>`` + ``<image>`` * 169, a newline after each row,
    then a newline and the global image ``<fake_token_around_image><global-img>`` + ``<image>``
    * 169 + ``<fake_token_around_image>`` (only that when the image is not split)."""
    rows, cols = layout.grid
    image = IMAGE_PLACEHOLDER * IMAGE_SEQ_LEN
    whole = f"<fake_token_around_image><global-img>{image}<fake_token_around_image>"
    if rows == 0:
        return whole
    text = "".join(
        "".join(f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
        for r in range(rows)
    )
    return f"{text}\n{whole}"


FAMILY = Family(
    name="idefics3",
    display_name="Idefics3-8B",
    model_types=("idefics3",),  # config.json "model_type": "idefics3"
    aliases=("idefics-3",),
    layout_rule=idefics3_layout,
    render_prompt_fn=render_prompt,
    options=(
        OptionSpec(
            "do_image_splitting",
            True,
            bool,
            "split into 364 px tiles + a global image (default) or one 364x364 view (175 tokens)",
        ),
    ),
    # Text and images can be interleaved freely (model card); its examples use 2 images. At up
    # to 3027 tokens per image, 5 images already take ~15k tokens.
    max_images=5,
    image_placeholder=IMAGE_PLACEHOLDER,
    checkpoints=(
        Checkpoint(
            hub_id="HuggingFaceM4/Idefics3-8B-Llama3",
            # SigLIP-so400m + connector + Llama-3.1-8B-Instruct; the hub lists ~8.46B.
            params=8_460_000_000,
            kv=_LLAMA3_8B_KV,
            max_model_len=131_072,  # text_config max_position_embeddings (Llama-3.1); unverified
            source="HuggingFaceM4/Idefics3-8B-Llama3 model card and config.json (approximate)",
            aliases=("idefics3-8b", "idefics3-8b-llama3"),
        ),
    ),
    source="transformers Idefics3ImageProcessor / Idefics3Processor with Llama-3 tag token counts",
    # The processor lays pixel_values out per prompt ([prompts, tiles of all its images, ...]):
    # one image's tiles are independent of the others, stacked along dimension 1.
    expand_placeholder=expand_placeholder,
    image_tensor_dim=1,
)
