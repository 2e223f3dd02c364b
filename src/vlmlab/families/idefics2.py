"""Idefics2-8b: a perceiver resampler turns every encoder view into 64 tokens.

Reference: transformers ``models/idefics2/processing_idefics2.py`` (``Idefics2Processor.__call__``:
``<image>`` becomes ``<fake_token_around_image>`` + 64 ``<image>`` + ``<fake_token_around_image>``,
repeated 5 times with image splitting, then adjacent ``<fake><fake>`` pairs collapse) and
``image_processing_idefics2.py`` (``get_resize_output_image_size``: longest side <= 980, each side
>= 378; ``split_images``: 4 quarter crops + the original). Checkpoint values:
``processor_config.json`` ``image_seq_len 64`` (= ``perceiver_config.resampler_n_latents``),
``preprocessor_config.json`` ``size {shortest_edge 378, longest_edge 980}``.

Image splitting: the idefics2-8b model card says only the SFT model was trained with it and shows
``do_image_splitting=False`` as the opt-out, so the family default is on (idefics2-8b) and
``-base`` turns it off.

Chat format: ``HuggingFaceM4/idefics2-8b`` ``processor_config.json`` ``chat_template``::

    {% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type']
    == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if
    line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}
    {% endif %}{% endfor %}<end_of_utterance>\\n{% endfor %}{% if add_generation_prompt %}
    {{ 'Assistant:' }}{% endif %}
"""

from __future__ import annotations

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
from vlmlab.protocol.core import Chat, ImagePart, TextPart

IMAGE_SEQ_LEN = 64  # processor_config.json image_seq_len (perceiver resampler_n_latents)
SHORTEST_EDGE = 378  # preprocessor_config.json size.shortest_edge
LONGEST_EDGE = 980  # preprocessor_config.json size.longest_edge
SPLIT_VIEWS = 5  # split_images: 4 quarter crops + the original image


def resized_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) after ``get_resize_output_image_size``: the long side is capped at 980
    (short side ``int``-truncated by the aspect ratio), then each side is raised to >= 378
    independently (so very flat images are stretched, not letterboxed)."""
    aspect = width / height
    w, h = width, height
    if w >= h and w > LONGEST_EDGE:
        w = LONGEST_EDGE
        h = int(w / aspect)
    elif h > w and h > LONGEST_EDGE:
        h = LONGEST_EDGE
        w = int(h * aspect)
    return max(w, SHORTEST_EDGE), max(h, SHORTEST_EDGE)


def idefics2_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    """Tokens of one image: 66 without splitting, 326 with it.

    Without splitting: ``<fake>`` + 64 ``<image>`` + ``<fake>``. With splitting each of the 5
    views is ``<fake>`` + 64 ``<image>`` + ``<fake>`` and the 4 inner ``<fake><fake>`` pairs
    collapse: ``5*65 + 1``. (Two images written back to back in a prompt also share one fake
    token; that depends on the prompt text, not the image, and is not counted here.)

    Raises:
        ImageSizeError: with splitting, for an image 1 px wide or high: its quarter crops are
            empty and transformers' Idefics2ImageProcessor fails (ZeroDivisionError /
            RuntimeError).
    """
    split = options["do_image_splitting"]
    if split and min(width, height) < 2:
        raise ImageSizeError(
            f"a {width}x{height} image cannot be split into 4 crops by Idefics2's image "
            "processor (a side is 1 px); use an image at least 2x2 px or do_image_splitting=false"
        )
    views = SPLIT_VIEWS if split else 1
    return ImageLayout(
        tokens=views * (IMAGE_SEQ_LEN + 1) + 1,
        vision_embedding_positions=views * IMAGE_SEQ_LEN,
        # The original image's size after resizing (the crops are resized on their own).
        resized=resized_size(width, height),
        grid=(2, 2) if split else (0, 0),  # quarter crops; the original is counted in views
        views=views,
    )


# -- chat format ---------------------------------------------------------------------------------

IMAGE_PLACEHOLDER = "<image>"


def render_idefics_messages(chat: Chat, add_generation_prompt: bool) -> str:
    """The Idefics2/Idefics3 chat template body (shared; Idefics3 prefixes ``<|begin_of_text|>``).

    Every message is ``{Role}:`` + its parts in order (text as is, each image as ``<image>``) +
    ``<end_of_utterance>\\n``; the colon is followed by a space unless the first part is an
    image. System messages are rendered in place as ``System: ...``. ``Assistant:`` is appended
    when ``add_generation_prompt`` is set (the template does not check the last role).
    """
    out: list[str] = []
    for message in chat.messages:
        parts = message.content
        starts_with_image = bool(parts) and isinstance(parts[0], ImagePart)
        out.append(message.role.capitalize() + (":" if starts_with_image else ": "))
        for part in parts:
            if isinstance(part, ImagePart):
                out.append(IMAGE_PLACEHOLDER)
            elif isinstance(part, TextPart):
                out.append(part.text)
        out.append("<end_of_utterance>\n")
    if add_generation_prompt:
        out.append("Assistant:")
    return "".join(out)


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """``User:<image>question<end_of_utterance>\\nAssistant:`` (no BOS: the tokenizer adds it)."""
    return render_idefics_messages(chat, add_generation_prompt)


# Mistral-7B-v0.1 text model: config.json text_config num_hidden_layers 32,
# num_key_value_heads 8, hidden_size 4096 / num_attention_heads 32 = 128.
_MISTRAL_7B_KV = KVGeometry(
    32,
    8,
    128,
    "HuggingFaceM4/idefics2-8b config.json text_config (Mistral-7B-v0.1: 32 layers, "
    "8 KV heads, 4096/32)",
)

FAMILY = Family(
    name="idefics2",
    display_name="Idefics2-8B",
    model_types=("idefics2",),  # config.json "model_type": "idefics2"
    aliases=("idefics-2",),
    layout_rule=idefics2_layout,
    render_prompt_fn=render_prompt,
    options=(
        OptionSpec(
            "do_image_splitting",
            True,
            bool,
            "split each image into 4 crops + the original (326 tokens) or not (66 tokens)",
        ),
    ),
    # Images and text can be interleaved freely (model card); its chat example uses 2 images per
    # prompt. 8 bounds a prompt to ~2.6k image tokens, within the model's training sequences.
    max_images=8,
    image_placeholder=IMAGE_PLACEHOLDER,
    checkpoints=(
        Checkpoint(
            hub_id="HuggingFaceM4/idefics2-8b",
            # SigLIP-so400m + perceiver + Mistral-7B-v0.1; the hub lists ~8.4B. Approximate.
            params=8_400_000_000,
            kv=_MISTRAL_7B_KV,
            max_model_len=32_768,  # text_config max_position_embeddings (Mistral-7B-v0.1)
            source="HuggingFaceM4/idefics2-8b model card and config.json (params approximate)",
            aliases=("idefics2-8b",),
        ),
        Checkpoint(
            hub_id="HuggingFaceM4/idefics2-8b-base",
            params=8_400_000_000,
            kv=_MISTRAL_7B_KV,
            max_model_len=32_768,
            source="HuggingFaceM4/idefics2-8b-base model card and config.json (params approximate)",
            # Model card: only the SFT model was trained with image splitting.
            options={"do_image_splitting": False},
            aliases=("idefics2-8b-base",),
        ),
    ),
    source="transformers Idefics2Processor / Idefics2ImageProcessor",
    # The processor lays pixel_values out per prompt ([prompts, images, ...]) and collapses
    # adjacent <fake_token_around_image> pairs between images.
    splice_images=False,
)
