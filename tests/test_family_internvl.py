"""InternVL2: parity with transformers' GotOcr2ImageProcessor / InternVLProcessor, chat format.

The processors are built offline from their classes with InternVL2's config values
(force_image_size 448, min/max_dynamic_patch 1/12, 256 tokens per tile).
"""

from __future__ import annotations

import random

import pytest
from PIL import Image

pytest.importorskip("torchvision")
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    GotOcr2ImageProcessor,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.got_ocr2.image_processing_got_ocr2 import (  # noqa: E402
    get_optimal_tiled_canvas,
)

from vlmlab.families import get_family  # noqa: E402
from vlmlab.protocol.core import Chat, ImagePart, Message  # noqa: E402
from vlmlab.protocol.errors import ConfigError, UnknownOptionError  # noqa: E402

INTERNVL2 = get_family("internvl2")


def image_processor(max_num: int) -> GotOcr2ImageProcessor:
    # InternVL2 values: 448 px tiles, 1..max_dynamic_patch tiles, thumbnail (always on in HF).
    return GotOcr2ImageProcessor(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_num,
    )


def random_sizes(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.55:
            sizes.append((rng.randint(1, 5000), rng.randint(1, 5000)))
        elif kind < 0.8:  # near the exact grid ratios, where ties and thresholds live
            cols, rows = rng.randint(1, 12), rng.randint(1, 12)
            k = rng.randint(50, 900)
            sizes.append((cols * k + rng.randint(-2, 2) or 1, rows * k))
        else:  # thin strips
            long_side, short_side = rng.randint(300, 8000), rng.randint(1, 200)
            sizes.append((long_side, short_side) if rng.random() < 0.5 else (short_side, long_side))
    return sizes


# Spec thresholds: square sides 633/634 and 950/951, exact grid ratios at both tie areas.
SPEC_SIZES = [
    (633, 633),
    (634, 634),
    (950, 950),
    (951, 951),
    (1, 1),
    (448, 448),
    (896, 448),
    (1920, 1080),
    (640, 480),
    (1024, 768),
    (1700, 2200),
    (4032, 3024),
    (4000, 50),
    (50, 4000),
    (896, 896),
    (1344, 448),
    (447, 894),
    (1000, 500),
    (2000, 1000),
    (3000, 1000),
]
SIZES = (
    SPEC_SIZES
    + [
        (cols * side, rows * side)
        for cols in range(1, 13)
        for rows in range(1, 13)
        if cols * rows <= 12
        for side in (200, 320, 448)
    ]
    + random_sizes(seed=7, count=260)
)


@pytest.mark.parametrize("max_num", [12, 6, 1])
def test_patch_counts_match_gotocr2(max_num: int) -> None:
    processor = image_processor(max_num)
    for width, height in SIZES:
        layout = INTERNVL2.image_layout(width, height, max_num=max_num)
        patches = processor.get_number_of_image_patches(height, width, {})
        assert layout.views == patches, (width, height, max_num)
        assert layout.tokens == 256 * patches + 2, (width, height, max_num)
        assert layout.vision_embedding_positions == 256 * patches
        if max_num > 1:
            cols, rows = get_optimal_tiled_canvas((height, width), (448, 448), 1, max_num)
            assert layout.grid == (rows, cols), (width, height, max_num)
            assert layout.resized == (448 * cols, 448 * rows)


def minimal_processor(max_num: int = 12) -> InternVLProcessor:
    # A word-level tokenizer holding InternVL's real image tokens as special tokens.
    specials = ["<unk>", "<s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|[^\s]+"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    return InternVLProcessor(
        image_processor=image_processor(max_num),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=256,  # (448/14)^2 * 0.5^2
    )


@pytest.mark.parametrize(
    "size", [(640, 480), (1920, 1080), (100, 100), (4000, 50), (700, 700), (300, 900)]
)
def test_full_processor_expansion(size: tuple[int, int]) -> None:
    processor = minimal_processor()
    tokenizer = processor.tokenizer
    out = processor(
        text="describe <IMG_CONTEXT> now", images=[Image.new("RGB", size)], return_tensors="pt"
    )
    image_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")}
    expanded = sum(1 for i in out["input_ids"][0].tolist() if i in image_ids)
    layout = INTERNVL2.image_layout(*size)
    assert expanded == layout.tokens
    assert out["pixel_values"].shape[0] == layout.views  # tiles + thumbnail really produced


@pytest.mark.parametrize(
    ("size", "tokens_12", "grid_12", "tokens_6", "grid_6"),
    [
        ((640, 480), 3330, (3, 4), 1794, (2, 3)),
        ((1024, 768), 3330, (3, 4), 1794, (2, 3)),
        ((1920, 1080), 2306, (2, 4), 770, (1, 2)),
        ((1700, 2200), 3330, (4, 3), 1794, (3, 2)),
        ((4032, 3024), 3330, (3, 4), 1794, (2, 3)),
    ],
)
def test_common_sizes_table(size, tokens_12, grid_12, tokens_6, grid_6) -> None:
    assert INTERNVL2.image_layout(*size).tokens == tokens_12
    assert INTERNVL2.image_layout(*size).grid == grid_12
    assert INTERNVL2.image_layout(*size, max_num=6).tokens == tokens_6
    assert INTERNVL2.image_layout(*size, max_num=6).grid == grid_6


def test_spec_square_thresholds() -> None:
    assert [INTERNVL2.image_tokens(s, s) for s in (1, 633, 634, 950, 951)] == [
        258,
        258,
        1282,
        1282,
        2562,
    ]
    # With max_num=6 squares stay at 2x2 + thumbnail.
    assert {INTERNVL2.image_tokens(s, s, max_num=6) for s in (634, 951, 2000, 5000)} == {1282}
    # Very wide images keep being tiled up to 12x1.
    assert INTERNVL2.image_layout(4000, 50).grid == (1, 12)
    assert INTERNVL2.image_tokens(4000, 50) == 3330


def test_names_options_checkpoints() -> None:
    assert get_family("internvl_chat") is INTERNVL2
    assert get_family("internvl") is INTERNVL2
    assert get_family("OpenGVLab/InternVL2-8B") is INTERNVL2
    assert get_family("OpenGVLab/InternVL2-2B") is INTERNVL2
    assert INTERNVL2.default_options == {"max_num": 12}
    # Spec KV table: InternVL2-8B 131,072 B/token, InternVL2-2B 98,304 B/token (bf16).
    assert INTERNVL2.checkpoint("OpenGVLab/InternVL2-8B").kv.bytes_per_token() == 131_072
    assert INTERNVL2.checkpoint("OpenGVLab/InternVL2-2B").kv.bytes_per_token() == 98_304
    with pytest.raises(UnknownOptionError):
        INTERNVL2.image_tokens(10, 10, num_crops=4)
    with pytest.raises(ConfigError):
        INTERNVL2.image_tokens(10, 10, max_num=0)


# -- chat format ---------------------------------------------------------------------------------

# conversation.py 'internlm2-chat' system_message.
DEFAULT_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
IMG = ImagePart(ref="file:///img.png")


def test_single_image_chat_prompt() -> None:
    # model card: question = '<image>\nPlease describe the image shortly.'; chat() builds the
    # internlm2-chat prompt (MPT separators: no newline after <|im_end|>).
    chat = Chat.single("Please describe the image shortly.", [IMG])
    assert INTERNVL2.render_prompt(chat) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>"
        "<|im_start|>user\n<image>\nPlease describe the image shortly.<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_multi_image_multi_turn_prompt() -> None:
    # model card: question = 'Image-1: <image>\nImage-2: <image>\nWhat are the similarities ...'
    # followed by a second round in the history.
    chat = Chat(
        (
            Message.of("user", IMG, IMG, "What are the similarities between these two images."),
            Message.of("assistant", "Both show pandas."),
            Message.of("user", "What are the differences between these two images."),
        )
    )
    assert INTERNVL2.render_prompt(chat) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>"
        "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\n"
        "What are the similarities between these two images.<|im_end|>"
        "<|im_start|>assistant\nBoth show pandas.<|im_end|>"
        "<|im_start|>user\nWhat are the differences between these two images.<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_system_message_replaces_default_and_numbering_is_global() -> None:
    chat = Chat(
        (
            Message.of("system", "Answer in English."),
            Message.of("user", IMG, "First?"),
            Message.of("assistant", "A cat."),
            Message.of("user", "And", IMG),
        )
    )
    prompt = INTERNVL2.render_prompt(chat, add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nAnswer in English.<|im_end|>"
        "<|im_start|>user\nImage-1: <image>\nFirst?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nAndImage-2: <image>\n<|im_end|>"
    )
    assert DEFAULT_SYSTEM not in prompt


def test_text_only_and_assistant_last() -> None:
    chat = Chat((Message.of("user", "Hi"), Message.of("assistant", "Hello")))
    assert INTERNVL2.render_prompt(chat).endswith(
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello<|im_end|>"
    )
