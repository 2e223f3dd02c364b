"""Wire helpers of the remote engine: settings, request bodies, images, SSE, usage and errors.

Pure functions over the OpenAI chat-completions protocol as the servers vlmlab talks to speak it
(vLLM, SGLang, Ollama, LM Studio, mlx-vlm, Mistral's and OpenAI's APIs, vlmlab itself), kept apart
from :mod:`vlmlab.engines.remote.engine` so the engine holds only connection and retry logic.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from vlmlab.config import EngineSpec
from vlmlab.families import Family
from vlmlab.media_net import short_ref
from vlmlab.protocol.core import (
    Chat,
    ImagePart,
    SamplingParams,
    StructuredOutput,
    TextPart,
    TokenLogprob,
    ToolCall,
)
from vlmlab.protocol.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ContextLengthError,
    EngineError,
    ForbiddenMediaError,
    ImageDecodeError,
    ImageTooLargeError,
    MediaError,
    MediaFetchError,
    MediaTimeoutError,
    NotFoundError,
    OverloadedError,
    VlmlabError,
)

logger = logging.getLogger(__name__)

SendImagesAs = Literal["url", "data_url"]

# "One token generally corresponds to ~4 characters of text for common English text"
# (OpenAI help center, "What are tokens and how to count them?"): the estimate for text tokens
# when the remote cannot count them for us.
BYTES_PER_TOKEN_ESTIMATE = 4
# OpenAI cookbook "How to count tokens with tiktoken" (num_tokens_from_messages): 3 tokens of
# framing per message and 3 that prime the reply, for chat models without a known template.
TOKENS_PER_MESSAGE, TOKENS_PER_REPLY = 3, 3


@dataclass(frozen=True)
class RemoteSettings:
    """The remote engine's settings, read from ``EngineSpec.extra`` (and ``spec.max_model_len``).

    Attributes:
        base_url: the OpenAI-compatible root, e.g. ``http://gpu-box:8000/v1`` (``/v1`` is added
            to a bare ``http://host:port``).
        api_key: sent as ``Authorization: Bearer``; default ``MISTRAL_API_KEY`` for
            ``*.mistral.ai`` and ``OPENAI_API_KEY`` for ``api.openai.com``, none otherwise (a key
            is never sent to a host it was not issued for).
        max_concurrency: requests in flight to the remote at once (and the connection pool size).
        max_retries: extra attempts after a 429, a 5xx, a timeout or a refused connection, made
            only while no text has reached the caller.
        timeout_s: longest wait for the first byte and between bytes (read timeout).
        send_images_as: ``data_url`` (default) inlines every image, for servers that cannot fetch
            URLs; ``url`` forwards http(s) URLs for the remote to fetch itself.
        max_model_len, max_images: override what ``/v1/models`` and the family say.
        backoff_s, max_backoff_s: exponential backoff between attempts (``backoff_s * 2**n``).
        max_retry_wait_s: a ``Retry-After`` longer than this is not waited for: the 429 goes back
            to the caller with that ``Retry-After``.
        circuit_failures, circuit_cooldown_s: after this many consecutive failed requests the
            engine reports itself unhealthy and fails fast for the cooldown.
        stream: stream from the remote (default); ``False`` for servers whose streaming is broken.
    """

    base_url: str
    api_key: str | None = None
    max_concurrency: int = 16
    max_retries: int = 3
    timeout_s: float = 300.0
    send_images_as: SendImagesAs = "data_url"
    max_model_len: int | None = None
    max_images: int | None = None
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_wait_s: float = 30.0
    circuit_failures: int = 5
    circuit_cooldown_s: float = 30.0
    stream: bool = True

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> RemoteSettings:
        """Settings from ``spec.extra``; unknown keys are logged (the extra may be shared by every
        engine of a fallback chain), bad values raise.

        Raises:
            ConfigError: no ``base_url``, or a value of the wrong type or range.
        """
        extra = dict(spec.extra)
        fields = cls.__dataclass_fields__
        unknown = sorted(set(extra) - set(fields))
        if unknown:
            logger.warning("remote engine: ignoring unknown extra setting(s) %s; valid: %s", unknown, sorted(fields))
        if not extra.get("base_url"):
            raise ConfigError(
                "the remote engine needs the server's URL: pass --base-url http://HOST:PORT/v1 "
                "(or extra: {base_url: ...} in a config file)"
            )
        values: dict[str, Any] = {"base_url": normalize_base_url(str(extra["base_url"]))}
        casts: dict[str, Any] = {
            "max_concurrency": int, "max_retries": int, "timeout_s": float, "max_model_len": int,
            "max_images": int, "backoff_s": float, "max_backoff_s": float, "max_retry_wait_s": float,
            "circuit_failures": int, "circuit_cooldown_s": float,
        }  # fmt: skip
        for key, cast in casts.items():
            if extra.get(key) is not None:
                try:
                    values[key] = cast(extra[key])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"remote engine setting {key}={extra[key]!r} must be a number") from exc
        if values.get("max_model_len") is None and spec.max_model_len:
            values["max_model_len"] = spec.max_model_len
        send_as = str(extra.get("send_images_as", "data_url")).replace("-", "_")
        if send_as not in ("url", "data_url"):
            raise ConfigError(f"send_images_as={send_as!r} is not valid; use 'data_url' or 'url'")
        values["send_images_as"] = send_as
        if "stream" in extra:
            values["stream"] = str(extra["stream"]).lower() not in ("0", "false", "no", "off")
        values["api_key"] = default_api_key(values["base_url"], extra.get("api_key"))
        settings = cls(**values)
        for key in ("max_concurrency", "circuit_failures"):
            if getattr(settings, key) < 1:
                raise ConfigError(f"remote engine setting {key} must be at least 1, got {getattr(settings, key)}")
        if settings.max_retries < 0 or settings.timeout_s <= 0:
            raise ConfigError("remote engine settings need max_retries >= 0 and timeout_s > 0")
        return settings

    @property
    def root_url(self) -> str:
        """The server root (``base_url`` without ``/v1``), where vlmlab serves ``/tokenize``."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; other paths are kept; no trailing ``/``.

    Raises:
        ConfigError: the URL has no http(s) scheme or no host.
    """
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"base_url {url!r} must be an http(s) URL with a host, e.g. http://localhost:8000/v1")
    return url if parts.path not in ("", "/") else f"{url}/v1"


def default_api_key(base_url: str, explicit: Any) -> str | None:
    """The explicit key, else the provider's usual variable when ``base_url`` is that provider."""
    if explicit:
        return str(explicit)
    host = (urlsplit(base_url).hostname or "").lower()
    if host == "mistral.ai" or host.endswith(".mistral.ai"):
        return os.environ.get("MISTRAL_API_KEY") or None
    if host == "api.openai.com":
        return os.environ.get("OPENAI_API_KEY") or None
    return None


# -- request bodies ------------------------------------------------------------------------------


def image_needs_encoding(part: ImagePart, send_as: SendImagesAs) -> bool:
    ref = part.ref or ""
    return not (ref.startswith("data:image/") or (send_as == "url" and ref.startswith(("http://", "https://"))))


def image_url(part: ImagePart, send_as: SendImagesAs, encoded: Mapping[str, str]) -> str:
    """What goes into ``image_url.url``: a data URL as the user sent it (original bytes), an
    http(s) URL when forwarding URLs, else ``encoded[sha256]`` (from :func:`vlmlab.engines.images.encode_image`)."""
    if not image_needs_encoding(part, send_as):
        return part.ref or ""
    assert part.data is not None  # GenerationRequest checks every image is loaded
    return encoded[part.data.sha256]


def openai_messages(chat: Chat, send_as: SendImagesAs, encoded: Mapping[str, str]) -> list[dict[str, Any]]:
    """Core chat -> OpenAI messages: plain string content unless the message holds images."""
    out: list[dict[str, Any]] = []
    for message in chat.messages:
        if not message.images:
            entry: dict[str, Any] = {"role": message.role, "content": message.text}
        else:
            parts = [
                {"type": "text", "text": p.text}
                if isinstance(p, TextPart)
                else {"type": "image_url", "image_url": {"url": image_url(p, send_as, encoded)}}
                for p in message.content
            ]
            entry = {"role": message.role, "content": parts}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in message.tool_calls
            ]
            entry["content"] = entry["content"] or None
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def tool_fields(chat: Chat, sampling: SamplingParams) -> dict[str, Any]:
    """The chat's tools and the request's tool_choice, as OpenAI's fields (none without tools)."""
    if not chat.tools:
        return {}
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": json.loads(t.parameters)}}
        for t in chat.tools
    ]
    choice: Any = sampling.tool_choice
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    return {"tools": tools, "tool_choice": choice, **({} if sampling.parallel_tool_calls else {"parallel_tool_calls": False})}


class ToolCallBuffer:
    """Calls as a stream sends them: pieces by ``index`` (id and name first, arguments in parts)."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: Any) -> None:
        for delta in deltas if isinstance(deltas, list) else ():
            if not isinstance(delta, Mapping):
                continue
            call = self.calls.setdefault(int(delta.get("index", len(self.calls))), {"id": "", "name": "", "arguments": ""})
            function = delta.get("function") or {}
            call["id"] = delta.get("id") or call["id"]
            call["name"] = function.get("name") or call["name"]
            call["arguments"] += function.get("arguments") or ""

    def result(self) -> tuple[ToolCall, ...] | None:
        if not self.calls:
            return None
        return tuple(ToolCall(c["id"], c["name"], c["arguments"] or "{}") for _, c in sorted(self.calls.items()))


def sampling_fields(sampling: SamplingParams) -> dict[str, Any]:
    """OpenAI sampling fields; vendor fields (``top_k``, ``ignore_eos``) only when set, because
    OpenAI's API rejects arguments it does not know."""
    fields: dict[str, Any] = {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    if sampling.top_k > 0:
        fields["top_k"] = sampling.top_k
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    if sampling.ignore_eos:
        fields["ignore_eos"] = True
    if sampling.presence_penalty:
        fields["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        fields["frequency_penalty"] = sampling.frequency_penalty
    if sampling.repetition_penalty != 1.0:
        fields["repetition_penalty"] = sampling.repetition_penalty
    if sampling.logit_bias:
        fields["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    if sampling.min_tokens:
        fields["min_tokens"] = sampling.min_tokens
    if sampling.logprobs:
        fields["logprobs"] = True
        if sampling.top_logprobs:
            fields["top_logprobs"] = sampling.top_logprobs
    if sampling.structured is not None and sampling.structured.param != "tool_choice":
        fields.update(structured_fields(sampling.structured))  # a forced call goes as tool_choice
    return fields


def structured_fields(structured: StructuredOutput) -> dict[str, Any]:
    """The constraint in the field the client used: OpenAI's ``response_format``, vLLM's
    ``structured_outputs`` or its older ``guided_*`` fields (the upstream decides what it takes)."""
    kind, spec = structured.kind, structured.spec
    value: Any = json.loads(spec) if kind in ("json_schema", "choice") else (True if kind == "json_object" else spec)
    if structured.param == "response_format":
        if kind == "json_object":
            return {"response_format": {"type": "json_object"}}
        schema = {"name": "response", "schema": value, **({"strict": True} if structured.strict else {})}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    member = {"json_schema": "json", "json_object": "json_object"}.get(kind, kind)
    if structured.param.startswith("guided_"):
        return {f"guided_{member}": value}
    return {"structured_outputs": {member: value}}


def parse_logprobs(choice: Mapping[str, Any]) -> tuple[TokenLogprob, ...] | None:
    """A choice's (or stream delta's) ``logprobs.content`` as core records, or None."""
    block = choice.get("logprobs")
    content = block.get("content") if isinstance(block, Mapping) else None
    if not isinstance(content, list):
        return None
    out = []
    for item in content:
        if not isinstance(item, Mapping):
            continue
        top = tuple(
            (str(t.get("token", "")), float(t.get("logprob", 0.0)), tuple(t.get("bytes") or ()))
            for t in item.get("top_logprobs") or () if isinstance(t, Mapping)
        )  # fmt: skip
        out.append(TokenLogprob(str(item.get("token", "")), float(item.get("logprob", 0.0)), tuple(item.get("bytes") or ()), top))
    return tuple(out)


# -- server-sent events --------------------------------------------------------------------------


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` per server-sent event (WHATWG rules: ``data:`` lines joined by newlines,
    dispatched at a blank line; ``:`` comments such as keep-alives skipped)."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:  # a server that ends without the final blank line
        yield event, "\n".join(data)


def parse_event(data: str, url: str) -> dict[str, Any]:
    """One SSE ``data`` payload as a JSON object.

    Raises:
        EngineError: the payload is not a JSON object (quoting its start).
    """
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise EngineError(f"the remote server {url} sent a malformed stream event: {short_ref(data, 200)!r}")
    return value


# -- usage ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteUsage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    image_tokens: int | None = None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else None


def parse_usage(obj: Mapping[str, Any]) -> RemoteUsage | None:
    """Token counts from a response or stream chunk, whatever the server calls them.

    OpenAI / vLLM / vlmlab: ``usage.prompt_tokens`` / ``completion_tokens`` (images in
    ``usage.prompt_tokens_details.image_tokens``); mlx-vlm: ``usage.input_tokens`` /
    ``output_tokens``; Ollama's native fields: ``prompt_eval_count`` / ``eval_count`` (top level).
    """
    usage = obj.get("usage")
    sources = [usage] if isinstance(usage, Mapping) else []
    sources.append(obj)
    for source in sources:
        prompt = _int(source.get("prompt_tokens", source.get("input_tokens", source.get("prompt_eval_count"))))
        completion = _int(source.get("completion_tokens", source.get("output_tokens", source.get("eval_count"))))
        if prompt is None and completion is None:
            continue
        details = source.get("prompt_tokens_details") or source.get("input_tokens_details")
        image = _int(details.get("image_tokens")) if isinstance(details, Mapping) else None
        return RemoteUsage(prompt, completion, image)
    return None


def estimate_prompt_tokens(
    chat: Chat, family: Family | None, options: Mapping[str, Any]
) -> tuple[int, int, tuple[int, ...]]:
    """``(prompt_tokens, image_tokens, per_image)`` without the remote's tokenizer: the family's
    image-token rule (exact for the families vlmlab knows) plus ~4 bytes per text token of the
    rendered prompt. Without a family, images count 0 (unknown) and each message adds framing.
    """
    sizes = [(p.data.width, p.data.height) for p in chat.images if p.data is not None]
    if family is not None:
        per_image = tuple(family.prompt_image_tokens(sizes, **family.resolve_options(options)))
        text = family.render_prompt(chat).replace(family.image_placeholder, "")
        framing = 0
    else:
        per_image = tuple(0 for _ in sizes)
        text = "".join(m.text for m in chat.messages)
        framing = TOKENS_PER_MESSAGE * len(chat.messages) + TOKENS_PER_REPLY
    text_tokens = math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE) + framing
    return text_tokens + sum(per_image), sum(per_image), per_image


# -- errors --------------------------------------------------------------------------------------

# vlmlab's own error codes (protocol/errors.py default_code), so a vlmlab upstream's client errors
# keep their class (and HTTP status) through a remote hop.
_CODE_ERRORS: dict[str, type[VlmlabError]] = {
    "invalid_image": MediaError,
    "image_decode_failed": ImageDecodeError,
    "image_too_large": ImageTooLargeError,
    "image_fetch_failed": MediaFetchError,
    "image_fetch_timeout": MediaTimeoutError,
    "image_url_forbidden": ForbiddenMediaError,
}


def error_fields(payload: Any, fallback: str) -> tuple[str, str | None, Any]:
    """``(message, param, code)`` of an OpenAI error body (``{"error": {...}}``), of the flat
    ``{"error": "text"}`` form (Ollama, mlx-vlm) or of FastAPI's ``{"detail": ...}``."""
    if isinstance(payload, Mapping):
        error = payload.get("error", payload)
        if isinstance(error, Mapping):
            message = error.get("message") or error.get("detail") or error.get("msg")
            if message:
                return str(message), error.get("param"), error.get("code")
        elif isinstance(error, str) and error:
            return error, None, None
        if payload.get("detail"):
            return str(payload["detail"]), None, None
    return (fallback.strip() or "(empty body)")[:500], None, None


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def remote_error(status: int, payload: Any, text: str, url: str, retry_after: float | None = None) -> VlmlabError:
    """The vlmlab error for a remote error status (or an in-band stream error with that status).

    Client errors keep the remote message verbatim (the caller sees what the remote said, as if it
    had called it directly); authentication and server errors also name the remote URL.
    """
    message, param, code = error_fields(payload, text)
    if isinstance(code, str) and code == "context_length_exceeded":
        return ContextLengthError(message, param=param or "messages")
    if isinstance(code, str) and code in _CODE_ERRORS:
        return _CODE_ERRORS[code](message, param=param)
    if status in (401, 403):
        return AuthenticationError(
            f"the remote server {url} refused the request ({status}): {message}; check the API key "
            "(--remote-api-key, extra api_key, MISTRAL_API_KEY / OPENAI_API_KEY)"
        )
    if status == 404:
        return NotFoundError(message, param=param)
    if status == 429:
        return OverloadedError(f"the remote server {url} is rate limiting: {message}", retry_after=retry_after or 1.0)
    if 400 <= status < 500:
        return BadRequestError(message, param=param)
    return EngineError(f"the remote server {url} failed ({status}): {message}")


def status_of(error: Mapping[str, Any]) -> int:
    """The HTTP status an in-band error object stands for (``code`` when numeric, else 500)."""
    code = error.get("code")
    if isinstance(code, int) and 400 <= code < 600:
        return code
    if isinstance(code, str) and code.isdigit() and 400 <= int(code) < 600:
        return int(code)
    if isinstance(code, str) and (code == "context_length_exceeded" or code in _CODE_ERRORS):
        return 400
    return 500
