"""LLaVA-NeXT and LLaVA-OneVision families: parity with transformers' processors.

References run here, offline, built from their classes with the llava-hf checkpoints' values:
* ``LlavaNextProcessor`` + ``LlavaNextImageProcessor`` (llava-v1.6-mistral-7b-hf:
  shortest_edge / crop 336, the 5 pinpoints, patch_size 14, strategy "default",
  num_additional_image_tokens 1);
* ``LlavaOnevisionProcessor`` + ``LlavaOnevisionImageProcessor`` (llava-onevision-qwen2-*-ov-hf:
  384x384, 36 pinpoints, num_image_tokens 729, strategy "full", anyres_max_9).
Every size of the sweep goes through the full processor as a real image, with a minimal tokenizer
holding ``<image>``: the expanded prompt is the public output the parity claim is about.
"""

from __future__ import annotations

import math
import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution  # noqa: E402

from vlmlab.families import get_family  # noqa: E402
from vlmlab.families import llava_next as next_module  # noqa: E402
from vlmlab.families.llava_next import render_prompt_vicuna  # noqa: E402
from vlmlab.protocol.core import Chat, ImagePart, Message  # noqa: E402
from vlmlab.protocol.errors import UnknownOptionError  # noqa: E402

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json (current revision: "</s> ").
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# llava-hf/llava-v1.6-vicuna-7b-hf chat_template.json (same as llava-1.5).
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-onevision-qwen2-*-ov-hf chat_template.json (also in transformers' tests).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


# -- reference builders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with the ``<image>`` / ``<video>`` special tokens."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_special_tokens(
        {"additional_special_tokens": ["<image>", "<video>"], "pad_token": "[PAD]"}
    )
    return tok


@pytest.fixture(scope="module")
def next_processor(tokenizer) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=NEXT_PINPOINTS,
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.fixture(scope="module")
def ov_processor(tokenizer) -> LlavaOnevisionProcessor:
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384}, image_grid_pinpoints=OV_PINPOINTS, do_pad=True
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def sweep_sizes() -> list[tuple[int, int]]:
    """Seeded random (width, height) pairs plus tile boundaries, ties and the spec examples."""
    rng = random.Random(1601)
    sizes = [
        (
            int(math.exp(rng.uniform(0, math.log(9000)))),
            int(math.exp(rng.uniform(0, math.log(9000)))),
        )
        for _ in range(170)
    ]
    sizes += [(rng.randint(300, 4500), rng.randint(300, 4500)) for _ in range(60)]
    sizes += [
        (640, 480), (1024, 768), (1920, 1080), (1700, 2200), (4032, 3024),  # spec table
        (320, 240), (240, 320), (4000, 50), (50, 4000),  # spec gotchas
        (1, 1), (2, 1), (1, 2), (1, 5000), (5000, 1), (1, 100000), (3, 20000),
        (336, 336), (337, 337), (335, 337), (672, 672), (673, 673), (672, 336), (336, 672),
        (1008, 336), (336, 1008), (1009, 337), (384, 384), (385, 385), (768, 384), (384, 768),
        (2304, 2304), (2305, 2304), (1152, 1152), (1536, 1536), (1920, 1152), (2304, 384),
        (1000, 1000), (1334, 1000), (1000, 1334), (1777, 1000), (3000, 1000),
        # float edge cases where the unpadding's round(..., 7) guard changes int(): found by
        # brute force, e.g. 110x176 gives 110 * (24 / 176) = 14.999999999999998
        (110, 176), (198, 176), (47, 1128), (376, 799), (410, 1968),
        (369, 820), (738, 820), (820, 1107), (1107, 820), (1375, 750), (1476, 820),
    ]  # fmt: skip
    return sizes


def count_image_tokens(out, tokenizer, sample: int = 0) -> int:
    return out["input_ids"][sample].tolist().count(tokenizer.convert_tokens_to_ids("<image>"))


# -- spec table ---------------------------------------------------------------------------------

SPEC_TABLE = {
    # (width, height): (LLaVA-NeXT tokens, grid), (LLaVA-OneVision tokens, grid)
    (640, 480): ((2340, (2, 2)), (2929, (2, 2))),
    (1024, 768): ((2340, (2, 2)), (4725, (2, 3))),
    (1920, 1080): ((1948, (2, 2)), (7269, (3, 5))),
    (1700, 2200): ((2448, (2, 2)), (7353, (6, 5))),
    (4032, 3024): ((2340, (2, 2)), (7309, (5, 6))),
}


def test_spec_table_values() -> None:
    llava_next, onevision = get_family("llava_next"), get_family("llava_onevision")
    for (w, h), (next_expected, ov_expected) in SPEC_TABLE.items():
        layout = llava_next.image_layout(w, h)
        assert (layout.tokens, layout.grid) == next_expected, (w, h)
        layout = onevision.image_layout(w, h)
        assert (layout.tokens, layout.grid) == ov_expected, (w, h)
    assert llava_next.image_tokens(4000, 50) == 576  # unpadded tile map collapses to 0 rows


# -- sweeps against transformers -----------------------------------------------------------------


def processor_image_tokens(processor, tokenizer, width: int, height: int) -> int:
    """The ``<image>`` run the full processor expands one real image of this size into."""
    image = Image.new("RGB", (width, height))
    out = processor(text="<image>", images=image, return_tensors="np")
    return count_image_tokens(out, tokenizer)


def test_llava_next_matches_transformers(next_processor, tokenizer) -> None:
    family = get_family("llava_next")
    sizes = sweep_sizes()
    assert len(sizes) >= 200
    for w, h in sizes:
        expected = processor_image_tokens(next_processor, tokenizer, w, h)
        layout = family.image_layout(w, h)
        best_h, best_w = select_best_resolution((h, w), NEXT_PINPOINTS)
        assert layout.tokens == expected, (w, h)
        assert layout.vision_embedding_positions == expected
        assert layout.resized == (best_w, best_h)
        assert layout.grid == (best_h // 336, best_w // 336)


def test_llava_onevision_matches_transformers(ov_processor, tokenizer) -> None:
    family = get_family("llava_onevision")
    for w, h in sweep_sizes():
        expected = processor_image_tokens(ov_processor, tokenizer, w, h)
        layout = family.image_layout(w, h)
        best_h, best_w = select_best_resolution((h, w), OV_PINPOINTS)
        assert layout.tokens == expected, (w, h)
        assert layout.resized == (best_w, best_h)
        assert layout.grid == (best_h // 384, best_w // 384)


@pytest.mark.parametrize(
    "size", [(640, 480), (1920, 1080), (320, 240), (4000, 50), (1, 1), (1, 5000), (900, 1600)]
)
def test_full_processing(next_processor, ov_processor, tokenizer, size) -> None:
    """Real images through the full processors: the expanded ``<image>`` run and the number of
    encoder views (tiles + base) match the layout."""
    image = Image.new("RGB", size)
    for name, processor in (("llava_next", next_processor), ("llava_onevision", ov_processor)):
        out = processor(text="<image> hello", images=image, return_tensors="pt")
        layout = get_family(name).image_layout(*size)
        assert count_image_tokens(out, tokenizer) == layout.tokens, (name, size)
        assert out["pixel_values"].shape[1] == layout.views, (name, size)
        assert out["image_sizes"][0].tolist() == [size[1], size[0]]


# -- OneVision multi-image ------------------------------------------------------------------------


def test_onevision_multi_image_prompt_skips_anyres(ov_processor, tokenizer) -> None:
    family = get_family("llava_onevision")
    sizes = [(640, 480), (1920, 1080), (30, 900)]
    images = [Image.new("RGB", s) for s in sizes]
    # two samples in one batch: one image alone (anyres), three images together (base views)
    out = ov_processor(
        text=["<image> hello", "<image> <image> <image> hello"],
        images=[[images[1]], images],
        return_tensors="pt",
        padding=True,
    )
    assert out["batch_num_images"].tolist() == [1, 3]
    assert (
        count_image_tokens(out, tokenizer, 0) == sum(family.prompt_image_tokens([sizes[1]])) == 7269
    )
    assert count_image_tokens(out, tokenizer, 1) == sum(family.prompt_image_tokens(sizes))
    assert family.prompt_image_tokens(sizes) == [729 + 1] * 3
    # LLaVA-NeXT has no such rule: each image keeps its anyres count
    llava_next = get_family("llava_next")
    assert llava_next.prompt_image_tokens(sizes) == [llava_next.image_tokens(*s) for s in sizes]


# -- gotchas ------------------------------------------------------------------------------------


def test_pinpoint_orientation_tie_for_tiny_images() -> None:
    """transformers reads pinpoints as (height, width), the original LLaVA repo as
    (width, height). For tiny non-square images the [336,672] / [672,336] tie goes to the first
    entry, so 320x240 is a 1x2 tile grid in HF (1368 tokens) and 2x1 in the original (1026).
    vLLM and SGLang use the HF processor, which the family follows."""
    family = get_family("llava_next")
    assert select_best_resolution((240, 320), NEXT_PINPOINTS) == (336, 672)
    layout = family.image_layout(320, 240)
    assert (layout.tokens, layout.grid) == (1368, (1, 2))
    # the original repo's reading, through the same helpers with the pinpoints transposed
    transposed = [(pw, ph) for ph, pw in next_module.PINPOINTS]
    canvas_h, canvas_w = next_module.select_best_resolution(240, 320, transposed)
    feat_h, feat_w = next_module.unpadded_feature_grid(
        240, 320, canvas_h // 336, canvas_w // 336, 24
    )
    assert (canvas_h, canvas_w) == (672, 336)
    assert 576 + feat_h * feat_w + feat_h == 1026


def test_onevision_downsample_threshold_is_1_1() -> None:
    """anyres_max_9 shrinks the feature map only when sqrt(area / (9*27*27)) > 1.1."""
    family = get_family("llava_onevision")
    # 1152x1152 (3x3 tiles, 81x81 features): ratio 1.0 -> kept whole
    assert family.image_tokens(1152, 1152) == 729 + 81 * 81 + 81
    # 1152x1536 (4x3 tiles, 108x81 features): ratio sqrt(4/3) = 1.155 > 1.1 -> downsampled
    assert family.image_tokens(1152, 1536) < 729 + 108 * 81 + 108


def test_options_and_lookup() -> None:
    llava_next, onevision = get_family("llava_next"), get_family("llava_onevision")
    assert llava_next.options == ()
    with pytest.raises(UnknownOptionError, match="none"):
        llava_next.image_tokens(640, 480, max_pixels=1003520)
    # OneVision's one option is the shared-prompt variant: base view only, whatever the size.
    assert [o.name for o in onevision.options] == ["multi_image"]
    with pytest.raises(UnknownOptionError, match="multi_image"):
        onevision.image_tokens(640, 480, max_pixels=1003520)
    for size in ((640, 480), (7, 900), (4032, 3024)):
        assert onevision.image_tokens(*size, multi_image=True) == 729 + 1
        assert onevision.image_tokens(*size) > 729 + 1
    assert onevision.prompt_image_tokens([(640, 480), (30, 40)]) == [
        onevision.image_tokens(640, 480, multi_image=True), onevision.image_tokens(30, 40, multi_image=True)
    ]  # fmt: skip
    for hub_id in ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf"):
        assert get_family(hub_id) is llava_next
        assert llava_next.checkpoint(hub_id).hub_id == hub_id
    for hub_id in (
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    ):
        assert get_family(hub_id) is onevision
    assert get_family("llava_next").model_types == ("llava_next",)
    assert get_family("llava_onevision").model_types == ("llava_onevision",)
    assert llava_next.max_images == 1 and onevision.max_images > 1


# spec "KV cache per token" table (bf16 bytes per token) and one-image MiB rows
SPEC_KV_BYTES = {
    "llava-hf/llava-v1.6-mistral-7b-hf": 131_072,
    "llava-hf/llava-v1.6-vicuna-7b-hf": 524_288,
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": 57_344,
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": 12_288,
}
SPEC_KV_MIB = {
    "llava-hf/llava-v1.6-mistral-7b-hf": [292.5, 292.5, 243.5, 306.0, 292.5],
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": [160.2, 258.4, 397.5, 402.1, 399.7],
}


def test_checkpoint_kv_geometry_matches_spec() -> None:
    for hub_id, expected in SPEC_KV_BYTES.items():
        family = get_family(hub_id)
        checkpoint = family.checkpoint(hub_id)
        assert checkpoint.kv.bytes_per_token("bf16") == expected, hub_id
        assert checkpoint.params > 5e8 and checkpoint.max_model_len >= 4096
    for hub_id, expected in SPEC_KV_MIB.items():
        family = get_family(hub_id)
        per_token = family.checkpoint(hub_id).kv.bytes_per_token()
        assert [
            round(family.image_tokens(w, h) * per_token / 2**20, 1) for w, h in SPEC_TABLE
        ] == expected


# -- chat formats ----------------------------------------------------------------------------------


def hf_messages(chat: Chat) -> list[dict]:
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
    "model_card": Chat((Message.of("user", IMG, "What is shown in this image?"),)),
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
    "text_after_image_parts": Chat((Message.of("user", "first", IMG, "second"),)),
}
TEMPLATES = {
    "llava_next": (
        MISTRAL_TEMPLATE,
        lambda chat, agp: get_family("llava_next").render_prompt(chat, agp),
    ),
    "vicuna": (VICUNA_TEMPLATE, render_prompt_vicuna),
    "llava_onevision": (
        ONEVISION_TEMPLATE,
        lambda chat, agp: get_family("llava_onevision").render_prompt(chat, agp),
    ),
}


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("chat_name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_prompt_matches_official_template(
    tokenizer, template: str, chat_name: str, add_generation_prompt: bool
) -> None:
    jinja, render = TEMPLATES[template]
    chat = CHATS[chat_name]
    expected = tokenizer.apply_chat_template(
        hf_messages(chat),
        chat_template=jinja,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert render(chat, add_generation_prompt) == expected


def test_render_prompt_model_card_examples() -> None:
    chat = CHATS["model_card"]
    assert (
        get_family("llava_next").render_prompt(chat)
        == "[INST] <image>\nWhat is shown in this image? [/INST]"
    )
    assert get_family("llava_onevision").render_prompt(chat) == (
        "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"
    )
    vicuna_system = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions."
    )
    with_system = Chat((Message.of("system", vicuna_system), *chat.messages))
    assert render_prompt_vicuna(with_system) == (
        vicuna_system + " USER: <image>\nWhat is shown in this image? ASSISTANT:"
    )
    # both LLaVA templates move a turn's images before its text
    assert get_family("llava_next").render_prompt(CHATS["text_after_image_parts"]) == (
        "[INST] <image>\nfirstsecond [/INST]"
    )
