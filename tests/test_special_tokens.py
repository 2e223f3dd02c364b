"""User content is encoded as text for every family the hf engine serves (issue 16).

Special-token strings in a message (``[IMG]``, ``<|im_start|>``, ``</s>``, ``<image>``, ...) become
ordinary tokens, as mistral_common and vLLM encode them; the control tokens the chat template
writes, and the placeholders it writes for real images, stay controls. Real parts only: the nano
checkpoint, the tiny random checkpoints of ``tests/test_engine_archs.py`` (and an Idefics2 one
built the same way), reference tokenizers loaded from those checkpoints, and a real server.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from serverutil import data_url, image_message, png_bytes, running_server  # noqa: E402
from test_engine_archs import (  # noqa: E402
    CASES,
    IDEFICS3_TEMPLATE,
    INIT_STD,
    build_tokenizer,
    make_image,
    save,
    text_dims,
    vit_dims,
)
from vlmlab.config import ServerSettings  # noqa: E402
from vlmlab.engines import EngineSpec, GenerationRequest, complete, load_engine  # noqa: E402
from vlmlab.engines.hf.prompt import MARK_END, MARK_START  # noqa: E402
from vlmlab.families import get_family  # noqa: E402
from vlmlab.protocol.core import Chat, Message, SamplingParams, TextPart  # noqa: E402


def build_idefics2(out: Path) -> None:
    """Idefics2 (the family whose images always go through the processor): idefics2-8b's
    image processor (size 378..980, splitting) and image_seq_len 64, its chat template (the
    Idefics3 one without ``<|begin_of_text|>``), and a tiny vision tower, perceiver and Mistral."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, MistralConfig
    from transformers import Idefics2ImageProcessor, Idefics2Processor
    from transformers.models.idefics2.configuration_idefics2 import (
        Idefics2PerceiverConfig,
        Idefics2VisionConfig,
    )

    tokenizer = build_tokenizer(
        ["<s>", "</s>", "<pad>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        bos_token="<s>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
    )
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=True, size={"shortest_edge": 378, "longest_edge": 980}
    )
    template = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "")
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64,
        chat_template=template,
    )  # fmt: skip
    perceiver = Idefics2PerceiverConfig(
        hidden_size=32, resampler_n_latents=64, resampler_depth=1, resampler_n_heads=2,
        resampler_head_dim=16, num_key_value_heads=1, initializer_range=INIT_STD,
    )  # fmt: skip
    config = Idefics2Config(
        vision_config=Idefics2VisionConfig(**vit_dims(image_size=980, patch_size=14)),
        perceiver_config=perceiver,
        text_config=MistralConfig(**text_dims(tokenizer, sliding_window=None)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    save(Idefics2ForConditionalGeneration, config, processor, out)


BUILDERS: dict[str, Callable[[Path], None]] = {c.name: c.build for c in CASES}
BUILDERS["idefics2"] = build_idefics2


@dataclass
class Served:
    """One family's checkpoint: the engine as configured by default, the engine with the
    model's own processor for every request (no cache: no splicing), a reference tokenizer."""

    name: str
    engine: Any
    processor_engine: Any
    tokenizer: Any

    def as_text(self, text: str) -> list[int]:
        """``text`` as plain text, by the reference tokenizer."""
        return plain_text_ids(self.tokenizer, text)


def plain_text_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module", params=["nano", *BUILDERS])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    from transformers import AutoTokenizer

    from vlmlab.nano import checkpoint_path

    name = request.param
    path = checkpoint_path() if name == "nano" else tmp_path_factory.mktemp(name)
    if name != "nano":
        BUILDERS[name](path)
    model = "nano" if name == "nano" else str(path)
    engine = load_engine(EngineSpec(model=model, device="cpu", dtype="fp32"))
    by_processor = load_engine(
        EngineSpec(
            model=model, device="cpu", dtype="fp32", preprocess_cache_bytes=0,
            extra={"preprocess": "hf"},
        )  # fmt: skip
    )
    try:
        yield Served(name, engine, by_processor, AutoTokenizer.from_pretrained(path))
    finally:
        engine.close()
        by_processor.close()


def special_strings(served: Served) -> list[str]:
    """The checkpoint's own special tokens and the strings its template writes for an image."""
    tok = served.tokenizer
    strings = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    strings |= set(tok.all_special_tokens)
    family = get_family(served.engine.info().family)
    return sorted(strings | {family.image_placeholder, served.engine.preprocessor.placeholder})


def control_ids(served: Served) -> set[int]:
    """Ids of the special tokens. ``<unk>`` is left out: the word-level test tokenizers spell
    an unknown word of plain text with it."""
    tok = served.tokenizer
    single = [t for t in special_strings(served) if len(tok.tokenize(t)) == 1]
    return {tok.convert_tokens_to_ids(t) for t in single} - {tok.unk_token_id}


def conversation(words: str, lead: str) -> Chat:
    """System, user (one image), assistant and user turns, each with ``words`` in its text."""
    return Chat(
        (
            Message.of("system", f"Be brief. {words}"),
            Message.of("user", make_image(56, 56), f"Look: {words} what colour?"),
            Message.of("assistant", f"It is {words} red."),
            Message.of("user", f"{lead} what colour is the shape?"),
        )
    )


def fed_ids(engine: Any, chat: Chat) -> list[int]:
    """The ids generate feeds the model for ``chat`` (the same render and preprocessing)."""
    inputs = engine.preprocessor(engine.render(chat), [p.data for p in chat.images], {}).inputs
    return inputs["input_ids"][0].tolist()


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_special_strings_in_any_message_are_plain_text(served: Served) -> None:
    """Every special string of the family in system, user and assistant text: the request
    succeeds, the prompt holds exactly the control tokens of the same chat with plain words,
    each text is its plain-text tokens, and the count equals the ids fed to the model."""
    strings = special_strings(served)
    placeholder = served.engine.preprocessor.placeholder
    chat = conversation(" ".join(strings), placeholder)
    plain = conversation("plain words", "so")
    controls = control_ids(served)
    for engine in (served.engine, served.processor_engine):
        request = GenerationRequest(chat, SamplingParams(max_tokens=2, temperature=0))
        result = asyncio.run(complete(engine, request))
        ids, plain_ids = fed_ids(engine, chat), fed_ids(engine, plain)
        assert Counter(i for i in ids if i in controls) == Counter(
            i for i in plain_ids if i in controls
        ), served.name
        count = engine.count_prompt_tokens(chat)
        assert count.prompt_tokens == len(ids) == result.prompt_tokens, served.name
        assert count.image_tokens == result.image_tokens
        assert count.image_tokens == engine.count_prompt_tokens(plain).image_tokens
        assert engine.expansion_mismatches == 0
        for text in [p.text for m in chat.messages for p in m.content if isinstance(p, TextPart)]:
            assert contains(ids, served.as_text(text)), (served.name, text)
    for string in strings:
        assert len(served.as_text(string)) > 1, string
    # The spliced path and the processor's own give the same ids.
    assert fed_ids(served.engine, chat) == fed_ids(served.processor_engine, chat)


def test_text_without_special_strings_is_tokenized_as_before(served: Served) -> None:
    """No marks in the prompt, and its ids are the tokenizer's on the whole rendered string."""
    prompt = served.engine.render(conversation("plain words", "so"))
    assert MARK_START not in prompt and MARK_END not in prompt
    whole = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert served.engine.prompts.encode(prompt) == whole


def test_markers_sent_by_the_user_cannot_forge_or_hide_a_control() -> None:
    """The private-use markers are dropped from user text before marking: a forged marked
    token reads as the text it wraps, a lone marker changes nothing."""
    engine = load_engine(EngineSpec(model="nano", device="cpu"))
    try:
        image = make_image(56, 56)

        def ids(text: str) -> list[int]:
            return fed_ids(engine, Chat.single(text, [image]))

        assert ids(f"{MARK_START}[IMG]{MARK_END} what colour?") == ids("[IMG] what colour?")
        assert ids(f"{MARK_START}[INST] what colour?") == ids("[INST] what colour?")
        assert ids(f"what {MARK_END}colour?") == ids("what colour?")
    finally:
        engine.close()


def test_whitespace_a_control_token_takes_is_taken_from_a_run_of_text_too() -> None:
    """Added tokens with rstrip / lstrip (Phi-3's turn tokens) take the whitespace beside them;
    a run of user text tokenized on its own loses it just as it would in the whole prompt."""
    from tokenizers import AddedToken

    from vlmlab.engines.hf.prompt import PromptEncoder

    tokenizer = build_tokenizer(["<s>"])
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken("<|user|>", rstrip=True, special=True),
        AddedToken("<|end|>", lstrip=True, special=True),
    ]})  # fmt: skip
    prompts = PromptEncoder(tokenizer)

    def tokens(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids)

    plain = "<|user|>   What is a image <|end|>"
    whole = tokens(tokenizer(plain, add_special_tokens=False)["input_ids"])
    assert tokens(prompts.encode(plain)) == whole and whole[:2] == ["<|user|>", "What"]
    marked = f"<|user|>   What is {prompts.mark('<s>')} image <|end|>"
    assert tokens(prompts.encode(marked)) == [
        "<|user|>", "What", " ", "is", " ", "<", "s", ">", " ", "image", "<|end|>",
    ]  # fmt: skip


def test_the_server_answers_and_counts_a_placeholder_in_the_question() -> None:
    """The issue's request: "[IMG] what colour is the shape?" with one image to nano. 200, and
    /tokenize agrees with the completion's usage, "[IMG]" counted as the text it is."""
    from transformers import AutoTokenizer

    from vlmlab.nano import checkpoint_path

    question, plain = "[IMG] what colour is the shape?", "what colour is the shape?"
    image = data_url(png_bytes(96, 64))
    nano = EngineSpec(model="nano", device="cpu")
    settings = ServerSettings(engines=(nano,), default_max_tokens=8)
    with running_server(settings) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        response = client.chat.completions.create(
            model="nano", messages=image_message(question, image), temperature=0, max_tokens=8
        )
        counted, counted_plain = (
            httpx.post(
                f"{server.url}/tokenize", json={"messages": image_message(text, image)}, timeout=60
            )
            for text in (question, plain)
        )
    assert counted.status_code == counted_plain.status_code == 200
    assert response.choices[0].message.content is not None
    count = counted.json()
    assert count["prompt_tokens"] == response.usage.prompt_tokens
    assert count["image_tokens"] == get_family("nano").image_tokens(96, 64)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path())
    extra = len(plain_text_ids(tokenizer, question)) - len(plain_text_ids(tokenizer, plain))
    assert extra > 1 and count["prompt_tokens"] == counted_plain.json()["prompt_tokens"] + extra
