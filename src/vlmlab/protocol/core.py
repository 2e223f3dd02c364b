"""Engine-neutral core types: what every engine takes and what every generation gives back.

A :class:`Chat` is a list of :class:`Message`; each message's content is an ordered list of
:class:`TextPart` and :class:`ImagePart`, so several images can be interleaved with text. The
server, the CLI and the eval runner all build these, and every engine consumes them, so usage
counts, bench numbers and eval logs come from one record (:class:`GenerationResult`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmlab.protocol.errors import BadRequestError

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]


@dataclass(frozen=True)
class ImageData:
    """A decoded image and what is known about its source bytes.

    Attributes:
        image: the decoded RGB ``PIL.Image.Image`` (typed loosely so this module needs no PIL).
        width, height: size of the decoded image after EXIF orientation was applied.
        format: the container format PIL detected ("JPEG", "PNG", ...).
        sha256: hex digest of the source bytes: the content address used by caches.
        nbytes: size of the source bytes.
        source: a short description of where it came from (URL, path, "data URL"), for messages.
        processed: an engine's cached preprocessing of these bytes (a preprocessing-cache hit);
            when set, ``image`` may be ``None``: the pixels were never decoded.
    """

    image: Any
    width: int
    height: int
    format: str
    sha256: str
    nbytes: int
    source: str = ""
    processed: Any = None

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """One image in a message: a reference to load (``ref``), a loaded image (``data``), or both.

    ``ref`` is whatever the user sent (http(s) URL, data URL, file path); ``data`` is filled once
    :func:`vlmlab.media.load_image` has run.
    """

    ref: str | None = None
    data: ImageData | None = None
    type: Literal["image"] = "image"

    def __post_init__(self) -> None:
        if self.ref is None and self.data is None:
            raise BadRequestError("an image part needs a URL / path or loaded image data")


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Tool:
    """A function the model may call: ``parameters`` is its arguments' JSON schema (JSON text)."""

    name: str
    description: str = ""
    parameters: str = '{"type":"object","properties":{}}'


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is a JSON object as text (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One turn. An assistant turn may carry ``tool_calls`` (its content then often empty); a
    ``tool`` turn is a call's result, ``tool_call_id`` naming the call."""

    role: Role
    content: tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant", "tool"):
            raise BadRequestError(
                f"unknown message role {self.role!r}; use 'system', 'user', 'assistant' or 'tool'",
                param="messages",
            )
        if self.tool_calls and self.role != "assistant":
            raise BadRequestError(f"tool_calls belong to assistant messages, not {self.role}", param="messages")
        if self.role != "user" and any(isinstance(p, ImagePart) for p in self.content):
            raise BadRequestError(
                f"images are only accepted in user messages, found one in a {self.role} message",
                param="messages",
            )

    @classmethod
    def of(cls, role: Role, *parts: str | Part) -> Message:
        """Build a message from strings (text) and parts, in order."""
        return cls(role, tuple(TextPart(p) if isinstance(p, str) else p for p in parts))

    @property
    def text(self) -> str:
        """All text parts joined (images dropped)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)]


@dataclass(frozen=True)
class Chat:
    """A conversation; the last message is normally the user's turn to answer."""

    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()  # functions offered to the model (rendered into the prompt)

    def __post_init__(self) -> None:
        if not self.messages:
            raise BadRequestError("a chat needs at least one message", param="messages")

    @classmethod
    def single(cls, question: str, images: list[ImagePart] | None = None) -> Chat:
        """One user turn: images first, then the question (the common VQA layout)."""
        return cls((Message.of("user", *(images or []), question),))

    @property
    def images(self) -> list[ImagePart]:
        """Every image of the chat, in order of appearance."""
        return [img for m in self.messages for img in m.images]

    @property
    def text_characters(self) -> int:
        """Characters of text in all messages (what bounds the prompt's text tokens)."""
        return sum(len(p.text) for m in self.messages for p in m.content if isinstance(p, TextPart))


StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the answer's text, enforced token by token (structured outputs).

    ``kind`` and ``spec``: ``json_schema`` (the schema as JSON text), ``json_object`` (any JSON
    object; ``spec`` empty), ``regex`` (a regular expression the whole answer matches),
    ``choice`` (a JSON list of strings: the answer is one of them), ``grammar`` (an EBNF grammar,
    as vLLM's ``guided_grammar`` with xgrammar). ``strict``: OpenAI's ``json_schema.strict``
    (no properties beyond the schema's). ``param``: the request field it came from, named in
    errors (``response_format``, ``structured_outputs``, ``guided_json``, ...).
    """

    kind: StructuredKind
    spec: str = ""
    strict: bool = False
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy; ``top_k == 0`` disables top-k.

    Logits are processed in this order before temperature, top-k and top-p: ``logit_bias``
    (token id -> added bias), ``repetition_penalty`` (vLLM's: over prompt and output tokens),
    ``frequency_penalty`` and ``presence_penalty`` (OpenAI's: over output tokens), ``min_tokens``
    (no end-of-sequence before that many tokens) and ``structured`` (tokens the constraint does
    not allow are removed). ``logprobs`` / ``top_logprobs`` report that processed distribution.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep generating to max_tokens (benchmarks), as vLLM's field
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    structured: StructuredOutput | None = None
    # With tools offered: "auto" (the model decides; its answer is parsed for calls), "none"
    # (no calls), "required" (at least one call) or a function's name (that call); a forced
    # call is enforced through ``structured``. ``parallel_tool_calls``: more than one call.
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens"
            )
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise BadRequestError(
                f"temperature must be between 0 and 2, got {self.temperature}", param="temperature"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise BadRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise BadRequestError(
                f"top_k must be 0 (disabled) or positive, got {self.top_k}", param="top_k"
            )
        if len(self.stop) > 16:
            raise BadRequestError("at most 16 stop strings are allowed", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # OpenAI's range
                raise BadRequestError(f"{name} must be between -2 and 2, got {value}", param=name)
        if not 0.0 < self.repetition_penalty <= 10.0 or math.isnan(self.repetition_penalty):
            raise BadRequestError(
                f"repetition_penalty must be in (0, 10] (1 = off), got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        for token, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:  # OpenAI's range
                raise BadRequestError(
                    f"logit_bias for token {token} must be between -100 and 100, got {bias}",
                    param="logit_bias",
                )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise BadRequestError(
                f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}",
                param="min_tokens",
            )
        if not 0 <= self.top_logprobs <= 20:  # OpenAI's range
            raise BadRequestError(
                f"top_logprobs must be between 0 and 20, got {self.top_logprobs}", param="top_logprobs"
            )
        if self.top_logprobs and not self.logprobs:
            raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the model's logits before sampling (beyond temperature,
        top-k and top-p)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
            or self.logit_bias or self.min_tokens or self.structured is not None
        )  # fmt: skip

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: greedy, or sampled with a fixed seed."""
        return self.greedy or self.seed is not None


@dataclass
class Timings:
    """Where the time of one request went, in seconds (``None`` when not measured)."""

    queue_s: float | None = None
    preprocess_s: float | None = None
    ttft_s: float | None = None  # request start -> first token (includes preprocess and prefill)
    prefill_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    load_s: float | None = None
    peak_memory_bytes: int | None = None
    preprocess_cache_hits: int = 0
    response_cache_hit: bool = False
    stages: dict[str, float] = field(default_factory=dict)  # fetch / decode / processor ...

    def decode_tokens_per_s(self, completion_tokens: int) -> float | None:
        """Decode speed over the tokens after the first (the first belongs to prefill)."""
        if not self.decode_s or completion_tokens < 2:
            return None
        return (completion_tokens - 1) / self.decode_s


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely alternatives at its step
    (``top``: ``(token, logprob, bytes)``, most likely first). ``token`` is the token's text;
    ``bytes`` its UTF-8 bytes (a token that is part of a character carries that byte alone)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of streamed output. The last chunk of a stream has ``finish_reason`` set.

    ``token_count``: tokens generated since the previous chunk (a token that adds no text yet
    is counted with the next chunk); engines that only see text, such as a remote server's SSE
    pieces, count one per piece.
    """

    text: str
    token_count: int = 0
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # the chunk's tokens, when asked for


@dataclass
class GenerationResult:
    """Everything one generation produced: the single source for usage, bench and eval logs.

    ``prompt_tokens`` includes ``image_tokens`` (every token the images expanded to).
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    timings: Timings = field(default_factory=Timings)
    model: str = ""
    engine: str = ""
    logprobs: tuple[TokenLogprob, ...] | None = None  # every generated token's, when asked for
    tool_calls: tuple[ToolCall, ...] | None = None  # the answer's calls (finish_reason "tool_calls")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
