"""Qwen2-VL / Qwen2.5-VL family: parity with transformers' Qwen2VL processor and qwen-vl-utils.

References run here, offline, built with the checkpoints' preprocessor_config.json values
(min_pixels 3136, max_pixels 12845056):
* transformers ``Qwen2VLImageProcessor`` / ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``
  (the image processor's public ``get_number_of_image_patches`` for the bulk sweep, full
  ``__call__`` on a handful of images
  with a minimal tokenizer that holds the real special tokens);
* qwen-vl-utils 0.0.14 ``smart_resize`` / ``fetch_image`` followed by the HF processor, the
  model cards' pipeline (``variant="qwen_vl_utils"``).
"""

from __future__ import annotations

import math
import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
qwen_vl_utils = pytest.importorskip("qwen_vl_utils")

from PIL import Image  # noqa: E402
from qwen_vl_utils.vision_process import fetch_image  # noqa: E402
from qwen_vl_utils.vision_process import smart_resize as qvu_smart_resize  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)

from vlmlab.families import ImageSizeError, get_family  # noqa: E402
from vlmlab.families.qwen2_vl import IMAGE_PLACEHOLDER  # noqa: E402
from vlmlab.protocol.core import Chat, ImagePart, Message  # noqa: E402
from vlmlab.protocol.errors import ConfigError, UnknownOptionError  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
MIN_PIXELS, MAX_PIXELS = 3136, 12845056  # Qwen2(.5)-VL-*-Instruct preprocessor_config.json
OPTION_SETS = (
    {},  # checkpoint defaults
    {"max_pixels": 1003520},  # 1280*28^2, the model-card example
    {"min_pixels": 200704, "max_pixels": 1003520},  # 256*28^2 .. 1280*28^2
    # a tiny budget: thin images scale down to < 28 px, where HF clamps to 28 and qwen-vl-utils
    # produces a 0 px side
    {"min_pixels": 784, "max_pixels": 3136},
)
OPTION_IDS = ["default", "max1003520", "min200704", "tiny"]
SPECIAL_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]

# Qwen/Qwen2-VL-*-Instruct chat_template.json (Qwen2.5-VL ships the same string).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- reference builders -------------------------------------------------------------------------


def minimal_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer holding Qwen's vision special tokens (no weights needed)."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return minimal_tokenizer()


def build_processor(tokenizer, family: str = "qwen2_vl", **pixels: int):
    """The real processor class for ``family`` with the checkpoint's (or ``pixels``) budget."""
    image_processor = Qwen2VLImageProcessor(
        min_pixels=pixels.get("min_pixels", MIN_PIXELS),
        max_pixels=pixels.get("max_pixels", MAX_PIXELS),
    )
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )


def sweep_sizes() -> list[tuple[int, int]]:
    """Seeded random (width, height) pairs plus every threshold and example of the spec."""
    rng = random.Random(20240829)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < 160:
        w = int(math.exp(rng.uniform(0, math.log(9000))))
        h = int(math.exp(rng.uniform(0, math.log(9000))))
        if max(w, h) / min(w, h) <= 200:
            sizes.append((w, h))
    sizes += [(rng.randint(200, 5000), rng.randint(200, 5000)) for _ in range(40)]
    sizes += [
        (640, 480), (1024, 768), (1920, 1080), (1700, 2200), (4032, 3024),  # spec table
        (1000, 10), (10, 1000), (12000, 60), (60, 12000),  # spec gotchas
        (1, 1), (2, 1), (200, 1), (1, 200), (13, 13), (14, 14), (15, 15), (27, 29),
        (28, 28), (42, 42), (70, 70), (98, 98), (56, 56), (55, 57), (56, 57),  # round-half-even
        (3584, 3584), (3585, 3584), (3584, 3585), (3583, 3583),  # area exactly max_pixels
        (1003, 1001), (1008, 996), (1120, 896), (1121, 897),  # near 1003520
        (448, 448), (447, 449), (5600, 28), (28, 5600), (4000, 20), (7999, 40),
    ]  # fmt: skip
    return sizes


# -- image tokens: spec table -----------------------------------------------------------------

SPEC_TABLE = {
    # (width, height): (tokens, grid) with max_pixels 12845056 (default), then 1003520
    (640, 480): ((393, (17, 23)), (393, (17, 23))),
    (1024, 768): ((1001, (27, 37)), (1001, (27, 37))),
    (1920, 1080): ((2693, (39, 69)), (1224, (26, 47))),
    (1700, 2200): ((4821, (79, 61)), (1242, (40, 31))),
    (4032, 3024): ((15554, (108, 144)), (1232, (30, 41))),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_spec_table_values(name: str) -> None:
    family = get_family(name)
    for (w, h), (default, small) in SPEC_TABLE.items():
        layout = family.image_layout(w, h)
        assert (layout.tokens, layout.grid) == default, (w, h)
        assert layout.vision_embedding_positions == layout.tokens - 2
        layout = family.image_layout(w, h, max_pixels=1003520)
        assert (layout.tokens, layout.grid) == small, (w, h)
    # spec: the transformers *class* default (1003520) under-counts 4032x3024 by 12x
    assert family.image_tokens(4032, 3024) == 15554
    assert family.image_tokens(4032, 3024, max_pixels=28 * 28 * 1280) == 1232


# -- image tokens: sweep against transformers ----------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_matches_transformers_processor(tokenizer, name: str, options: dict) -> None:
    family = get_family(name)
    processor = build_processor(tokenizer, name, **options)
    min_px = options.get("min_pixels", MIN_PIXELS)
    max_px = options.get("max_pixels", MAX_PIXELS)
    sizes = sweep_sizes()
    assert len(sizes) >= 200
    accepted = [(w, h) for w, h in sizes if max(w, h) / min(w, h) <= 200]
    # The image processor's public patch count (what its pixel_values would hold), merged 2x2.
    image_processor = processor.image_processor
    merge = image_processor.merge_size**2
    for w, h in accepted:
        pads = image_processor.get_number_of_image_patches(h, w, {}) // merge
        layout = family.image_layout(w, h, **options)
        ref_h, ref_w = hf_smart_resize(h, w, factor=28, min_pixels=min_px, max_pixels=max_px)
        assert layout.tokens == pads + 2, (w, h)
        assert layout.vision_embedding_positions == pads
        assert layout.resized == (ref_w, ref_h), (w, h)
        assert layout.grid == (ref_h // 28, ref_w // 28)


@pytest.mark.parametrize("name", FAMILIES)
def test_full_processor_expansion(tokenizer, name: str) -> None:
    """Run the real processor on actual images and count the expanded prompt."""
    family = get_family(name)
    processor = build_processor(tokenizer, name)
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for w, h in [(640, 480), (1000, 10), (1, 1), (300, 1500), (12000, 60), (2000, 1400)]:
        out = processor(
            text=IMAGE_PLACEHOLDER, images=Image.new("RGB", (w, h)), return_tensors="pt"
        )
        ids = out["input_ids"][0].tolist()
        layout = family.image_layout(w, h)
        assert len(ids) == layout.tokens, (w, h)  # vision_start + pads + vision_end
        assert ids.count(pad_id) == layout.vision_embedding_positions
        rows, cols = layout.grid
        assert out["image_grid_thw"][0].tolist() == [1, 2 * rows, 2 * cols]
        assert out["pixel_values"].shape[0] == 4 * rows * cols


def test_aspect_ratio_over_200_raises_like_reference() -> None:
    for w, h in [(201, 1), (1, 201), (10000, 49), (3000, 14), (60, 12001)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            hf_smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        for name in FAMILIES:
            with pytest.raises(ImageSizeError, match="aspect ratio"):
                get_family(name).image_tokens(w, h)
    assert get_family("qwen2_vl").image_tokens(200, 1) > 0  # exactly 200 is accepted


# -- qwen-vl-utils ------------------------------------------------------------------------------


def qwen_vl_utils_pipeline(w: int, h: int, min_px: int, max_px: int) -> tuple[int, int] | None:
    """fetch_image's smart_resize then the HF processor's second smart_resize; None if rejected."""
    try:
        h1, w1 = qvu_smart_resize(h, w, factor=28, min_pixels=min_px, max_pixels=max_px)
        if h1 < 1 or w1 < 1:
            return None  # PIL cannot resize to a 0 px side
        h2, w2 = hf_smart_resize(h1, w1, factor=28, min_pixels=min_px, max_pixels=max_px)
    except (ValueError, AssertionError):
        return None
    return w2, h2


@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_qwen_vl_utils_variant_matches_its_pipeline(options: dict) -> None:
    family = get_family("qwen2_5_vl")
    min_px = options.get("min_pixels", MIN_PIXELS)
    max_px = options.get("max_pixels", MAX_PIXELS)
    for w, h in sweep_sizes():
        expected = qwen_vl_utils_pipeline(w, h, min_px, max_px)
        if expected is None:
            with pytest.raises(ImageSizeError):
                family.image_layout(w, h, variant="qwen_vl_utils", **options)
            continue
        layout = family.image_layout(w, h, variant="qwen_vl_utils", **options)
        assert layout.resized == expected, (w, h)
        assert layout.tokens == (expected[0] // 28) * (expected[1] // 28) + 2


@pytest.mark.parametrize("options", OPTION_SETS[:3], ids=OPTION_IDS[:3])
def test_hf_and_qwen_vl_utils_agree_where_spec_says(options: dict) -> None:
    """Both sides >= 15 px (no side rounds to 0, so the >= 28 clamp never bites) and an output
    the processor's second pass accepts: the two pipelines give the same size. (With a tiny
    max_pixels they also differ in the scale-down branch, which only HF clamps to >= 28 px.)"""
    family = get_family("qwen2_vl")
    min_px = options.get("min_pixels", MIN_PIXELS)
    max_px = options.get("max_pixels", MAX_PIXELS)
    compared = 0
    for w, h in sweep_sizes():
        if min(w, h) < 15 or max(w, h) / min(w, h) > 200:
            continue
        expected = qwen_vl_utils_pipeline(w, h, min_px, max_px)
        if expected is None:
            continue
        compared += 1
        assert family.image_layout(w, h, **options).resized == expected, (w, h)
    assert compared >= 150


def test_thin_images_differ_between_hf_and_qwen_vl_utils(tokenizer) -> None:
    """Spec gotcha: qwen-vl-utils clamps h, w >= 28 *before* the min_pixels test, HF does not.

    1000x10 becomes 1008x28 (36 + 2 = 38 tokens) through fetch_image + processor but 560x28
    (20 + 2 = 22) through the bare HF processor. The default (``variant="hf"``) follows the HF
    processor, which is what vLLM and SGLang run; ``variant="qwen_vl_utils"`` follows the model
    cards' pipeline. Both references are run here, on real images.
    """
    family = get_family("qwen2_vl")
    processor = build_processor(tokenizer)
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for w, h in [(1000, 10), (10, 1000), (3, 500), (700, 5)]:
        image = Image.new("RGB", (w, h))
        bare = processor(text=IMAGE_PLACEHOLDER, images=image, return_tensors="pt")
        fetched = fetch_image({"image": image, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
        piped = processor(text=IMAGE_PLACEHOLDER, images=fetched, return_tensors="pt")
        hf_pads = bare["input_ids"][0].tolist().count(pad_id)
        qvu_pads = piped["input_ids"][0].tolist().count(pad_id)
        assert hf_pads != qvu_pads, (w, h)
        assert family.image_tokens(w, h) == hf_pads + 2
        assert family.image_tokens(w, h, variant="qwen_vl_utils") == qvu_pads + 2
        assert family.image_layout(w, h, variant="qwen_vl_utils").resized == fetched.size
    assert family.image_tokens(1000, 10) == 22  # spec numbers
    assert family.image_tokens(1000, 10, variant="qwen_vl_utils") == 38


def test_aspect_limit_second_pass_in_qwen_vl_utils_pipeline(tokenizer) -> None:
    """12000x60 is resized by fetch_image to 12012x56 (ratio 214.5), which the processor then
    rejects; the bare HF processor accepts 12000x60 (860 tokens)."""
    family = get_family("qwen2_vl")
    processor = build_processor(tokenizer)
    fetched = fetch_image({"image": Image.new("RGB", (12000, 60))})
    assert fetched.size == (12012, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        processor(text=IMAGE_PLACEHOLDER, images=fetched, return_tensors="pt")
    with pytest.raises(ImageSizeError, match="12012x56"):
        family.image_tokens(12000, 60, variant="qwen_vl_utils")
    assert family.image_tokens(12000, 60) == 860


def test_qwen_vl_utils_rejects_min_above_max() -> None:
    with pytest.raises(AssertionError):
        qvu_smart_resize(500, 500, factor=28, min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ConfigError, match="min_pixels"):
        get_family("qwen2_vl").image_tokens(
            500, 500, variant="qwen_vl_utils", min_pixels=10_000, max_pixels=5_000
        )


# -- options, lookup, checkpoints ------------------------------------------------------------------


def test_options_and_lookup() -> None:
    family = get_family("qwen2_vl")
    assert family.default_options == {"min_pixels": 3136, "max_pixels": 12845056, "variant": "hf"}
    assert family.image_tokens(1920, 1080, max_pixels="1003520") == 1224  # CLI strings coerce
    with pytest.raises(UnknownOptionError, match="num_crops"):
        family.image_tokens(640, 480, num_crops=4)
    with pytest.raises(ConfigError):
        family.image_tokens(640, 480, variant="vllm")
    for hub_id in (
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen/Qwen2-VL-72B-Instruct",
    ):
        assert get_family(hub_id) is family
        assert family.checkpoint(hub_id).hub_id == hub_id
    qwen25 = get_family("qwen2_5_vl")
    for hub_id in (
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-72B-Instruct",
    ):
        assert get_family(hub_id) is qwen25
    assert family.model_types == ("qwen2_vl",) and qwen25.model_types == ("qwen2_5_vl",)
    assert qwen25.image_placeholder == family.image_placeholder == IMAGE_PLACEHOLDER


# spec "KV cache per token" table (bf16 bytes per token)
SPEC_KV_BYTES = {
    "Qwen/Qwen2-VL-2B-Instruct": 28_672,
    "Qwen/Qwen2-VL-7B-Instruct": 57_344,
    "Qwen/Qwen2.5-VL-7B-Instruct": 57_344,
    "Qwen/Qwen2.5-VL-3B-Instruct": 36_864,
    "Qwen/Qwen2-VL-72B-Instruct": 327_680,
    "Qwen/Qwen2.5-VL-72B-Instruct": 327_680,
}


def test_checkpoint_kv_geometry_matches_spec() -> None:
    for hub_id, expected in SPEC_KV_BYTES.items():
        checkpoint = get_family(hub_id).checkpoint(hub_id)
        assert checkpoint.kv.bytes_per_token("bf16") == expected, hub_id
        assert checkpoint.params > 1e9 and checkpoint.max_model_len >= 32_768
    # spec "KV cache for one image in MiB" row for Qwen2-VL-7B / Qwen2.5-VL-7B
    for name in ("Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"):
        family = get_family(name)
        per_token = family.checkpoint(name).kv.bytes_per_token()
        mib = [round(family.image_tokens(w, h) * per_token / 2**20, 1) for w, h in SPEC_TABLE]
        assert mib == [21.5, 54.7, 147.3, 263.6, 850.6]


# -- chat format ----------------------------------------------------------------------------------


def hf_messages(chat: Chat) -> list[dict]:
    """The chat in the transformers / OpenAI-style message format the template consumes."""
    return [
        {
            "role": m.role,
            "content": [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                for p in m.content
            ],
        }
        for m in chat.messages
    ]


IMG = ImagePart(ref="file:///tmp/a.png")
CHATS = {
    "model_card": Chat((Message.of("user", IMG, "Describe this image."),)),
    "system_two_images": Chat(
        (
            Message.of("system", "You are a careful assistant."),
            Message.of("user", "Compare ", IMG, " with ", IMG, ". Which is brighter?"),
        )
    ),
    "multi_turn": Chat(
        (
            Message.of("user", IMG, "What is this?"),
            Message.of("assistant", "A cat."),
            Message.of("user", "And this one?", IMG),
        )
    ),
    "text_only": Chat((Message.of("user", "Hello"),)),
    "system_later": Chat(
        (Message.of("user", "hi"), Message.of("system", "Be brief."), Message.of("user", IMG, "?"))
    ),
    "ends_with_assistant": Chat(
        (Message.of("user", IMG, IMG, "Two images"), Message.of("assistant", "Yes."))
    ),
}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("chat_name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_prompt_matches_official_template(
    tokenizer, name: str, chat_name: str, add_generation_prompt: bool
) -> None:
    chat = CHATS[chat_name]
    expected = tokenizer.apply_chat_template(
        hf_messages(chat),
        chat_template=QWEN_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert get_family(name).render_prompt(chat, add_generation_prompt) == expected


def test_render_prompt_model_card_example() -> None:
    prompt = get_family("qwen2_vl").render_prompt(CHATS["model_card"])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    # images keep their interleaved position; a given system prompt replaces the default
    two = get_family("qwen2_5_vl").render_prompt(CHATS["system_two_images"])
    assert "You are a helpful assistant." not in two
    assert f"Compare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER}. Which" in two
