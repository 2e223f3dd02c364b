"""Pixtral-12B-2409: 16 px patches, longest edge 1024, one break token per row.

Reference: mistral_common ``tokens/tokenizers/image.py`` ``ImageEncoder._image_to_num_tokens``
(``tekken_240911.json``: ``image_patch_size 16``, ``max_image_size 1024``; ``[IMG]`` = 10,
``[IMG_BREAK]`` = 12, ``[IMG_END]`` = 13) and ``tokens/tokenizers/instruct.py`` +
``protocol/instruct/normalize.py`` for the chat layout. transformers' port
(``models/pixtral/image_processing_pixtral.py`` ``get_resize_output_image_size``) floors where
mistral_common rounds; ``variant="hf"`` follows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

PATCH = 16  # tekken_240911.json image.image_patch_size
LONGEST_EDGE = 1024  # tekken_240911.json image.max_image_size


@dataclass(frozen=True)
class PixtralSpecialIds:
    """Special token ids of the Tekken v3 tokenizer (``tekken_240911.json`` special_tokens)."""

    bos: int = 1
    eos: int = 2
    inst: int = 3
    end_inst: int = 4
    img: int = 10
    img_break: int = 12
    img_end: int = 13


TEKKEN_IDS = PixtralSpecialIds()


def resized_size(
    width: int,
    height: int,
    *,
    variant: str,
    longest_edge: int = LONGEST_EDGE,
    patch: int = PATCH,
    advise_variant: bool = True,
) -> tuple[int, int]:
    """The (width, height) canvas the encoder sees: downscaled to ``longest_edge``, then padded
    up to whole patches (mistral_common resizes straight to ``16*cols x 16*rows``)."""
    ratio = max(width / longest_edge, height / longest_edge)
    w, h = width, height
    if ratio > 1:
        if variant == "mistral":
            # Python round() is banker's rounding, exactly as mistral_common; short side >= 1 px.
            w, h = max(round(width / ratio), 1), max(round(height / ratio), 1)
        else:
            # transformers' port: int(floor(.)) and no clamp (its own comment notes the change).
            w, h = int(math.floor(width / ratio)), int(math.floor(height / ratio))
            if w < 1 or h < 1:
                # The fix offered must be one the served model accepts: only Pixtral itself has
                # the mistral variant (nano shares this rule with variant fixed to hf).
                fix = (
                    "use variant='mistral' (mistral_common clamps the short side to 1 px)"
                    if advise_variant
                    else f"send an image whose short side is at least {math.ceil(ratio)} px"
                )
                raise ImageSizeError(
                    f"a {width}x{height} image is downscaled to {w}x{h} px by transformers' "
                    f"PixtralImageProcessor, which it cannot process; {fix}"
                )
    cols = (w - 1) // patch + 1
    rows = (h - 1) // patch + 1
    return cols * patch, rows * patch


def pixtral_layout(
    width: int,
    height: int,
    options: Mapping[str, Any],
    *,
    longest_edge: int = LONGEST_EDGE,
    advise_variant: bool = True,
) -> ImageLayout:
    cw, ch = resized_size(
        width, height, variant=options["variant"], longest_edge=longest_edge,
        advise_variant=advise_variant,
    )
    rows, cols = ch // PATCH, cw // PATCH
    # rows*cols [IMG] + (rows-1) [IMG_BREAK] + 1 [IMG_END]
    return ImageLayout(
        tokens=rows * (cols + 1),
        vision_embedding_positions=rows * cols,
        resized=(cw, ch),
        grid=(rows, cols),
    )


def expand_placeholder(layout: ImageLayout) -> str:
    """``[IMG]`` as transformers' PixtralProcessor expands it: ``[IMG]*cols + [IMG_BREAK]`` per
    row, the last break replaced by ``[IMG_END]`` (``processing_pixtral.replace_image_token``)."""
    rows, cols = layout.grid
    return ("[IMG]" * cols + "[IMG_BREAK]") * (rows - 1) + "[IMG]" * cols + "[IMG_END]"


def image_token_ids(rows: int, cols: int, ids: PixtralSpecialIds = TEKKEN_IDS) -> list[int]:
    """``[IMG]*cols + [IMG_BREAK]`` per row, the last break replaced by ``[IMG_END]``."""
    out = ([ids.img] * cols + [ids.img_break]) * rows
    out[-1] = ids.img_end
    return out


# -- chat layout (mistral_common v3 instruct tokenizer) -------------------------------------------

Segment = tuple[str, Any]  # ("special", name) | ("text", str) | ("image", ImagePart)


def _aggregate(group: list[list[TextPart | ImagePart]]) -> list[TextPart | ImagePart]:
    """Coalesce the content of consecutive same-role messages as mistral_common's normalizer:
    adjacent text joined by "\\n\\n" (within and across messages), empty text dropped, an image
    ends the current text run."""
    out: list[TextPart | ImagePart] = []
    run: list[str] = []
    for parts in group:
        for part in parts:
            if isinstance(part, TextPart):
                if part.text:
                    run.append(("\n\n" if run else "") + part.text)
            else:
                if run:
                    out.append(TextPart("".join(run)))
                    run = []
                out.append(part)
    if run:
        out.append(TextPart("".join(run)))
    return out


def chat_segments(chat: Chat, add_generation_prompt: bool = True) -> list[Segment]:
    """The chat as a sequence of special tokens, text and images, in mistral_common's order.

    Rules (mistral_common 1.13, v3): system messages are joined by "\\n\\n" into one system prompt
    placed at the start of the *last* user turn; consecutive messages of one role merge; a chat
    that does not start with a user turn gets an empty one; a user turn whose content is text
    followed by one final image has the image moved first; assistant turns lose trailing spaces
    and end with EOS.
    """
    del add_generation_prompt  # the [/INST] that closes the last user turn is the prompt
    system = "\n\n".join(m.text for m in chat.messages if m.role == "system" and m.text) or None
    turns: list[tuple[str, list[TextPart | ImagePart]]] = []
    group: list[list[TextPart | ImagePart]] = []
    role: str | None = None
    for message in [*chat.messages, None]:
        if message is None or message.role != role:
            if group and role != "system":
                turns.append((role, _aggregate(group)))  # type: ignore[arg-type]
            if message is None:
                break
            group, role = [], message.role
        group.append(list(message.content))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", []))
    last_user = max(i for i, (r, _) in enumerate(turns) if r == "user")

    segments: list[Segment] = [("special", "bos")]
    for index, (turn_role, parts) in enumerate(turns):
        if turn_role == "user":
            segments.append(("special", "inst"))
            if (
                len(parts) >= 2
                and isinstance(parts[-1], ImagePart)
                and all(isinstance(p, TextPart) for p in parts[:-1])
            ):
                parts = [parts[-1], *parts[:-1]]
            body: list[Segment] = [
                ("text", p.text) if isinstance(p, TextPart) else ("image", p) for p in parts
            ]
            if index == last_user and system:
                if all(kind == "text" for kind, _ in body):
                    # Text-only content is one string in mistral_common: one BPE pass.
                    body = [("text", system + "\n\n" + "".join(v for _, v in body))]
                else:
                    # Chunked content: the system text is tokenized on its own.
                    body.insert(0, ("text", system + "\n\n"))
            segments += body
            segments.append(("special", "end_inst"))
        else:
            # mistral_common strips trailing spaces of assistant text (not other whitespace).
            text = "".join(p.text for p in parts if isinstance(p, TextPart)).rstrip(" ")
            segments += [("text", text), ("special", "eos")]
    return segments


_SPECIAL_TEXT = {"bos": "<s>", "eos": "</s>", "inst": "[INST]", "end_inst": "[/INST]"}


def render_prompt(chat: Chat, add_generation_prompt: bool = True) -> str:
    """``<s>[INST]...[IMG]...[/INST]`` with one ``[IMG]`` placeholder per image."""
    out = []
    for kind, value in chat_segments(chat, add_generation_prompt):
        if kind == "special":
            out.append(_SPECIAL_TEXT[value])
        elif kind == "text":
            out.append(value)
        else:
            out.append("[IMG]")
    return "".join(out)


def encode_chat(
    chat: Chat,
    encode_text: Callable[[str], list[int]],
    image_sizes: list[tuple[int, int]],
    *,
    variant: str = "mistral",
    ids: PixtralSpecialIds = TEKKEN_IDS,
) -> list[int]:
    """Token ids of ``chat`` exactly as mistral_common encodes it for Pixtral-12B-2409.

    Args:
        chat: the conversation.
        encode_text: the text tokenizer (no BOS/EOS), e.g. Tekken's ``encode(s, False, False)``.
        image_sizes: (width, height) of each image in order of appearance.
        variant: "mistral" (mistral_common rounding) or "hf" (transformers' floor).
    """
    tokens: list[int] = []
    sizes = iter(image_sizes)
    for kind, value in chat_segments(chat):
        if kind == "special":
            tokens.append(getattr(ids, value))
        elif kind == "text":
            tokens += encode_text(value)
        else:
            layout = pixtral_layout(*next(sizes), {"variant": variant})
            tokens += image_token_ids(*layout.grid, ids=ids)
    return tokens


# Mistral-NeMo-12B text model: params.json dim 5120, n_layers 40, n_heads 32, n_kv_heads 8,
# head_dim 128 (Pixtral-12B-2409 params.json; mistral-community/pixtral-12b config.json
# text_config agrees).
_NEMO_KV = KVGeometry(40, 8, 128, "mistralai/Pixtral-12B-2409 params.json (n_layers, n_kv_heads, head_dim)")

FAMILY = Family(
    name="pixtral",
    display_name="Pixtral-12B",
    model_types=("pixtral",),
    aliases=("pixtral-12b", "pixtral_12b"),
    layout_rule=pixtral_layout,
    render_prompt_fn=render_prompt,
    options=(
        OptionSpec(
            "variant",
            "mistral",
            str,
            "'mistral' follows mistral_common (vLLM native Pixtral); 'hf' follows transformers' port",
            choices=("mistral", "hf"),
        ),
    ),
    # vLLM's Pixtral examples use limit_mm_per_prompt up to 4-5; the model card shows multi-image
    # chats. There is no hard limit in the tokenizer; 8 bounds the 128k context at full size.
    max_images=8,
    image_placeholder="[IMG]",
    expand_placeholder=expand_placeholder,
    checkpoints=(
        Checkpoint(
            hub_id="mistralai/Pixtral-12B-2409",
            # ~12.25B Mistral-NeMo decoder + ~0.4B vision encoder + adapter (model card: "12B
            # parameter multimodal decoder + 400M parameter vision encoder"); the HF port's
            # safetensors index lists 12.68B.
            params=12_682_000_000,
            kv=_NEMO_KV,
            max_model_len=131_072,  # model card: "Sequence length: 128k"
            source="mistralai/Pixtral-12B-2409 model card and params.json",
            aliases=("pixtral-12b-2409",),
        ),
        Checkpoint(
            hub_id="mistral-community/pixtral-12b",
            params=12_682_000_000,
            kv=_NEMO_KV,
            max_model_len=131_072,
            source="mistral-community/pixtral-12b config.json (HF port of Pixtral-12B-2409)",
            options={"variant": "hf"},
        ),
    ),
    source="mistral_common ImageEncoder (variant=mistral); transformers PixtralImageProcessor (variant=hf)",
)
