"""Properties every registered family must have, and the test-side table of example checkpoints."""

from __future__ import annotations

import random

import pytest

from vlmlab.families import FAMILIES, ImageSizeError, get_family
from vlmlab.protocol.core import Chat, ImagePart, Message
from vlmlab.protocol.errors import BadRequestError, NotFoundError, UnknownOptionError

# family -> (a well-known checkpoint, its KV bytes per token in bf16 from the spec's KV table)
EXAMPLE_CHECKPOINTS: dict[str, tuple[str, int]] = {
    "pixtral": ("mistralai/Pixtral-12B-2409", 163_840),
    "phi3_5_vision": ("microsoft/Phi-3.5-vision-instruct", 393_216),
    "phi3_vision": ("microsoft/Phi-3-vision-128k-instruct", 393_216),
    "qwen2_vl": ("Qwen/Qwen2-VL-7B-Instruct", 57_344),
    "qwen2_5_vl": ("Qwen/Qwen2.5-VL-7B-Instruct", 57_344),
    "llava_next": ("llava-hf/llava-v1.6-mistral-7b-hf", 131_072),
    "llava_onevision": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", 57_344),
    "internvl2": ("OpenGVLab/InternVL2-8B", 131_072),
    "idefics2": ("HuggingFaceM4/idefics2-8b", 131_072),
    "idefics3": ("HuggingFaceM4/Idefics3-8B-Llama3", 131_072),
    "nano": ("vlmlab/nano", 2 * 3 * 2 * 48 * 2),
}
MODEL_TYPES = {
    "pixtral": "pixtral",
    "phi3_5_vision": "phi3_v",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "internvl2": "internvl_chat",
    "idefics2": "idefics2",
    "idefics3": "idefics3",
}


def test_every_registered_family_has_an_example_checkpoint() -> None:
    assert set(FAMILIES.names()) == set(EXAMPLE_CHECKPOINTS)
    assert FAMILIES.names()[:3] == ["pixtral", "phi3_5_vision", "phi3_vision"]


@pytest.mark.parametrize("name", list(EXAMPLE_CHECKPOINTS))
def test_hub_id_model_type_and_kv_geometry(name: str) -> None:
    hub_id, kv_bytes = EXAMPLE_CHECKPOINTS[name]
    family = get_family(hub_id)
    assert family.name == name
    if name in MODEL_TYPES:
        assert get_family(MODEL_TYPES[name]).name == name
    ckpt = family.checkpoint(hub_id)
    assert ckpt.kv.bytes_per_token("bf16") == kv_bytes
    assert ckpt.kv.bytes_per_token("fp32") == 2 * kv_bytes
    assert ckpt.params > 0 and ckpt.max_model_len >= 1024 and ckpt.source and ckpt.kv.source
    assert ckpt.weight_bytes("int4") * 4 == pytest.approx(ckpt.weight_bytes("bf16"), abs=4)


@pytest.mark.parametrize("name", list(EXAMPLE_CHECKPOINTS))
def test_rule_invariants_on_random_sizes(name: str) -> None:
    family = get_family(name)
    rng = random.Random(name)
    for _ in range(60):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        try:
            layout = family.image_layout(w, h)
        except ImageSizeError:
            continue
        assert layout.tokens >= layout.vision_embedding_positions >= 1
        assert layout.resized[0] >= 1 and layout.resized[1] >= 1
        assert layout.grid[0] >= 1 and layout.grid[1] >= 1
        assert family.image_tokens(w, h) == layout.tokens
        assert family.prompt_image_tokens([(w, h)]) == [layout.tokens]


@pytest.mark.parametrize("name", list(EXAMPLE_CHECKPOINTS))
def test_bad_sizes_and_options_are_named(name: str) -> None:
    family = get_family(name)
    for w, h in [(0, 10), (10, -1), (1.5, 3)]:
        with pytest.raises(BadRequestError, match="must be a positive integer"):
            family.image_tokens(w, h)  # type: ignore[arg-type]
    with pytest.raises(UnknownOptionError, match=f"unknown option 'bogus' for model family '{name}'"):
        family.image_tokens(100, 100, bogus=1)
    for option in family.options:  # defaults are valid values of their own type
        assert option.coerce(option.default) == option.default


@pytest.mark.parametrize("name", list(EXAMPLE_CHECKPOINTS))
def test_prompt_has_one_placeholder_per_image_in_order(name: str) -> None:
    family = get_family(name)
    chat = Chat(
        (
            Message.of("user", ImagePart(ref="a"), "first question"),
            Message.of("assistant", "first answer"),
            Message.of("user", "second question", ImagePart(ref="b")),
        )
    )
    prompt = family.render_prompt(chat)
    assert "first question" in prompt and "first answer" in prompt and "second question" in prompt
    assert prompt.index("first question") < prompt.index("first answer") < prompt.index("second question")
    if name.startswith("phi3"):
        assert "<|image_1|>" in prompt and "<|image_2|>" in prompt
    else:
        assert prompt.count(family.image_placeholder) == 2


def test_unknown_family_lists_all_names() -> None:
    with pytest.raises(NotFoundError) as info:
        get_family("gemma3")
    for name in FAMILIES.names():
        assert name in str(info.value)
