"""The mistral engine's translation layer: vlmlab's core types to mistral_common's and back.

Nothing here imports torch or mistral-inference (mistral_common is imported inside the functions
that need it), so the mappings are tested on any machine with the real Tekken tokenizer: the
chat as a ``ChatCompletionRequest`` (:func:`mistral_messages`), its tokens and image arrays
(:func:`encode_chat`), image tokens counted in those tokens (:func:`image_token_runs`), the
request fields mistral-inference's sampling can honour (:func:`check_sampling`) and text decoded
token by token (:class:`IncrementalText`); stop strings are :class:`vlmlab.engines.stops.StopText`.

Reference: mistral-inference 1.6 ``mistral_inference/generate.py`` (``generate``: one prefill
``model.forward`` over the prompt with the images, then one ``forward`` per token over a
``BufferCache``; ``sample(logits, temperature, top_p)``: argmax at temperature 0, else top-p
sampling with ``torch.multinomial``) and ``mistral_inference/main.py`` (``interactive``: tokens and
images from ``MistralTokenizer.encode_chat_completion``, ``eos_id=tokenizer.eos_id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.protocol.core import Chat, FinishReason, ImagePart, SamplingParams, TextPart
from vlmlab.protocol.errors import BadRequestError, ConfigError

INSTALL_HINT = (
    "mistral-inference is not installed: pip install 'vlmlab[mistral]' (on a Linux machine with an "
    "NVIDIA GPU: it needs xformers); for Pixtral on a CPU use --engine hf"
)
NO_GPU_HINT = (
    "mistral-inference needs an NVIDIA GPU: its attention is xformers' memory_efficient_attention, "
    "which has no CPU kernels; use --engine hf --model mistral-community/pixtral-12b for Pixtral on a CPU"
)
# The native checkpoint folder (mistralai/Pixtral-12B-2409 on the Hub): what
# ``Transformer.from_folder`` (params.json + consolidated.safetensors) and
# ``MistralTokenizer.from_file`` (tekken.json) read.
NATIVE_FILES = ("params.json", "consolidated.safetensors", "tekken.json")
# mistral-inference's rotary table has 128_000 positions (transformer.py ``freqs_cis``:
# ``precompute_freqs_cis(self.args.head_dim, 128_000, theta)``); a longer sequence cannot run.
ROPE_POSITIONS = 128_000
# EngineSpec.dtype -> torch dtype name. "auto" is bf16, as Pixtral-12B-2409 is stored
# (consolidated.safetensors holds bfloat16 tensors) and as mistral-inference's README runs it.
DTYPES = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def unavailable_reason(has_mistral_inference: bool, cuda: bool, device: str) -> str | None:
    """Why the mistral engine cannot run here, or None.

    Args:
        has_mistral_inference: ``mistral_inference`` can be imported.
        cuda: ``torch.cuda.is_available()``.
        device: the requested device (``auto``, ``cpu``, ``cuda``, ``mps``).
    """
    if device in ("cpu", "mps"):
        return f"{NO_GPU_HINT} (asked for --device {device})"
    if not has_mistral_inference:
        return INSTALL_HINT
    if not cuda:
        return f"{NO_GPU_HINT} (torch sees no CUDA device here)"
    return None


def missing_files(folder: Path) -> list[str]:
    """The native checkpoint files ``folder`` lacks (empty: it can load)."""
    return [name for name in NATIVE_FILES if not (folder / name).is_file()]


def context_limit(requested: int | None) -> int:
    """The context the engine enforces: ``--max-model-len`` if given, at most mistral-inference's
    rotary table; Pixtral-12B-2409's own 128k (model card) is the same bound."""
    if requested is not None and requested > ROPE_POSITIONS:
        raise ConfigError(
            f"max_model_len {requested} exceeds the {ROPE_POSITIONS} positions mistral-inference's "
            "rotary table holds; pass a smaller --max-model-len",
            param="max_model_len",
        )
    return requested or ROPE_POSITIONS


# -- requests ------------------------------------------------------------------------------------


def mistral_messages(chat: Chat) -> list[Any]:
    """Core chat -> mistral_common messages: a user message with images is a list of
    ``TextChunk`` / ``ImageChunk`` in order (empty text dropped), any other message plain text.

    Raises:
        BadRequestError: tool turns or assistant tool calls (the engine offers no tools), or an
            image whose pixels were not decoded.
    """
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        ImageChunk,
        SystemMessage,
        TextChunk,
        UserMessage,
    )

    out: list[Any] = []
    for message in chat.messages:
        if message.role == "tool" or message.tool_calls:
            raise BadRequestError("tool messages and tool_calls are not supported by the mistral engine", param="messages")
        if message.role == "system":
            out.append(SystemMessage(content=message.text))
        elif message.role == "assistant":
            out.append(AssistantMessage(content=message.text))
        elif not message.images:
            out.append(UserMessage(content=message.text))
        else:
            chunks: list[Any] = []
            for part in message.content:
                if isinstance(part, TextPart):
                    if part.text:
                        chunks.append(TextChunk(text=part.text))
                else:
                    chunks.append(ImageChunk(image=_pixels(part)))
            out.append(UserMessage(content=chunks))
    return out


def _pixels(part: ImagePart) -> Any:
    if part.data is None or part.data.image is None:
        raise BadRequestError(f"image {part.ref or ''!r:.80} has no decoded pixels for mistral_common", param="messages")
    return part.data.image


@dataclass(frozen=True)
class MistralPrompt:
    """A chat as mistral-inference takes it.

    Attributes:
        tokens: the prompt's token ids (images expanded to their ``[IMG]`` runs).
        images: one float32 array (channels, height, width) per image, normalised and resized by
            mistral_common's ``ImageEncoder``, in prompt order.
        per_image: tokens of each image's run (``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``).
    """

    tokens: list[int]
    images: list[Any]
    per_image: tuple[int, ...]

    @property
    def image_tokens(self) -> int:
        return sum(self.per_image)


def encode_chat(tokenizer: Any, chat: Chat) -> MistralPrompt:
    """``chat`` encoded by ``tokenizer`` (a ``MistralTokenizer``) exactly as mistral-inference's own
    chat does (``encode_chat_completion`` of a ``ChatCompletionRequest``).

    Raises:
        BadRequestError: a chat mistral_common refuses (e.g. ending with an assistant turn).
    """
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    if chat.images and getattr(tokenizer.instruct_tokenizer, "image_encoder", None) is None:
        raise BadRequestError("this checkpoint's tokenizer has no image encoder: it takes text only", param="messages")
    messages = mistral_messages(chat)
    try:
        encoded = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages))
    except (MistralCommonException, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise BadRequestError(f"mistral_common cannot encode this chat: {exc}", param="messages") from exc
    encoder = getattr(tokenizer.instruct_tokenizer, "image_encoder", None)
    if encoder is None:
        per_image: tuple[int, ...] = ()
    else:
        ids = encoder.special_ids
        per_image = image_token_runs(encoded.tokens, ids.img, ids.img_break, ids.img_end)
    if len(per_image) != len(encoded.images):  # pragma: no cover - a tokenizer this code does not know
        raise BadRequestError(f"{len(encoded.images)} image(s) encoded but {len(per_image)} [IMG_END] tokens found", param="messages")
    return MistralPrompt(list(encoded.tokens), list(encoded.images), per_image)


def image_token_runs(tokens: list[int], img: int, img_break: int, img_end: int) -> tuple[int, ...]:
    """Tokens of each image in ``tokens``: every ``[IMG]`` and ``[IMG_BREAK]`` up to and with its
    ``[IMG_END]`` (mistral_common's ``ImageEncoder`` layout: rows of ``[IMG]`` ending in
    ``[IMG_BREAK]``, the last row's break replaced by ``[IMG_END]``)."""
    runs: list[int] = []
    current = 0
    for token in tokens:
        if token in (img, img_break):
            current += 1
        elif token == img_end:
            runs.append(current + 1)
            current = 0
    return tuple(runs)


def check_sampling(sampling: SamplingParams) -> None:
    """Raises BadRequestError naming the first field mistral-inference's sampling cannot honour.

    Its ``sample`` takes temperature and top-p only: ``top_k`` is refused. The answer-shaping
    features (logprobs, penalties, ...) are refused by ``check_features``: the engine declares none.
    """
    if sampling.top_k > 0:
        raise BadRequestError(
            f"top_k ({sampling.top_k}) is not supported by the mistral engine (mistral-inference samples "
            "with temperature and top_p only); drop it or use --engine hf / vllm",
            param="top_k",
        )


def sample_settings(sampling: SamplingParams) -> dict[str, float]:
    """Keyword arguments of ``mistral_inference.generate.sample``. Temperature 0 is argmax there
    (top_p unused); top_p 1.0 keeps every token."""
    return {"temperature": sampling.temperature, "top_p": sampling.top_p}


def finish_reason(saw_eos: bool, stopped_by_text: bool, cancelled: bool) -> FinishReason:
    """``stop`` at EOS or a stop string, ``length`` at max_tokens, ``abort`` when cancelled."""
    if cancelled:
        return "abort"
    return "stop" if saw_eos or stopped_by_text else "length"


def dtype_name(dtype: str) -> str:
    """The torch dtype name for an ``EngineSpec.dtype``."""
    return DTYPES[dtype]


# -- output text ---------------------------------------------------------------------------------


@dataclass
class IncrementalText:
    """The text of generated tokens, piece by piece: the whole list is decoded each time (Tekken
    merges bytes across tokens) and only text past what was sent is returned. A trailing U+FFFD
    is held back: the token ended inside a UTF-8 character that the next token completes."""

    tokenizer: Any  # the Tekkenizer (``MistralTokenizer.instruct_tokenizer.tokenizer``)
    tokens: list[int]
    sent: str = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tokenizer.decode(self.tokens))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # pragma: no cover - decoding is prefix-stable for Tekken
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def spec_options(options: Mapping[str, Any]) -> None:
    """Raises ConfigError for processor options: mistral_common's ImageEncoder takes none (its
    patch size and 1024 px longest edge come from tekken.json)."""
    extra = {k: v for k, v in options.items() if not (k == "variant" and v == "mistral")}
    if extra:
        raise ConfigError(
            f"the mistral engine processes images as tekken.json says (mistral_common's ImageEncoder); "
            f"it takes no processor options, got {extra}. Drop them, or use --engine hf / vllm"
        )
