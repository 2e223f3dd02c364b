"""The vLLM engine's translation layer: pure functions between vlmlab's types and vLLM's.

Nothing here imports vLLM or torch, so every mapping is tested on any machine: the known
checkpoint traps as data (:data:`PRESETS`), engine arguments from an :class:`EngineSpec`, chat
messages in the OpenAI form ``LLM.chat`` / the renderer accept, sampling parameters, streamed text
deltas from cumulative outputs, finish reasons, usage and vLLM's exceptions.
:mod:`vlmlab.engines.vllm.engine` holds the parts that need vLLM itself.

References (vLLM 0.33): ``vllm/entrypoints/llm.py`` (``LLM.chat``), ``vllm/entrypoints/common/
offline.py`` (``_preprocess_chat``), ``vllm/renderers/base.py`` (``render_chat_async``),
``vllm/renderers/chat_utils/chat_message.py`` (content parts, ``image_pil`` with ``uuid``),
``vllm/sampling_params.py``, ``vllm/outputs.py``, ``vllm/exceptions.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmlab.config import EngineSpec
from vlmlab.engines.images import encode_image
from vlmlab.engines.quantization import spec_quantization, vllm_quantization
from vlmlab.families import Family, get_family
from vlmlab.protocol.core import (
    Chat,
    FinishReason,
    ImagePart,
    SamplingParams,
    StructuredOutput,
    TextPart,
    TokenLogprob,
)
from vlmlab.protocol.errors import (
    BadRequestError,
    ConfigError,
    ContextLengthError,
    EngineError,
    NotFoundError,
    OverloadedError,
    VlmlabError,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "vLLM is not installed: pip install 'vlmlab[vllm]'"
NO_GPU_HINT = "vLLM needs an NVIDIA GPU; use --engine hf or --engine remote"

# -- availability --------------------------------------------------------------------------------


def unavailable_reason(has_vllm: bool, has_cuda: bool) -> str | None:
    """Why the vLLM engine cannot run here (the message of an EngineUnavailableError), or None.

    The hardware is named first when both are missing: installing vLLM on a machine without an
    NVIDIA GPU would not help.
    """
    if not has_cuda:
        return NO_GPU_HINT if has_vllm else f"{NO_GPU_HINT} (and {INSTALL_HINT})"
    if not has_vllm:
        return INSTALL_HINT
    return None


# -- presets: the known traps of each checkpoint, as data ----------------------------------------


@dataclass(frozen=True)
class VLLMPreset:
    """vLLM engine arguments a checkpoint needs (or is best served with), and why.

    Attributes:
        engine_args: ``EngineArgs`` fields; the spec and ``extra`` override them.
        trust_remote_code: the checkpoint's processor is remote code vLLM must run.
        why: the source of the settings.
    """

    engine_args: Mapping[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    why: str = ""


# 32768 caps the context where the checkpoint's own (128k) would not leave room for one full
# sequence's KV cache next to the weights on a 24-48 GiB GPU; vLLM refuses to start then. It is
# the max_model_len of vlmlab's configs/*.yaml presets for the same models.
_CONTEXT = 32768

PRESETS: dict[str, VLLMPreset] = {
    # The native checkpoint ships params.json / consolidated.safetensors / tekken.json only:
    # vLLM's Pixtral docs and examples/offline_inference/vision_language.py load it with
    # tokenizer_mode="mistral" (and config_format / load_format "mistral" to read params.json
    # and consolidated.safetensors).
    "mistralai/pixtral-12b-2409": VLLMPreset(
        {
            "tokenizer_mode": "mistral",
            "config_format": "mistral",
            "load_format": "mistral",
            "limit_mm_per_prompt": {"image": 4},
            "max_model_len": _CONTEXT,
        },
        why="native Mistral checkpoint (params.json, tekken.json); configs/pixtral-12b.yaml",
    ),
    # The transformers port (config.json, LlavaForConditionalGeneration): default formats.
    "mistral-community/pixtral-12b": VLLMPreset(
        {"limit_mm_per_prompt": {"image": 4}, "max_model_len": _CONTEXT},
        why="HF port of Pixtral-12B-2409; configs/pixtral-12b-hf.yaml",
    ),
    # Processor and model config are remote code (config.json auto_map); num_crops 4 is the
    # checkpoint's preprocessor_config.json default, passed explicitly as vLLM's Phi-3-vision
    # example does (mm_processor_kwargs={"num_crops": ...}).
    "microsoft/phi-3.5-vision-instruct": VLLMPreset(
        {"mm_processor_kwargs": {"num_crops": 4}, "limit_mm_per_prompt": {"image": 8}, "max_model_len": _CONTEXT},
        trust_remote_code=True,
        why="remote-code processor (config.json auto_map); configs/phi-3.5-vision.yaml",
    ),
    "microsoft/phi-3-vision-128k-instruct": VLLMPreset(
        {"mm_processor_kwargs": {"num_crops": 16}, "limit_mm_per_prompt": {"image": 4}, "max_model_len": _CONTEXT},
        trust_remote_code=True,
        why="remote-code processor; preprocessor_config.json num_crops 16",
    ),
    "qwen/qwen2-vl-2b-instruct": VLLMPreset(
        {"limit_mm_per_prompt": {"image": 4, "video": 0}, "max_model_len": _CONTEXT},
        why="configs/qwen2-vl.yaml (no video inputs: vLLM reserves no encoder budget for them)",
    ),
    "qwen/qwen2-vl-7b-instruct": VLLMPreset(
        {"limit_mm_per_prompt": {"image": 4, "video": 0}, "max_model_len": _CONTEXT},
        why="configs/qwen2-vl.yaml",
    ),
}
# Family-wide defaults for checkpoints not listed above (fine-tunes keep their family's traps).
FAMILY_PRESETS: dict[str, VLLMPreset] = {
    "phi3_5_vision": VLLMPreset({"mm_processor_kwargs": {"num_crops": 4}}, trust_remote_code=True, why="Phi-3.5-vision family"),
    "phi3_vision": VLLMPreset({"mm_processor_kwargs": {"num_crops": 16}}, trust_remote_code=True, why="Phi-3-vision family"),
}


def find_preset(model: str, family: Family | None) -> VLLMPreset:
    """The preset of a hub id (case-insensitive), else of its family, else an empty one."""
    preset = PRESETS.get(model.strip().lower())
    if preset is None and family is not None:
        preset = FAMILY_PRESETS.get(family.name)
    return preset or VLLMPreset()


def family_of(model: str, hint: str | None) -> Family | None:
    """The family of a hub id / family hint, or None (image tokens then come from vLLM)."""
    for name in (hint, model):
        if name:
            try:
                return get_family(name)
            except VlmlabError:
                continue
    return None


# -- engine arguments ----------------------------------------------------------------------------

# extra keys vlmlab itself reads; every other extra key is a vLLM EngineArgs field.
VLMLAB_KEYS = frozenset({"offline", "quantization", "send_images_as", "use_tqdm"})
_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class VLLMSettings:
    """How vlmlab drives vLLM, from ``EngineSpec.extra``.

    Attributes:
        offline: use ``vllm.LLM`` (``LLM.chat`` batches, vLLM's tqdm speed line) instead of the
            async engine; no streaming or cancellation (``vlmlab chat``, batch evaluation).
        send_images_as: ``pil`` hands the decoded image to vLLM with its content hash as the
            multimodal cache id (no re-encoding); ``data_url`` re-encodes it losslessly (PNG).
        use_tqdm: show vLLM's progress bar in offline mode.
    """

    offline: bool = False
    send_images_as: Literal["pil", "data_url"] = "pil"
    use_tqdm: bool = True

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> VLLMSettings:
        """Raises ConfigError for a bad value."""
        send = extra.get("send_images_as", "pil")
        if send not in ("pil", "data_url"):
            raise ConfigError(f"send_images_as must be 'pil' or 'data_url', got {send!r}")
        for key in ("offline", "use_tqdm"):
            if key in extra and not isinstance(extra[key], bool):
                raise ConfigError(f"{key} must be true or false, got {extra[key]!r}")
        return cls(bool(extra.get("offline", False)), send, bool(extra.get("use_tqdm", True)))


def engine_args(spec: EngineSpec, model: str, preset: VLLMPreset) -> dict[str, Any]:
    """vLLM ``EngineArgs`` keyword arguments: the preset, then the spec, then ``spec.extra``.

    Raises:
        ConfigError: a device other than the GPU, a dtype or quantization vLLM does not take,
            or a preset that needs remote code on a spec that forbids it explicitly.
    """
    if spec.device not in ("auto", "cuda"):
        raise ConfigError(f"vLLM runs on the GPU; drop --device {spec.device} or use --engine hf")
    args: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in preset.engine_args.items()}
    args.update(
        model=model,
        dtype=_DTYPES[spec.dtype],
        trust_remote_code=spec.trust_remote_code or preset.trust_remote_code,
        max_num_seqs=spec.max_batch_size,
    )
    if spec.revision:
        args["revision"] = spec.revision
    if spec.max_model_len:
        args["max_model_len"] = spec.max_model_len
    if spec.processor_options:
        args["mm_processor_kwargs"] = {**args.get("mm_processor_kwargs", {}), **spec.processor_options}
    quantization = spec_quantization(spec.extra)
    if quantization:
        args["quantization"] = vllm_quantization(quantization)
    args.update({k: v for k, v in spec.extra.items() if k not in VLMLAB_KEYS})
    return args


def check_arg_names(args: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Raises ConfigError naming the ``extra`` keys that are not vLLM engine arguments."""
    valid = set(valid)
    unknown = sorted(set(args) - valid)
    if unknown:
        raise ConfigError(
            f"unknown vLLM engine argument(s) {unknown} in extra; vlmlab's own keys are "
            f"{sorted(VLMLAB_KEYS)}, vLLM's include {', '.join(sorted(valid)[:40])}, ..."
        )


# -- requests ------------------------------------------------------------------------------------


def pil_image_part(part: ImagePart) -> dict[str, Any]:
    """vLLM's ``image_pil`` content part; ``uuid`` (the content hash) keys vLLM's multimodal
    processor cache, which still mixes in the processor kwargs (vllm/multimodal/processing/
    inputs.py ``get_mm_hashes``)."""
    data = part.data
    if data is None or data.image is None:
        raise BadRequestError(f"image {part.ref or ''!r:.80} has no decoded pixels for vLLM")
    return {"type": "image_pil", "image_pil": data.image, "uuid": data.sha256}


def data_url_image_part(part: ImagePart) -> dict[str, Any]:
    """An OpenAI ``image_url`` part: the user's own data URL, else a lossless re-encoding."""
    ref = part.ref or ""
    url = ref if ref.startswith("data:image/") else encode_image(part)
    return {"type": "image_url", "image_url": {"url": url}}


def chat_messages(chat: Chat, image_part: Callable[[ImagePart], dict[str, Any]] = pil_image_part) -> list[dict[str, Any]]:
    """Core chat -> the OpenAI-style conversation ``LLM.chat`` and vLLM's renderer take: string
    content for text-only messages, ordered text / image parts otherwise."""
    out: list[dict[str, Any]] = []
    for message in chat.messages:
        if not message.images:
            out.append({"role": message.role, "content": message.text})
            continue
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else image_part(p) for p in message.content]
        out.append({"role": message.role, "content": parts})
    return out


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments. vLLM's ``top_k`` 0 also means "off"
    (vllm/sampling_params.py: "Set to 0 (or -1) to consider all tokens")."""
    return {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        "ignore_eos": sampling.ignore_eos,
        "skip_special_tokens": True,
        # vllm/sampling_params.py: OpenAI's penalties, vLLM's repetition_penalty (1 = off),
        # logit_bias by token id, min_tokens.
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "repetition_penalty": sampling.repetition_penalty,
        "logit_bias": dict(sampling.logit_bias) or None,
        "min_tokens": sampling.min_tokens,
        # vLLM's logprobs = how many alternatives per token (0: the chosen token's alone)
        "logprobs": sampling.top_logprobs if sampling.logprobs else None,
    }


def token_logprobs(token_ids: Sequence[int], steps: Sequence[Mapping[int, Any]] | None, top: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token logprobs (``CompletionOutput.logprobs``: for each generated token a
    ``{token id: Logprob(logprob, rank, decoded_token)}`` holding the chosen token and the top
    ones) as core records, the ``top`` alternatives most likely first."""
    out = []
    for token, step in zip(token_ids, steps or ()):
        chosen = step.get(token)
        if chosen is None:
            continue
        ranked = sorted(step.values(), key=lambda p: p.rank if p.rank is not None else 1 << 30)[:top]
        alternatives = tuple((p.decoded_token or "", float(p.logprob), tuple((p.decoded_token or "").encode())) for p in ranked)
        text = chosen.decoded_token or ""
        out.append(TokenLogprob(text, float(chosen.logprob), tuple(text.encode()), alternatives))
    return tuple(out)


def structured_outputs_kwargs(structured: StructuredOutput | None) -> dict[str, Any] | None:
    """Keyword arguments of vLLM's ``StructuredOutputsParams`` (vllm/sampling_params.py: one of
    ``json``, ``regex``, ``choice``, ``grammar``, ``json_object``), or None."""
    if structured is None:
        return None
    kind, spec = structured.kind, structured.spec
    if kind == "json_schema":
        return {"json": json.loads(spec)}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "choice":
        return {"choice": json.loads(spec)}
    return {kind: spec}  # regex, grammar


def merged_options(spec_options: Mapping[str, Any], request_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Processor options of one request: the spec's defaults under the request's."""
    return {**spec_options, **(request_options or {})}


# -- outputs -------------------------------------------------------------------------------------

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}


def finish_reason(reason: str | None) -> FinishReason:
    """vLLM's ``CompletionOutput.finish_reason`` (``stop`` covers EOS and stop strings)."""
    return _FINISH.get(reason or "stop", "stop")


@dataclass
class TextDelta:
    """Turns vLLM's cumulative output text (``RequestOutputKind.CUMULATIVE``) into the pieces
    to stream. vLLM holds back text that could still become a stop string, so the cumulative text
    only grows; if it ever did not, nothing already sent can be taken back, so this waits until
    the text extends what was sent again (``diverged`` records it)."""

    sent: str = ""
    tokens: int = 0
    diverged: bool = False

    def update(self, text: str, token_count: int) -> tuple[str, int]:
        """``(new text, new tokens)`` since the previous call."""
        new_tokens = max(0, token_count - self.tokens)
        self.tokens = max(self.tokens, token_count)
        if not text.startswith(self.sent):
            self.diverged = True
            return "", new_tokens
        delta = text[len(self.sent):]
        self.sent = text
        return delta, new_tokens


def rule_image_tokens(family: Family | None, sizes: Sequence[tuple[int, int]], options: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Per-image tokens by the family rule (every token an image adds, as the hf engine and
    ``vlmlab plan`` count), or None when there is no family or it does not know an option."""
    if family is None or not sizes:
        return None if family is None else ()
    known = {o.name for o in family.options}
    if set(options) - known:
        return None  # a vLLM-only processor kwarg: the rule cannot price it
    try:
        return tuple(family.prompt_image_tokens(list(sizes), **options))
    except VlmlabError as exc:
        logger.warning("%s rule cannot count these images (%s); using vLLM's placeholders", family.name, exc.message)
        return None


def rule_options(family: Family | None, model: str, options: Mapping[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """Options the family rule counts with: the checkpoint's own (the HF Pixtral port's
    ``variant``), then the engine-wide ``mm_processor_kwargs`` vLLM applies, then the request's."""
    base: dict[str, Any] = {}
    if family is not None:
        try:
            base.update(family.checkpoint(model).options)
        except VlmlabError:
            pass  # a checkpoint the family does not list: its defaults
    return {**base, **(args.get("mm_processor_kwargs") or {}), **options}


def max_images(limit_mm_per_prompt: Any, family: Family | None) -> int:
    """Images per prompt: vLLM's ``limit_mm_per_prompt["image"]`` (an int or ``{"count": n}``)
    when set, else the family's documented limit, else 8."""
    limit = limit_mm_per_prompt.get("image") if isinstance(limit_mm_per_prompt, Mapping) else None
    if isinstance(limit, Mapping):
        limit = limit.get("count")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        return limit
    return family.max_images if family is not None else 8


def image_tokens(rule: tuple[int, ...] | None, placeholder_lengths: Sequence[int]) -> tuple[int, ...]:
    """Per-image tokens: the family rule where it applies, else the lengths of vLLM's
    multimodal placeholder ranges (``PlaceholderRange.length``; they may leave out wrapper
    tokens such as Qwen2-VL's ``<|vision_start|>``)."""
    return rule if rule is not None else tuple(int(n) for n in placeholder_lengths)


def stats_timings(queued: float, scheduled: float, first: float, last: float) -> dict[str, float]:
    """Queue / prefill / decode seconds from vLLM's engine-core timestamps
    (``RequestStateStats``: ``queued_ts``, ``scheduled_ts``, ``first_token_ts``,
    ``last_token_ts``); missing (zero) stamps give no figure."""
    out: dict[str, float] = {}
    if queued and scheduled >= queued:
        out["queue_s"] = scheduled - queued
    if scheduled and first >= scheduled:
        out["prefill_s"] = first - scheduled
    if first and last >= first:
        out["decode_s"] = last - first
    return out


# -- errors --------------------------------------------------------------------------------------

_CONTEXT_WORDS = ("maximum model length", "max_model_len", "maximum context length", "context length")


def request_error(exc: BaseException) -> VlmlabError:
    """vLLM's exception for one request -> vlmlab's (by class name, so vLLM need not be
    importable): validation errors are the client's (400, 429 for a full queue), the rest 500."""
    if isinstance(exc, VlmlabError):
        return exc
    names = {c.__name__ for c in type(exc).__mro__}
    message = str(exc) or type(exc).__name__
    if names & {"QueueOverflowError", "MaxQueuedTokensError"}:
        return OverloadedError(f"vLLM's queue is full: {message}")
    if names & {"VLLMValidationError", "VLLMClientError", "ValueError", "TypeError"}:
        if any(w in message.lower() for w in _CONTEXT_WORDS):
            return ContextLengthError(f"vLLM refused the request: {message}")
        return BadRequestError(f"vLLM refused the request: {message}")
    if "EngineDeadError" in names:
        return EngineError(f"the vLLM engine died: {message}")
    return EngineError(f"vLLM failed: {type(exc).__name__}: {message}")


def load_error(exc: BaseException, model: str) -> VlmlabError:
    """A failure while vLLM loads ``model`` -> vlmlab's error with the likely fix."""
    if isinstance(exc, VlmlabError):
        return exc
    message = str(exc) or type(exc).__name__
    low = message.lower()
    if isinstance(exc, OSError) or "repository not found" in low or "does not appear to have" in low:
        return NotFoundError(f"vLLM cannot find {model!r} ({message}); check the hub id / path and HF_HOME")
    if "out of memory" in low or "no available memory for the cache blocks" in low or "kv cache" in low:
        return EngineError(
            f"{model} does not fit on this GPU with these settings ({message}); lower --max-model-len, "
            "use --quantization fp8, or set extra gpu_memory_utilization"
        )
    if "trust_remote_code" in low:
        return ConfigError(f"{model} ships its own code: pass --trust-remote-code if you trust it ({message})")
    if isinstance(exc, ValueError | TypeError):
        return ConfigError(f"vLLM rejected the settings for {model}: {message}")
    return EngineError(f"vLLM failed to load {model}: {type(exc).__name__}: {message}")
