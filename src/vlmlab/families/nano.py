"""nano: vlmlab's embedded tiny VLM (``vlmlab/nano/checkpoint``), laid out like Pixtral's HF port.

It is a ``LlavaForConditionalGeneration`` with a ``PixtralVisionConfig`` tower, so its processor
is transformers' ``PixtralProcessor``: the HF (floor) resize rule with 16 px patches, but a
longest edge of 192 px (the checkpoint's ``preprocessor_config.json`` ``size.longest_edge``; a
test checks these constants against the shipped files). Its chat template is our own, in
Pixtral's shape: ``<s>[INST]...[/INST]answer</s>``, images kept where they appear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlmlab.families.base import Checkpoint, Family, ImageLayout, KVGeometry
from vlmlab.families.pixtral import expand_placeholder, pixtral_layout
from vlmlab.protocol.core import Chat, ImagePart

PATCH = 16  # preprocessor_config.json patch_size
LONGEST_EDGE = 192  # preprocessor_config.json size.longest_edge
IMAGE_TOKEN = "[IMG]"
IMAGE_BREAK_TOKEN = "[IMG_BREAK]"
IMAGE_END_TOKEN = "[IMG_END]"
MAX_MODEL_LEN = 1024  # config.json text_config.max_position_embeddings


def nano_layout(width: int, height: int, options: Mapping[str, Any]) -> ImageLayout:
    del options
    return pixtral_layout(
        width, height, {"variant": "hf"}, longest_edge=LONGEST_EDGE, advise_variant=False
    )


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """``<s>[INST]{system}\\n\\n{user}[/INST]{assistant}</s>...``.

    The system text (all system messages joined by a blank line) opens the first user turn;
    image parts become ``[IMG]`` in place. With ``add_generation_prompt`` false and a trailing
    user turn the prompt still ends with ``[/INST]``: the turn marker is the generation prompt.
    """
    del add_generation_prompt
    system = "\n\n".join(m.text for m in chat.messages if m.role == "system" and m.text)
    out = ["<s>"]
    for message in chat.messages:
        if message.role == "system":
            continue
        body = "".join(IMAGE_TOKEN if isinstance(p, ImagePart) else p.text for p in message.content)
        if message.role == "user":
            prefix = system + "\n\n" if system else ""
            system = ""
            out.append(f"[INST]{prefix}{body}[/INST]")
        else:
            out.append(f"{body}</s>")
    return "".join(out)


FAMILY = Family(
    name="nano",
    display_name="vlmlab nano",
    model_types=(),  # its config says "llava"; vlmlab finds nano by its checkpoint path
    aliases=("vlmlab-nano", "vlmlab/nano"),
    layout_rule=nano_layout,
    render_prompt_fn=render_prompt,
    options=(),
    max_images=4,  # trained on one- and two-image samples; 4 fits the context at full size
    image_placeholder=IMAGE_TOKEN,
    expand_placeholder=expand_placeholder,
    checkpoints=(
        Checkpoint(
            hub_id="vlmlab/nano",
            # exact: sum of numel over checkpoint/model.safetensors (the tied lm_head is not
            # stored), also vlmlab_nano.json "params"; tests/test_newcomer_usage.py recounts it
            params=2_513_728,
            # config.json text_config: num_hidden_layers 3, num_key_value_heads 2, head_dim 48
            kv=KVGeometry(3, 2, 48, "vlmlab/nano/checkpoint/config.json text_config"),
            max_model_len=MAX_MODEL_LEN,
            source="vlmlab/nano/checkpoint/config.json",
        ),
    ),
    source="transformers PixtralImageProcessor (floor rule) with longest_edge 192",
)
