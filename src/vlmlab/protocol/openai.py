"""OpenAI chat-completions wire models (pydantic v2) and their mapping to the core types.

Request models accept unknown fields (``extra="allow"``) and log them as ignored, as vLLM's
``OpenAIBaseModel`` does, so clients that send newer or vendor fields keep working.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_serializer, model_validator

from vlmlab.protocol.core import (
    Chat,
    GenerationResult,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
    Timings,
    TokenLogprob,
    Tool,
    ToolCall,
)
from vlmlab.protocol.errors import BadRequestError
from vlmlab.protocol.openai_sampling import (
    ResponseFormat,
    StructuredOutputsOptions,
    logit_bias_items,
    refuse_unhonoured,
    structured_output,
)
from vlmlab.protocol.tools import check_choice, forced_call

logger = logging.getLogger(__name__)


class OpenAIModel(BaseModel):
    """Base of request-side models: unknown fields are kept and logged as ignored."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extras(self) -> OpenAIModel:
        if self.model_extra:
            logger.info(
                "%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra)
            )
        return self


# -- request -------------------------------------------------------------------------------------


class TextContent(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLContent(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL
    uuid: str | None = None


ContentPart = Annotated[TextContent | ImageURLContent, Field(discriminator="type")]


class FunctionCallOut(OpenAIModel):
    name: str
    arguments: str = "{}"


class ToolCallOut(OpenAIModel):
    """A call in an assistant message (sent back by clients, and in answers)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None


class FunctionSpec(OpenAIModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolSpec(OpenAIModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionCallOut | dict[str, str]


class StreamOptions(OpenAIModel):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


# Integer fields end up in C integers (torch generators, vLLM's SamplingParams): a seed must fit
# a signed 64-bit integer (vLLM's own bound, torch.iinfo(torch.long)), token counts a signed
# 32-bit one. Out of range is a 400 naming the field, not an overflow inside the engine.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_N = 16  # choices per request (each is a generation: more is a batch job, not a request)


def check_text(text: str, where: str, param: str = "messages") -> None:
    """Raises BadRequestError when ``text`` is not valid Unicode (a lone surrogate, which JSON's
    ``\\udXXX`` escapes can carry): tokenizers and UTF-8 encoders fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequestError(
            f"{where} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start}; send UTF-8 text",
            param=param,
        ) from None


class ChatCompletionRequest(OpenAIModel):
    """``POST /v1/chat/completions`` body (OpenAI fields plus vLLM's common extras)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    # Independent answers (choices), up to MAX_N.
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    ignore_eos: StrictBool | None = False
    user: str | None = None
    # Structured outputs: OpenAI's field, vLLM's current one and vLLM's older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsOptions | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logprobs: StrictBool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    def to_chat(self) -> Chat:
        """The core chat: ``developer`` becomes ``system``; image URLs stay unloaded refs."""
        messages = []
        for index, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            calls = tuple(
                ToolCall(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or ()
            )
            if role == "tool" and not message.tool_call_id:
                raise BadRequestError(f"messages[{index}]: a tool message needs tool_call_id", param="messages")
            if message.content is None or isinstance(message.content, str):
                check_text(message.content or "", f"messages[{index}].content")
                parts: tuple[TextPart | ImagePart, ...] = (TextPart(message.content or ""),)
            else:
                for number, part in enumerate(message.content):
                    where = f"messages[{index}].content[{number}]"
                    if isinstance(part, TextContent):
                        check_text(part.text, f"{where}.text")
                    else:
                        check_text(part.image_url.url, f"{where}.image_url.url")
                parts = tuple(
                    TextPart(p.text) if isinstance(p, TextContent) else ImagePart(ref=p.image_url.url)
                    for p in message.content
                )
            try:
                messages.append(Message(role, parts, calls, message.tool_call_id if role == "tool" else None))  # type: ignore[arg-type]
            except BadRequestError as exc:
                raise BadRequestError(f"messages[{index}]: {exc.message}", param="messages") from exc
        return Chat(tuple(messages), self.offered_tools())

    def offered_tools(self) -> tuple[Tool, ...]:
        """``tools`` as core records (a function without parameters takes an empty object)."""
        empty = {"type": "object", "properties": {}}
        return tuple(
            Tool(t.function.name, t.function.description or "", json.dumps(t.function.parameters or empty, sort_keys=True))
            for t in self.tools or ()
        )

    def tool_choice_name(self) -> str:
        """``tool_choice`` as one string: auto (the default with tools), none, required or a name."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        if isinstance(choice, str):
            return choice
        function = choice.function
        name = function.name if isinstance(function, FunctionCallOut) else function.get("name", "")
        return name

    def to_sampling(self, *, default_max_tokens: int = 256) -> SamplingParams:
        """Sampling parameters; ``max_completion_tokens`` wins over the legacy ``max_tokens``."""
        refuse_unhonoured(self.model_extra or {})
        guided = {
            "guided_json": self.guided_json, "guided_regex": self.guided_regex,
            "guided_choice": self.guided_choice, "guided_grammar": self.guided_grammar,
        }  # fmt: skip
        structured = structured_output(self.response_format, self.structured_outputs, guided)
        tools = self.offered_tools()
        choice = self.tool_choice_name()
        check_choice(tools, choice)
        forced = forced_call(tools, choice, self.parallel_tool_calls is not False)
        if forced is not None and structured is not None:
            raise BadRequestError(f"a forced tool call ({choice}) and {structured.param} cannot both constrain the answer", param="tool_choice")
        structured = structured or forced
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for number, text in enumerate(stop):
            check_text(text, f"stop[{number}]", param="stop")
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            stop=stop,
            seed=self.seed,
            ignore_eos=bool(self.ignore_eos),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=logit_bias_items(self.logit_bias),
            min_tokens=self.min_tokens or 0,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
            structured=structured,
            tool_choice=choice if tools else "none",
            parallel_tool_calls=self.parallel_tool_calls is not False,
        )


# -- response ------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    image_tokens: int = 0
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def from_result(cls, result: GenerationResult) -> Usage:
        return cls.from_results([result])

    @classmethod
    def from_results(cls, results: list[GenerationResult]) -> Usage:
        """One prompt (as OpenAI counts ``n`` choices: the prompt once, every choice's tokens)."""
        prompt, image = results[0].prompt_tokens, results[0].image_tokens
        completion = sum(r.completion_tokens for r in results)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(image_tokens=image),
        )


class TimingsOut(BaseModel):
    """vlmlab's per-response timings (milliseconds), where vLLM has none by default."""

    queue_ms: float | None = None
    preprocess_ms: float | None = None
    ttft_ms: float | None = None
    prefill_ms: float | None = None  # engine start -> first token
    decode_ms: float | None = None  # first -> last token
    decode_tokens_per_s: float | None = None
    total_ms: float | None = None
    preprocess_cache_hits: int = 0
    response_cache_hit: bool = False
    stages_ms: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_timings(cls, timings: Timings, completion_tokens: int) -> TimingsOut:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000.0, 3)

        return cls(
            queue_ms=ms(timings.queue_s),
            preprocess_ms=ms(timings.preprocess_s),
            ttft_ms=ms(timings.ttft_s),
            prefill_ms=ms(timings.prefill_s),
            decode_ms=ms(timings.decode_s),
            decode_tokens_per_s=timings.decode_tokens_per_s(completion_tokens),
            total_ms=ms(timings.total_s),
            preprocess_cache_hits=timings.preprocess_cache_hits,
            response_cache_hit=timings.response_cache_hit,
            stages_ms={k: round(v * 1000.0, 3) for k, v in timings.stages.items()},
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_calls(self, handler: Any) -> dict[str, Any]:
        """``tool_calls`` only when there are calls, as OpenAI answers (``content`` stays, null then)."""
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


def tool_calls_out(calls: tuple[ToolCall, ...] | None) -> list[ToolCallOut] | None:
    if not calls:
        return None
    return [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """OpenAI's ``choices[].logprobs``: one entry per generated token."""

    content: list[TokenLogprobOut] | None = None

    @classmethod
    def from_core(cls, items: tuple[TokenLogprob, ...] | None) -> ChoiceLogprobs | None:
        if items is None:
            return None
        return cls(content=[
            TokenLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.bytes),
                            top_logprobs=[TopLogprob(token=a, logprob=b, bytes=list(c)) for a, b, c in t.top])
            for t in items
        ])  # fmt: skip


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=new_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    timings: TimingsOut | None = None

    @classmethod
    def from_result(cls, result: GenerationResult, *, model: str) -> ChatCompletionResponse:
        return cls.from_results([result], model=model)

    @classmethod
    def from_results(cls, results: list[GenerationResult], *, model: str) -> ChatCompletionResponse:
        """One choice per result, in order; ``timings`` are the first choice's."""
        return cls(
            model=model,
            choices=[
                Choice(
                    index=index,
                    message=AssistantMessage(content=result.text or (None if result.tool_calls else ""), tool_calls=tool_calls_out(result.tool_calls)),
                    finish_reason=result.finish_reason,
                    logprobs=ChoiceLogprobs.from_core(result.logprobs),
                )
                for index, result in enumerate(results)
            ],
            usage=Usage.from_results(results),
            timings=TimingsOut.from_timings(results[0].timings, results[0].completion_tokens),
        )


class ToolCallDelta(BaseModel):
    """A streamed call: sent whole, in one delta (index, id, name and all the arguments)."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: TimingsOut | None = None


# -- models list ---------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vlmlab"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    input_modalities: list[str] = Field(default_factory=lambda: ["text", "image"])
    max_images: int | None = None
    engine: str | None = None
    family: str | None = None
    # The request features this model's engine honours (structured_outputs, logprobs,
    # penalties, logit_bias, min_tokens); a request using another is answered 400.
    supported_features: list[str] = Field(default_factory=list)
    # The family's image-processor options a request may set in mm_processor_kwargs (Qwen's
    # max_pixels, Phi's num_crops, ...): name, default (the served model's), kind, help, choices.
    processor_options: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- errors --------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's nested error object."""

    error: ErrorDetail
