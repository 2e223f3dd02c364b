"""Idefics2 / Idefics3: parity with transformers' processors built with the checkpoint configs.

Idefics2: ``Idefics2Processor`` + ``Idefics2ImageProcessor`` (size 378..980, image_seq_len 64).
Idefics3: ``Idefics3ImageProcessor`` (longest_edge 1456, max_image_size 364) for the tile grid
and ``Idefics3Processor`` (image_seq_len 169) for the prompt expansion. The Llama-3 token costs
of the ``<row_i_col_j>`` / ``<global-img>`` text tags (8 and 4) are data in the family module;
here the expansion's structure is checked by running the real processor with a minimal tokenizer
in which those tags are single tokens, then adding the tags' extra Llama-3 tokens.
"""

from __future__ import annotations

import random
from collections import Counter

import jinja2
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    Idefics2ImageProcessor,
    Idefics2Processor,
    Idefics3ImageProcessor,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import SizeDict  # noqa: E402
from transformers.models.idefics2.image_processing_idefics2 import (  # noqa: E402
    get_resize_output_image_size as idefics2_resize,
)

from vlmlab.families import ImageSizeError, get_family  # noqa: E402
from vlmlab.families.idefics3 import GLOBAL_TAG_TOKENS, ROW_COL_TAG_TOKENS  # noqa: E402
from vlmlab.protocol.core import Chat, ImagePart, Message, TextPart  # noqa: E402
from vlmlab.protocol.errors import UnknownOptionError  # noqa: E402

IDEFICS2 = get_family("idefics2")
IDEFICS3 = get_family("idefics3")
COMMON = [(640, 480), (1024, 768), (1920, 1080), (1700, 2200), (4032, 3024)]


def random_sizes(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            sizes.append((rng.randint(2, 5000), rng.randint(2, 5000)))
        elif kind < 0.85:  # thin strips
            long_side, short_side = rng.randint(300, 9000), rng.randint(1, 300)
            sizes.append((long_side, short_side) if rng.random() < 0.5 else (short_side, long_side))
        else:  # small
            sizes.append((rng.randint(1, 400), rng.randint(1, 400)))
    return sizes


SWEEP = random_sizes(seed=1234, count=240)


def word_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    """A minimal fast tokenizer: the given special tokens, whitespace runs and words as units."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "\n", "\n\n", *specials])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|[^\S\n]+|[^\s]+"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>"
    )
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


# -- Idefics2 ------------------------------------------------------------------------------------


def idefics2_processor(split: bool) -> Idefics2Processor:
    # idefics2-8b preprocessor_config.json size / processor_config.json image_seq_len.
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=split, size={"shortest_edge": 378, "longest_edge": 980}
    )
    return Idefics2Processor(
        image_processor=image_processor, tokenizer=word_tokenizer([]), image_seq_len=64
    )


@pytest.mark.parametrize("split", [True, False])
def test_idefics2_prompt_expansion(split: bool) -> None:
    processor = idefics2_processor(split)
    for size in [(640, 480), (2, 2), (3000, 40), (980, 980)]:
        out = processor(
            text="User:<image>What is it?", images=[Image.new("RGB", size)], return_tensors="pt"
        )
        tokens = Counter(processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist()))
        expanded = tokens["<image>"] + tokens["<fake_token_around_image>"]
        layout = IDEFICS2.image_layout(*size, do_image_splitting=split)
        assert expanded == layout.tokens == (326 if split else 66)
        assert tokens["<image>"] == layout.vision_embedding_positions
        assert out["pixel_values"].shape[1] == layout.views
        # The original image is the last view; its unpadded extent is the resized size.
        mask = out["pixel_attention_mask"][0, -1]
        height, width = int(mask.any(dim=1).sum()), int(mask.any(dim=0).sum())
        assert layout.resized == (width, height), size


def test_idefics2_resized_sizes_match_reference() -> None:
    size = SizeDict(shortest_edge=378, longest_edge=980)
    sizes = SWEEP + [(980, 980), (981, 980), (980, 981), (377, 377), (1, 1), (6000, 1), (1, 6000)]
    for width, height in sizes:
        reference_h, reference_w = idefics2_resize(torch.empty(0, height, width), size)
        layout = IDEFICS2.image_layout(width, height, do_image_splitting=False)
        assert layout.resized == (reference_w, reference_h), (width, height)


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1), (2000, 1)])
def test_idefics2_one_pixel_side_with_splitting(size: tuple[int, int]) -> None:
    processor = idefics2_processor(split=True)
    with pytest.raises((ZeroDivisionError, RuntimeError)):
        processor.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")
    with pytest.raises(ImageSizeError):
        IDEFICS2.image_tokens(*size)
    assert IDEFICS2.image_tokens(*size, do_image_splitting=False) == 66


def test_idefics2_common_sizes_and_checkpoints() -> None:
    assert [IDEFICS2.image_tokens(*s) for s in COMMON] == [326] * 5
    assert [IDEFICS2.image_tokens(*s, do_image_splitting=False) for s in COMMON] == [66] * 5
    base = IDEFICS2.checkpoint("HuggingFaceM4/idefics2-8b-base")
    assert base.options == {"do_image_splitting": False}
    assert IDEFICS2.image_tokens(640, 480, **base.options) == 66
    assert IDEFICS2.checkpoint().hub_id == "HuggingFaceM4/idefics2-8b"
    assert IDEFICS2.default_options == {"do_image_splitting": True}
    assert IDEFICS2.checkpoint().kv.bytes_per_token() == 131_072
    assert get_family("HuggingFaceM4/idefics2-8b-base") is IDEFICS2
    with pytest.raises(UnknownOptionError):
        IDEFICS2.image_tokens(10, 10, max_num=3)


# -- Idefics3 ------------------------------------------------------------------------------------


def idefics3_image_processor(split: bool = True) -> Idefics3ImageProcessor:
    # Idefics3-8B-Llama3 preprocessor_config.json values.
    return Idefics3ImageProcessor(
        size={"longest_edge": 1456},
        max_image_size={"longest_edge": 364},
        do_image_splitting=split,
    )


def test_idefics3_grid_matches_get_number_of_image_patches() -> None:
    processor = idefics3_image_processor()
    sizes = SWEEP + [(1, 1), (364, 364), (1456, 1092), (6000, 1), (1, 6000), (4, 3), (16, 9)]
    for width, height in sizes:
        patches, rows, cols = processor.get_number_of_image_patches(height, width, {})
        layout = IDEFICS3.image_layout(width, height)
        assert layout.grid == (rows, cols), (width, height)
        assert layout.views == patches
        assert layout.vision_embedding_positions == 169 * patches
        assert layout.tokens == 178 * rows * cols + rows + 175


@pytest.mark.parametrize(
    "size", [(640, 480), (1, 1), (1700, 2200), (37, 1001), (6000, 1), (1, 6000), (2000, 361)]
)
def test_idefics3_grid_matches_real_preprocessing(size: tuple[int, int]) -> None:
    out = idefics3_image_processor()(
        images=[Image.new("RGB", size)], return_row_col_info=True, return_tensors="pt"
    )
    layout = IDEFICS3.image_layout(*size)
    assert layout.grid == (out["rows"][0][0], out["cols"][0][0])
    assert out["pixel_values"].shape[1] == layout.views


def idefics3_processor(split: bool) -> Idefics3Processor:
    tags = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tags]
    return Idefics3Processor(
        image_processor=idefics3_image_processor(split),
        tokenizer=word_tokenizer(specials),
        image_seq_len=169,
    )


@pytest.mark.parametrize(
    ("size", "split"), [((640, 480), True), ((1, 1), True), ((6000, 1), True), ((640, 480), False)]
)
def test_idefics3_prompt_expansion(size: tuple[int, int], split: bool) -> None:
    processor = idefics3_processor(split)
    out = processor(text="<image>", images=[Image.new("RGB", size)], return_tensors="pt")
    tokens = Counter(processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist()))
    row_col_tags = sum(n for t, n in tokens.items() if t.startswith("<row_"))
    # Every position of the expansion with the single-token tags of this tokenizer...
    single_token_tags = sum(tokens.values())
    # ...plus what the Llama-3 BPE spends on the tags beyond one token each.
    llama3 = (
        single_token_tags
        + (ROW_COL_TAG_TOKENS - 1) * row_col_tags
        + (GLOBAL_TAG_TOKENS - 1) * tokens["<global-img>"]
    )
    layout = IDEFICS3.image_layout(*size, do_image_splitting=split)
    assert llama3 == layout.tokens
    assert tokens["<image>"] == layout.vision_embedding_positions
    assert tokens["\n\n"] == (1 if split else 0)  # the merged row / global newline
    assert out["pixel_values"].shape[1] == layout.views


def test_idefics3_spec_examples() -> None:
    for size in [(640, 480), (1024, 768), (1920, 1080), (4032, 3024)]:
        layout = IDEFICS3.image_layout(*size)
        assert (layout.tokens, layout.grid, layout.views) == (2314, (3, 4), 13)
    for size in [(1700, 2200), (1, 1), (500, 500), (5000, 5000)]:
        layout = IDEFICS3.image_layout(*size)
        assert (layout.tokens, layout.grid, layout.views) == (3027, (4, 4), 17)
    assert IDEFICS3.image_tokens(640, 480, do_image_splitting=False) == 175
    # transformers' single-token count for a square would be 2912.
    assert IDEFICS3.image_tokens(1, 1) - 2912 == 7 * 16 + 3
    assert IDEFICS3.checkpoint().kv.bytes_per_token() == 131_072
    assert get_family("HuggingFaceM4/Idefics3-8B-Llama3") is IDEFICS3


def test_idefics3_depends_only_on_aspect_ratio() -> None:
    for width, height in SWEEP[:100]:
        for k in (2, 5):
            assert IDEFICS3.image_tokens(k * width, k * height) == IDEFICS3.image_tokens(
                width, height
            )


# -- chat format ---------------------------------------------------------------------------------

# HuggingFaceM4/idefics2-8b processor_config.json "chat_template"; Idefics3-8B-Llama3 uses the
# same body after a literal <|begin_of_text|>.
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]"
    "['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] "
    "%}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}"
    "{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + IDEFICS2_TEMPLATE

IMG = ImagePart(ref="file:///img.png")


def as_messages(chat: Chat) -> list[dict]:
    return [
        {
            "role": m.role,
            "content": [
                {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                for p in m.content
            ],
        }
        for m in chat.messages
    ]


CHATS = [
    Chat.single("What do we see in this image?", [IMG]),
    # The idefics2-8b model card's two-image conversation.
    Chat(
        (
            Message.of("user", IMG, "What do we see in this image?"),
            Message.of("assistant", "In this image, we can see the city of New York."),
            Message.of("user", IMG, "And how about this image?"),
        )
    ),
    Chat(
        (
            Message.of("system", "Answer briefly."),
            Message.of("user", "Compare", IMG, "with", IMG),
            Message.of("assistant", "The first is larger."),
        )
    ),
]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_templates(chat: Chat, add_generation_prompt: bool) -> None:
    messages = as_messages(chat)
    for family, template in ((IDEFICS2, IDEFICS2_TEMPLATE), (IDEFICS3, IDEFICS3_TEMPLATE)):
        expected = jinja2.Template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )
        assert family.render_prompt(chat, add_generation_prompt) == expected


def test_model_card_prompt_text() -> None:
    chat = CHATS[1]
    assert IDEFICS2.render_prompt(chat) == (
        "User:<image>What do we see in this image?<end_of_utterance>\n"
        "Assistant: In this image, we can see the city of New York.<end_of_utterance>\n"
        "User:<image>And how about this image?<end_of_utterance>\nAssistant:"
    )
    assert IDEFICS3.render_prompt(CHATS[0]) == (
        "<|begin_of_text|>User:<image>What do we see in this image?<end_of_utterance>\nAssistant:"
    )
