"""Phi-3.5-vision / Phi-3-vision: HD-transform token counts and the chat format.

The reference processor (``image_processing_phi3_v.py``) is remote code that cannot be fetched
here, so the oracle is an independent re-derivation of its ``HD_transform`` written from the
spec's pseudo-code: real PIL transposes, a real PIL resize and a real white, centred PIL pad,
then the token formula of ``calc_num_image_tokens`` read off the padded canvas. It is checked
against every worked example in docs/spec (image-tokens.md section 2 and the common-sizes
table), the rule's invariants and a seeded random sweep.
"""

from __future__ import annotations

import random

import jinja2
import numpy as np
import pytest
from PIL import Image, ImageOps

from vlmlab.families import ImageSizeError, get_family
from vlmlab.protocol.core import Chat, ImagePart, Message, TextPart
from vlmlab.protocol.errors import ConfigError, UnknownOptionError

PHI35 = get_family("phi3_5_vision")
PHI3 = get_family("phi3_vision")


# -- the oracle: HD_transform re-derived with PIL -------------------------------------------------


def pil_hd_transform(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """The (width, height) of the padded HD image, computed by really transforming a PIL image.

    Steps of HD_transform: transpose portrait images, find the crop count along the long side
    with float64 numpy arithmetic, resize to (336*s, int(336*s / ratio)), pad the height to a
    multiple of 336 with white centred bands, transpose back. The resample filter does not
    change sizes, so NEAREST keeps the sweep fast.
    """
    img = Image.new("L", (width, height), color=0)
    transposed = img.width < img.height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    ratio = np.float64(img.width) / np.float64(img.height)
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.NEAREST)  # raises for a 0 px side
    target_h = int(np.ceil(new_h / 336) * 336)
    top = int((target_h - new_h) / 2)
    img = ImageOps.expand(img, border=(0, top, 0, target_h - new_h - top), fill=255)
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img.size


def tokens_from_canvas(width: int, height: int) -> int:
    """calc_num_image_tokens: int((h//336*w//336 + 1)*144 + 1 + (h//336 + 1)*12), as written."""
    h, w = height, width
    return int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12)


def random_sizes(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:  # photos and documents
            sizes.append((rng.randint(16, 2500), rng.randint(16, 2500)))
        elif kind < 0.85:  # thin strips, both orientations
            long_side, short_side = rng.randint(200, 3000), rng.randint(1, 120)
            sizes.append((long_side, short_side) if rng.random() < 0.5 else (short_side, long_side))
        else:  # tiny
            sizes.append((rng.randint(1, 64), rng.randint(1, 64)))
    return sizes


SWEEP = random_sizes(seed=20240820, count=220)


# -- worked examples from the spec --------------------------------------------------------------

COMMON = [(640, 480), (1024, 768), (1920, 1080), (1700, 2200), (4032, 3024)]


@pytest.mark.parametrize("size", COMMON)
def test_common_sizes_num_crops_4(size: tuple[int, int]) -> None:
    layout = PHI35.image_layout(*size)  # checkpoint default num_crops=4
    assert (layout.tokens, layout.grid, layout.views) == (757, (2, 2), 5)


@pytest.mark.parametrize(
    ("size", "tokens", "grid"),
    [
        ((640, 480), 1921, (3, 4)),
        ((1024, 768), 1921, (3, 4)),
        ((1920, 1080), 2353, (3, 5)),
        ((1700, 2200), 2509, (4, 4)),
        ((4032, 3024), 1921, (3, 4)),
    ],
)
def test_common_sizes_num_crops_16(
    size: tuple[int, int], tokens: int, grid: tuple[int, int]
) -> None:
    for layout in (PHI3.image_layout(*size), PHI35.image_layout(*size, num_crops=16)):
        assert (layout.tokens, layout.grid) == (tokens, grid)
        assert layout.resized == (336 * grid[1], 336 * grid[0])


@pytest.mark.parametrize(
    ("size", "tokens", "grid"),
    [
        ((1999, 1000), 457, (1, 2)),  # "1999x1000 already gives 457"
        ((1000, 1999), 469, (2, 1)),  # same grid transposed: one more crop row, 12 more newlines
        ((2900, 1000), 457, (1, 2)),  # up to 3:1 it is 1x2
        ((3500, 1000), 601, (1, 3)),  # 3:1 - 4:1 gives 1x3
        ((3999, 1000), 601, (1, 3)),
        ((1993, 1000), 757, (2, 2)),  # below 672/337 ~ 1.994: 2x2
        ((1995, 1000), 457, (1, 2)),  # just above it: 1x2
        ((1, 1), 757, (2, 2)),  # tiny images are upscaled to the largest grid
    ],
)
def test_num_crops_4_thresholds(size: tuple[int, int], tokens: int, grid: tuple[int, int]) -> None:
    layout = PHI35.image_layout(*size)
    assert (layout.tokens, layout.grid) == (tokens, grid)
    assert pil_hd_transform(*size, 4) == layout.resized


def test_tiny_image_num_crops_16() -> None:
    assert PHI3.image_layout(1, 1).grid == (4, 4)
    assert PHI3.image_tokens(1, 1) == 2509
    assert PHI35.image_tokens(1, 1, num_crops=16) == 2509


def test_zero_height_resize_uses_the_size_arithmetic() -> None:
    # HD_transform itself fails (resize to 0 px); calc_num_image_tokens_from_image_size answers.
    with pytest.raises(ValueError):
        pil_hd_transform(6000, 1, 4)
    assert PHI35.image_tokens(6000, 1) == 157
    assert PHI3.image_tokens(6000, 1) == 157
    assert PHI3.image_tokens(1, 6000) == 349  # num_crops=16: 16 rows of newlines
    assert PHI35.image_tokens(1, 6000, num_crops=16) == 349
    assert PHI35.image_tokens(1, 6000) == 205  # num_crops=4: 4 rows
    assert PHI35.image_layout(6000, 1).resized == (1344, 0)


def test_transpose_asymmetry() -> None:
    wide, tall = PHI35.image_layout(3000, 300), PHI35.image_layout(300, 3000)
    assert wide.grid == (1, 4) and tall.grid == (4, 1)
    assert (wide.tokens, tall.tokens) == (745, 781)
    # Same crops, but newlines follow the rows of the final canvas.
    assert tall.tokens - wide.tokens == 12 * (tall.grid[0] - wide.grid[0])


# -- the sweep: oracle parity and invariants -----------------------------------------------------


@pytest.mark.parametrize("num_crops", [4, 16])
def test_random_sizes_match_pil_hd_transform(num_crops: int) -> None:
    checked = 0
    for width, height in SWEEP:
        layout = PHI35.image_layout(width, height, num_crops=num_crops)
        try:
            canvas = pil_hd_transform(width, height, num_crops)
        except ValueError:
            # Only the zero-height case may fail in the real transform.
            assert 0 in layout.resized, (width, height)
            continue
        assert layout.resized == canvas, (width, height, num_crops)
        assert layout.tokens == tokens_from_canvas(*canvas), (width, height, num_crops)
        checked += 1
    assert checked >= 200


@pytest.mark.parametrize("num_crops", [1, 2, 4, 9, 16])
def test_invariants(num_crops: int) -> None:
    for width, height in SWEEP:
        layout = PHI35.image_layout(width, height, num_crops=num_crops)
        rows, cols = layout.grid
        canvas_w, canvas_h = layout.resized
        assert canvas_w % 336 == 0 and canvas_h % 336 == 0
        assert (canvas_w // 336, canvas_h // 336) == (cols, rows)
        assert rows * cols <= num_crops
        # The long side is always exactly s whole crops; the short side only pads.
        long_crops = max(rows, cols)
        assert long_crops >= 1 and long_crops * 336 == max(canvas_w, canvas_h)
        assert layout.tokens == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12
        assert layout.vision_embedding_positions == layout.tokens
        # Portrait images put the long side in the rows.
        if width < height:
            assert rows >= cols
        elif width > height:
            assert cols >= rows
        # Transposing the image transposes the grid.
        assert PHI35.image_layout(height, width, num_crops=num_crops).grid == (cols, rows)


def test_scale_invariance() -> None:
    # The rule sees only W/H (float64 division is exact-rounded, so k*W / k*H == W / H).
    for width, height in SWEEP[:120]:
        for k in (2, 3, 7):
            assert PHI35.image_tokens(k * width, k * height) == PHI35.image_tokens(width, height)
            assert PHI3.image_tokens(k * width, k * height) == PHI3.image_tokens(width, height)


def test_monotone_in_num_crops() -> None:
    # More allowed crops never shrinks the grid: s is non-decreasing in num_crops, and so are
    # both the long-side crop count and the short-side rows int(336*s/ratio)/336 (rounded up).
    for width, height in SWEEP[:120]:
        previous = 0
        for num_crops in range(1, 21):
            tokens = PHI35.image_tokens(width, height, num_crops=num_crops)
            assert tokens >= previous, (width, height, num_crops)
            previous = tokens


# -- options, names, checkpoints -----------------------------------------------------------------


def test_names_and_defaults() -> None:
    assert get_family("phi3_v") is PHI35  # the shared model_type belongs to Phi-3.5-vision
    assert get_family("microsoft/Phi-3.5-vision-instruct") is PHI35
    assert get_family("microsoft/Phi-3-vision-128k-instruct") is PHI3
    assert PHI35.default_options == {"num_crops": 4}
    assert PHI3.default_options == {"num_crops": 16}
    assert PHI35.checkpoint().kv.bytes_per_token("bf16") == 393_216  # spec KV table
    assert PHI3.checkpoint().kv.bytes_per_token("bf16") == 393_216
    assert PHI3.max_images == 1 and PHI35.max_images > 1


def test_option_errors() -> None:
    with pytest.raises(UnknownOptionError):
        PHI35.image_tokens(640, 480, max_pixels=100)
    with pytest.raises(ConfigError):
        PHI35.image_tokens(640, 480, num_crops=0)
    assert PHI35.image_tokens(640, 480, num_crops="16") == 1921  # CLI strings are coerced
    assert not issubclass(ImageSizeError, UnknownOptionError)


# -- chat format ---------------------------------------------------------------------------------

# microsoft/Phi-3-vision-128k-instruct and Phi-3.5-vision-instruct tokenizer_config.json
# "chat_template" (public copy: llama.cpp tests/test-chat-template.cpp, "Phi-3-vision").
OFFICIAL_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] "
    "+ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
    "'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)


def official(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return jinja2.Template(OFFICIAL_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


IMG = ImagePart(ref="file:///img.png")


def test_single_image_model_card_prompt() -> None:
    chat = Chat.single("What is shown in this image?", [IMG])
    expected = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
    assert PHI35.render_prompt(chat) == expected
    assert PHI3.render_prompt(chat) == expected


def test_multi_frame_model_card_prompt() -> None:
    # Model card: placeholder += f"<|image_{i}|>\n" for each slide, then the question.
    chat = Chat.single("Summarize the deck of slides.", [IMG] * 3)
    placeholder = "".join(f"<|image_{i}|>\n" for i in range(1, 4))
    messages = [{"role": "user", "content": placeholder + "Summarize the deck of slides."}]
    assert PHI35.render_prompt(chat) == official(messages)


def test_system_multi_turn_and_global_numbering() -> None:
    chat = Chat(
        (
            Message.of("system", "You are a careful assistant."),
            Message.of("user", IMG, "What is shown in this image?"),
            Message.of("assistant", "The chart displays a bar graph."),
            Message.of("user", "Compare it with", IMG, "and say which is larger."),
        )
    )
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"},
        {"role": "assistant", "content": "The chart displays a bar graph."},
        {"role": "user", "content": "Compare it with<|image_2|>\nand say which is larger."},
    ]
    assert PHI35.render_prompt(chat) == official(messages)
    assert PHI35.render_prompt(chat, add_generation_prompt=False) == official(messages, False)


def test_no_generation_prompt_after_assistant_turn() -> None:
    chat = Chat((Message.of("user", IMG, "Hi"), Message.of("assistant", "Hello")))
    messages = [
        {"role": "user", "content": "<|image_1|>\nHi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert PHI35.render_prompt(chat) == official(messages)
    assert PHI35.render_prompt(chat).endswith("Hello<|end|>\n")


def test_text_parts_are_concatenated() -> None:
    chat = Chat((Message("user", (TextPart("a"), TextPart("b"), IMG)),))
    assert PHI35.render_prompt(chat) == "<|user|>\nab<|image_1|>\n<|end|>\n<|assistant|>\n"
