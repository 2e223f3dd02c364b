"""Pixtral parity: whole token-id sequences against mistral_common's Tekken v3 tokenizer, image
token counts against mistral_common's ImageEncoder (variant "mistral") and transformers' port
(variant "hf")."""

from __future__ import annotations

import os
import random

import pytest
from PIL import Image

from vlmlab.families import ImageSizeError, get_family
from vlmlab.families.pixtral import encode_chat, render_prompt
from vlmlab.protocol.core import Chat, ImagePart, Message, TextPart

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import (  # noqa: E402
    AssistantMessage,
    ImageChunk,
    SystemMessage,
    TextChunk,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

FAMILY = get_family("pixtral")
# Every threshold of the rule: patch edges, the 1024 longest edge, rounding ties, extreme aspects.
THRESHOLDS = [
    (1, 1), (16, 16), (17, 17), (15, 33), (1024, 1024), (1025, 1024), (1024, 1025), (2048, 1),
    (1, 2048), (3000, 1502), (2515, 2478), (2033, 1717), (6211, 684), (640, 480), (1920, 1080),
    (1700, 2200), (4032, 3024), (1024, 768), (2049, 1024), (10000, 3), (3, 10000), (1040, 520),
]


@pytest.fixture(scope="module")
def tekken() -> MistralTokenizer:
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    return MistralTokenizer.from_file(path)


def random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            sizes.append((rng.randint(1, 5000), rng.randint(1, 5000)))
        elif kind < 0.8:
            sizes.append((rng.randint(1, 1100), rng.randint(1, 1100)))
        else:
            sizes.append((rng.randint(1000, 9000), rng.randint(1, 300)))
    return sizes


def test_image_tokens_equal_mistral_common_image_encoder(tekken: MistralTokenizer) -> None:
    """Real images through mistral_common's public ImageEncoder: its token list and the
    resized image it returns are what the family's layout must equal."""
    encoder = tekken.instruct_tokenizer.image_encoder
    assert (encoder.image_config.image_patch_size, encoder.image_config.max_image_size) == (16, 1024)
    special = tekken.instruct_tokenizer.tokenizer
    img, img_break = special.get_special_token("[IMG]"), special.get_special_token("[IMG_BREAK]")
    for w, h in THRESHOLDS + random_sizes(300, seed=1):
        encoding = encoder(ImageChunk(image=Image.new("RGB", (w, h))))
        layout = FAMILY.image_layout(w, h)
        rows = encoding.tokens.count(img_break) + 1  # the last row ends with [IMG_END]
        cols = encoding.tokens.count(img) // rows
        assert layout.tokens == len(encoding.tokens), (w, h)
        assert layout.vision_embedding_positions == encoding.tokens.count(img) == rows * cols
        assert layout.grid == (rows, cols), (w, h)
        assert layout.resized == (encoding.image.shape[2], encoding.image.shape[1]), (w, h)


def test_spec_examples() -> None:
    assert FAMILY.image_tokens(1024, 1024) == 4160
    assert FAMILY.image_tokens(1, 1) == 2 and FAMILY.image_tokens(17, 17) == 6
    table = {(640, 480): 1230, (1024, 768): 3120, (1920, 1080): 2340, (1700, 2200): 3264, (4032, 3024): 3120}
    for (w, h), tokens in table.items():
        assert FAMILY.image_tokens(w, h) == tokens == FAMILY.image_tokens(w, h, variant="hf")
    hf_differs = {(3000, 1502): (2145, 2080), (2515, 2478): (4160, 4095), (2033, 1717): (3575, 3510), (6211, 684): (520, 455)}
    for (w, h), (mistral, hf) in hf_differs.items():
        assert FAMILY.image_tokens(w, h) == mistral
        assert FAMILY.image_tokens(w, h, variant="hf") == hf
    assert get_family("mistral-community/pixtral-12b").checkpoint("mistral-community/pixtral-12b").options == {"variant": "hf"}


def test_hf_variant_equals_transformers_pixtral_image_processor() -> None:
    from transformers.models.pixtral.image_processing_pixtral import get_resize_output_image_size

    refused = 0
    for w, h in THRESHOLDS + random_sizes(400, seed=2):
        expected_h, expected_w = get_resize_output_image_size(
            _FakeArray(h, w), size=(1024, 1024), patch_size=(16, 16), input_data_format="channels_last"
        )
        if expected_h == 0 or expected_w == 0:
            # transformers floors the short side to 0 px: it cannot process the image.
            refused += 1
            with pytest.raises(ImageSizeError, match="variant='mistral'"):
                FAMILY.image_layout(w, h, variant="hf")
            continue
        layout = FAMILY.image_layout(w, h, variant="hf")
        assert layout.resized == (expected_w, expected_h), (w, h)
    assert refused >= 2  # (10000, 3) and (3, 10000) at least


class _FakeArray:
    """Just enough of a channels-last array for transformers' get_image_size."""

    def __init__(self, h: int, w: int) -> None:
        self.shape = (h, w, 3)
        self.ndim = 3


def test_pixtral_processor_expands_exactly_our_count() -> None:
    """The real PixtralProcessor (HF port) on real images, with a tokenizer carrying its tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "hi"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]})
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok, patch_size=16)
    for w, h in [(1, 1), (17, 33), (640, 480), (1025, 300), (2033, 1717), (3000, 1502)]:
        out = processor(text="[INST][IMG] hi[/INST]", images=[Image.new("RGB", (w, h), "red")], return_tensors="np")
        ids = list(out["input_ids"][0])
        image_ids = [i for i in ids if i in (vocab["[IMG]"], vocab["[IMG_BREAK]"], vocab["[IMG_END]"])]
        assert len(image_ids) == FAMILY.image_tokens(w, h, variant="hf"), (w, h)
        assert tuple(out["pixel_values"].shape[-2:]) == FAMILY.image_layout(w, h, variant="hf").resized[::-1]


def _random_text(rng: random.Random) -> str:
    words = ["hello", "What", "is", " this", "?", "  ", "\n", "Describe the image.", "naïve café", "123", "the\n\nend", " x "]
    return "".join(rng.choice(words) for _ in range(rng.randint(1, 4)))


def _random_chat(rng: random.Random) -> tuple[list, list[Message], list[tuple[int, int]]]:
    """A random chat in both vocabularies: 1-3 images, optional system prompts, 1-3 turns."""
    theirs: list = []
    ours: list[Message] = []
    sizes: list[tuple[int, int]] = []
    if rng.random() < 0.4:
        text = _random_text(rng)
        theirs.append(SystemMessage(content=text))
        ours.append(Message.of("system", text))
    turns = rng.randint(1, 3)
    images_left = rng.randint(1, 3)
    for turn in range(turns):
        last = turn == turns - 1
        count = images_left if last else rng.randint(0, images_left)
        images_left -= count
        items = ["image"] * count + ["text"] * rng.randint(0 if count else 1, 2)
        rng.shuffle(items)
        chunks, parts = [], []
        for item in items:
            if item == "image":
                w, h = rng.randint(1, 2200), rng.randint(1, 2200)
                if rng.random() < 0.2:
                    w = rng.randint(1, 40)
                sizes.append((w, h))
                chunks.append(ImageChunk(image=Image.new("RGB", (w, h))))
                parts.append(ImagePart(ref=f"image{len(sizes)}"))
            else:
                text = _random_text(rng)
                chunks.append(TextChunk(text=text))
                parts.append(TextPart(text))
        theirs.append(UserMessage(content=chunks))
        ours.append(Message("user", tuple(parts)))
        if rng.random() < 0.2:  # a second user message in a row is merged with "\n\n"
            text = _random_text(rng)
            theirs.append(UserMessage(content=text))
            ours.append(Message.of("user", text))
        if rng.random() < 0.1:  # a system message mid-chat joins the system prompt
            text = _random_text(rng)
            theirs.append(SystemMessage(content=text))
            ours.append(Message.of("system", text))
        if not last:
            text = _random_text(rng)
            theirs.append(AssistantMessage(content=text))
            ours.append(Message.of("assistant", text))
    return theirs, ours, sizes


def test_whole_token_sequences_equal_mistral_common(tekken: MistralTokenizer) -> None:
    text_tokenizer = tekken.instruct_tokenizer.tokenizer
    rng = random.Random(7)
    checked = 0
    for _ in range(80):
        theirs, ours, sizes = _random_chat(rng)
        expected = tekken.encode_chat_completion(ChatCompletionRequest(messages=theirs)).tokens
        mine = encode_chat(Chat(tuple(ours)), lambda s: text_tokenizer.encode(s, bos=False, eos=False), sizes)
        assert mine == expected, tekken.decode(expected)
        assert sum(len(s) > 0 for s in sizes) >= 1
        checked += 1
    assert checked == 80


def test_render_prompt_places_images_and_system_like_mistral_common() -> None:
    chat = Chat(
        (
            Message.of("system", "Be brief."),
            Message.of("user", "What is in", ImagePart(ref="a")),
            Message.of("assistant", "A cat.  "),
            Message.of("user", ImagePart(ref="b"), "And here?"),
        )
    )
    assert render_prompt(chat) == "<s>[INST][IMG]What is in[/INST]A cat.</s>[INST]Be brief.\n\n[IMG]And here?[/INST]"
