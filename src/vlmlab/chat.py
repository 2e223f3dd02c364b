"""One question about one or more images: the library side of ``vlmlab chat``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmlab.config import EngineSpec, read_json_schema
from vlmlab.engines import Engine, GenerationRequest, load_engine
from vlmlab.media import MediaPolicy, load_image
from vlmlab.protocol.core import (
    Chat,
    GenerationChunk,
    GenerationResult,
    ImagePart,
    SamplingParams,
    StructuredOutput,
)
from vlmlab.protocol.errors import ConfigError


@dataclass
class ChatOutcome:
    result: GenerationResult
    load_s: float
    wall_s: float


def load_images(refs: Sequence[str], policy: MediaPolicy | None = None) -> list[ImagePart]:
    """Load each ``--image`` (path, URL or data URL). The CLI user's own files are allowed."""
    policy = policy or MediaPolicy(allowed_local_root=Path("/"))
    return [ImagePart(ref=ref, data=load_image(ref, policy=policy)) for ref in refs]


async def ask(
    engine: Engine,
    question: str,
    images: Sequence[ImagePart],
    sampling: SamplingParams,
    on_text: Callable[[str], None] | None = None,
    system: str | None = None,
) -> GenerationResult:
    """Stream one answer; ``on_text`` receives each piece of text as it is produced."""
    chat = Chat.single(question, list(images))
    if system:
        from vlmlab.protocol.core import Message

        chat = Chat((Message.of("system", system), *chat.messages))
    result: GenerationResult | None = None
    async for item in engine.generate(GenerationRequest(chat, sampling)):
        if isinstance(item, GenerationChunk):
            if on_text and item.text:
                on_text(item.text)
        else:
            result = item
    assert result is not None
    return result


def run_chat(
    spec: EngineSpec,
    question: str,
    image_refs: Sequence[str],
    sampling: SamplingParams,
    on_text: Callable[[str], None] | None = None,
    system: str | None = None,
) -> ChatOutcome:
    """Load the engine, load the images, answer, close. Blocking."""
    images = load_images(image_refs)
    start = time.perf_counter()
    engine = load_engine(spec)
    load_s = time.perf_counter() - start
    try:
        asked = time.perf_counter()
        result = asyncio.run(ask(engine, question, images, sampling, on_text, system))
        return ChatOutcome(result, load_s, time.perf_counter() - asked)
    finally:
        engine.close()


def structured_output(
    json_schema: str | Path | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: str | None = None,
) -> StructuredOutput | None:
    """The constraint ``vlmlab chat`` asks for: ``--json-schema FILE``, ``--json``, ``--regex`` or
    ``--choice a,b,c`` (at most one), or None.

    JSON constraints travel as OpenAI's ``response_format`` (``param``): the one field OpenAI,
    Mistral, vLLM and vlmlab servers all take, so ``--engine remote`` forwards them anywhere.
    The schema is strict (no properties beyond it), as OpenAI's ``strict: true``.

    Raises:
        ConfigError: more than one given, an unreadable / invalid schema file, an empty choice.
    """
    given = [flag for flag, value in (("--json-schema", json_schema), ("--json", json_object), ("--regex", regex), ("--choice", choice)) if value]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} both constrain the answer: give only one of --json-schema, --json, --regex, --choice")
    if json_schema:
        schema = read_json_schema(json_schema, "--json-schema")
        return StructuredOutput("json_schema", json.dumps(schema), strict=True, param="response_format")
    if json_object:
        return StructuredOutput("json_object", param="response_format")
    if regex:
        return StructuredOutput("regex", regex, param="--regex")
    if choice:
        options = [c.strip() for c in choice.split(",") if c.strip()]
        if not options:
            raise ConfigError(f"--choice {choice!r} has no choices; give them comma-separated, e.g. --choice red,green,blue")
        return StructuredOutput("choice", json.dumps(options), param="--choice")
    return None


def speed_line(result: GenerationResult, wall_s: float, requests: int = 1) -> str:
    """vLLM's progress-bar summary: ``1/1 [00:00<00:00, 3.5it/s, input 980 tok/s, output 85 tok/s]``."""
    wall = max(wall_s, 1e-9)
    minutes, seconds = divmod(int(wall), 60)
    return (
        f"{requests}/{requests} [{minutes:02d}:{seconds:02d}<00:00, {requests / wall:.2f}it/s, "
        f"input {result.prompt_tokens / wall:.0f} tok/s, output {result.completion_tokens / wall:.0f} tok/s]"
    )


def detail_line(outcome: ChatOutcome) -> str:
    """Image tokens, prompt size, load time, TTFT, decode speed and peak memory."""
    result, timings = outcome.result, outcome.result.timings
    parts = [
        f"image tokens {result.image_tokens}",
        f"prompt {result.prompt_tokens} tok",
        f"completion {result.completion_tokens} tok ({result.finish_reason})",
        f"load {outcome.load_s:.2f} s",
    ]
    if timings.ttft_s is not None:
        parts.append(f"TTFT {timings.ttft_s * 1000:.0f} ms")
    speed = timings.decode_tokens_per_s(result.completion_tokens)
    if speed:
        parts.append(f"decode {speed:.0f} tok/s")
    if timings.peak_memory_bytes:
        parts.append(f"peak mem {timings.peak_memory_bytes / 2**20:.0f} MiB")
    return " · ".join(parts)


NANO_EXAMPLES = (
    "What colour is the shape?", "What shape is this?", "Is the shape on the left or the right?",
    "How many circles are there?", "What word is written?", "What is the value of B?",
    "Which bar is highest?", "Read the Total field.", "Which image has more stars?",
)  # fmt: skip


def nano_hint(model: str, question: str, images: int) -> str | None:
    """For nano only: a note when the question is not one nano was trained on (it answers those
    and little else: "Describe this image." gets a letter), or when no image is given."""
    from vlmlab.nano import is_nano

    if not is_nano(model.strip()):
        return None
    from vlmlab.nano.tasks import known_questions

    if images and question.strip().lower() in known_questions():
        return None
    why = "needs an image" if not images else "only answers the questions it was trained on"
    examples = "; ".join(f"'{q}'" for q in NANO_EXAMPLES[:5])
    return (
        f"note: nano {why} (colour, shape, position, counting, a word or number, bar charts, "
        f"document fields, two-image comparisons), e.g. {examples}. See README 'The nano model'."
    )
