"""The engine contract: the small interface every backend (hf, vllm, mlx, remote) implements.

An engine is created with :meth:`Engine.load`, answers :meth:`Engine.generate` as an async stream
of :class:`GenerationChunk` ending in exactly one :class:`GenerationResult`, counts prompt tokens
without generating (:meth:`Engine.count_prompt_tokens`), describes itself (:meth:`Engine.info`),
and releases its resources in :meth:`Engine.close`. Images arrive already loaded
(``ImagePart.data`` set): fetching and decoding belong to the caller's worker pool.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlmlab.config import EngineSpec
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult, SamplingParams
from vlmlab.protocol.errors import BadRequestError, EngineError


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so callers route and validate before sending work."""

    streaming: bool = True
    batching: bool = False
    images: bool = True
    max_images: int = 1
    cancellation: bool = True
    exact_token_counts: bool = True  # count_prompt_tokens equals what generate will use
    # The answer-shaping features of SamplingParams this backend honours, beyond temperature,
    # top-p, top-k, stop and seed: any of FEATURES. A request using one it lacks is a 400.
    features: frozenset[str] = frozenset()


FEATURES = frozenset({"structured_outputs", "logprobs", "penalties", "logit_bias", "min_tokens", "tools"})


def used_features(sampling: SamplingParams, tools_offered: bool = False) -> list[tuple[str, str]]:
    """``(feature, request field)`` for each feature ``sampling`` uses; ``tools_offered``: the
    chat offers tools (rendered into the prompt even with ``tool_choice`` none)."""
    used = []
    if sampling.structured is not None:
        used.append(("structured_outputs", sampling.structured.param))
    if sampling.logprobs:
        used.append(("logprobs", "logprobs"))
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(sampling, name):
            used.append(("penalties", name))
    if sampling.repetition_penalty != 1.0:
        used.append(("penalties", "repetition_penalty"))
    if sampling.logit_bias:
        used.append(("logit_bias", "logit_bias"))
    if sampling.min_tokens:
        used.append(("min_tokens", "min_tokens"))
    if sampling.tool_choice != "none" or tools_offered:
        used.append(("tools", "tools"))
    return used


def check_features(engine_name: str, capabilities: Capabilities, sampling: SamplingParams, tools_offered: bool = False) -> None:
    """Raises BadRequestError naming the first request field whose feature the engine lacks."""
    for feature, param in used_features(sampling, tools_offered):
        if feature not in capabilities.features:
            raise BadRequestError(f"{param} is not supported by the {engine_name} engine", param=param)


@dataclass(frozen=True)
class EngineInfo:
    engine: str
    model: str
    family: str | None
    max_model_len: int
    max_images: int
    device: str = "cpu"
    dtype: str = "fp32"
    load_s: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptCount:
    """Tokens of a prompt: ``prompt_tokens`` includes ``image_tokens``."""

    prompt_tokens: int
    image_tokens: int
    per_image: tuple[int, ...] = ()


@dataclass
class GenerationRequest:
    """One generation: the chat (images loaded), sampling, processor options, an id."""

    chat: Chat
    sampling: SamplingParams = field(default_factory=SamplingParams)
    processor_options: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""
    # "exact" (equal to the model's processor) or "fast" (vlmlab.preprocess's opt-in mode:
    # same tokens, close pixels); engines without their own image path ignore it.
    preprocess_mode: str = "exact"
    # False: the caller wants only the result, so an engine may skip the intermediate chunks
    # (vLLM's FINAL_ONLY output kind): no per-token wake-ups of the event loop.
    stream: bool = True

    def __post_init__(self) -> None:
        for index, image in enumerate(self.chat.images):
            if image.data is None:
                raise BadRequestError(
                    f"image {index} ({image.ref!r:.80}) was not loaded; call vlmlab.media.load_image first"
                )


class Engine(abc.ABC):
    """Base class of every backend. Subclasses set ``name`` and ``capabilities``."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    # The longest string one token of the model's vocabulary stands for, where the engine knows
    # it: a text of N characters is then at least N / max_token_chars tokens, a bound the server
    # checks in O(N) before any tokenizer runs (None: no such bound).
    max_token_chars: int | None = None

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: EngineSpec) -> Engine:
        """Load the model described by ``spec`` (blocking; may take minutes for large models).

        Raises:
            EngineUnavailableError: the backend cannot run here (missing extra or hardware).
            NotFoundError / ConfigError: the model cannot be found or the settings are invalid.
        """

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        """Stream the answer: text chunks as they are produced, then exactly one result.

        Cancelling the consuming task (client disconnect) must stop the generation and free
        its slot. Raises BadRequestError (e.g. context too long) before any chunk is yielded.
        """

    @abc.abstractmethod
    def count_prompt_tokens(self, chat: Chat, processor_options: Mapping[str, Any] | None = None) -> PromptCount:
        """Prompt tokens of ``chat`` (images loaded) as :meth:`generate` would build them."""

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """What is loaded and how (for ``/v1/models``, ``/stats`` and result metadata)."""

    def lookup_processed(
        self, sha256: str, processor_options: Mapping[str, Any] | None = None, mode: str = "exact"
    ) -> Any | None:
        """A cached preprocessing of the image with this content hash, or None.

        Callers put a hit into ``ImageData.processed`` and skip decoding the image.
        """
        return None

    def pool_task(self, processor_options: Mapping[str, Any], mode: str = "exact") -> tuple[str, dict[str, Any]] | None:
        """``(family, options)`` for :class:`vlmlab.preprocess.PreprocessPool` when this engine can
        take an image preprocessed from its bytes in another process, else None."""
        return None

    def adopt_preprocessed(self, sha256: str, processor_options: Mapping[str, Any], mode: str, pre: Any) -> Any:
        """Turn a pool's :class:`~vlmlab.preprocess.Preprocessed` into what ``ImageData.processed``
        carries for this engine (and cache it). Only called after :meth:`pool_task` said yes."""
        raise EngineError(f"the {self.info().engine} engine takes no preprocessed images (its pool_task is None)")

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: ok while idle or making progress; not ok when dead or hung."""
        return True, "ok"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any worker threads. Idempotent."""


async def complete(engine: Engine, request: GenerationRequest) -> GenerationResult:
    """Run a generation to the end and return its result (for non-streaming callers)."""
    result: GenerationResult | None = None
    async for item in engine.generate(request):
        if isinstance(item, GenerationResult):
            result = item
    if result is None:  # pragma: no cover - a broken engine
        raise RuntimeError(f"engine {engine.name!r} ended a generation without a result")
    return result
