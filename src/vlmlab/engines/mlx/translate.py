"""The MLX engine's translation layer: pure functions between vlmlab's types and mlx-vlm's.

Nothing here imports MLX, so the mappings are tested on any machine: which INT4 conversion a hub
id loads (:data:`PRESETS`), chat messages for ``mlx_vlm.prompt_utils.apply_chat_template``,
sampling keyword arguments for ``mlx_vlm.stream_generate``, stop strings (mlx-vlm stops on EOS
tokens only), finish reasons and the timings hidden in its per-step ``GenerationResult``
(``prompt_tps``, ``generation_tps``, ``peak_memory`` in GB).

Reference: mlx-vlm 0.7 ``mlx_vlm/generate/dispatch.py`` (``stream_generate``: one
``GenerationResult`` per token whose ``text`` is the new segment, the last one carrying
``finish_reason``), ``mlx_vlm/generate/common.py`` (``GenerationResult``),
``mlx_vlm/prompt_utils.py`` (``apply_chat_template``: list content with ``{"type": "image"}``
parts keeps images where they are).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlmlab.engines.quantization import spec_quantization
from vlmlab.families import FAMILIES, Family, get_family
from vlmlab.protocol.core import Chat, FinishReason, ImagePart, SamplingParams
from vlmlab.protocol.errors import ConfigError, VlmlabError

INSTALL_HINT = "mlx-vlm is not installed: pip install 'vlmlab[mlx]'"
NOT_APPLE_HINT = "MLX needs Apple Silicon (an M-series Mac); use --engine hf or --engine remote"


def unavailable_reason(system: str, machine: str, has_mlx_vlm: bool) -> str | None:
    """Why the MLX engine cannot run here, or None. ``system`` / ``machine`` are
    ``platform.system()`` / ``platform.machine()`` (``Darwin`` / ``arm64`` on Apple Silicon)."""
    if system != "Darwin" or machine != "arm64":
        return f"{NOT_APPLE_HINT} (this is {system} {machine})"
    if not has_mlx_vlm:
        return INSTALL_HINT
    return None


# -- checkpoints ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLXPreset:
    """An MLX conversion of a hub checkpoint.

    Attributes:
        repo: the MLX checkpoint loaded.
        source: the hub checkpoint it was converted from (its processor decides token counts).
        bits: weight bits of the conversion.
        trust_remote_code: its processor is the checkpoint's own code (Phi-3.5-vision's
            processing_phi3_v.py), which ``AutoProcessor`` runs only when allowed.
    """

    repo: str
    source: str
    bits: int = 4
    trust_remote_code: bool = False


# mlx-community's 4-bit conversions. Pixtral's is made from the transformers port (mlx-vlm reads
# config.json, not the native params.json), so its image tokens follow transformers' rule.
_PIXTRAL = MLXPreset("mlx-community/pixtral-12b-4bit", "mistral-community/pixtral-12b")
_PHI35 = MLXPreset("mlx-community/Phi-3.5-vision-instruct-4bit", "microsoft/Phi-3.5-vision-instruct", trust_remote_code=True)
_QWEN2_2B = MLXPreset("mlx-community/Qwen2-VL-2B-Instruct-4bit", "Qwen/Qwen2-VL-2B-Instruct")
_QWEN2_7B = MLXPreset("mlx-community/Qwen2-VL-7B-Instruct-4bit", "Qwen/Qwen2-VL-7B-Instruct")
PRESETS: dict[str, MLXPreset] = {
    "mistralai/pixtral-12b-2409": _PIXTRAL,
    "mistral-community/pixtral-12b": _PIXTRAL,
    "microsoft/phi-3.5-vision-instruct": _PHI35,
    "qwen/qwen2-vl-2b-instruct": _QWEN2_2B,
    "qwen/qwen2-vl-7b-instruct": _QWEN2_7B,
}
_BY_REPO = {p.repo.lower(): p for p in PRESETS.values()}
_INT4 = ("bnb-4bit", "int4", "4bit")


@dataclass(frozen=True)
class MLXCheckpoint:
    """What the MLX engine loads for a model name."""

    repo: str
    source: str  # hub checkpoint whose processor rules apply (== repo when not a preset)
    family: str | None
    bits: int | None = None
    trust_remote_code: bool = False


def resolve_checkpoint(model: str, extra: Mapping[str, Any]) -> MLXCheckpoint:
    """The MLX checkpoint for ``model``: a family name or a known hub id loads its INT4
    conversion; an mlx-community repo or a local path loads as it is.

    Raises:
        ConfigError: a ``quantization`` other than 4-bit (MLX checkpoints carry their own), or
            4-bit asked for a model without a known conversion.
    """
    quantization = spec_quantization(extra)
    if quantization is not None and quantization not in _INT4:
        raise ConfigError(
            f"the mlx engine loads MLX checkpoints quantized as they were converted; --quantization "
            f"{quantization!r} does not apply (4bit picks a known INT4 conversion)",
            param="quantization",
        )
    family_hint = None
    key = model.strip()
    if "/" not in key and key in FAMILIES:
        family = FAMILIES.get(key)
        family_hint = family.name
        key = family.checkpoint().hub_id
    preset = PRESETS.get(key.lower())
    if preset is not None:
        return MLXCheckpoint(preset.repo, preset.source, family_hint or _family_name(preset.source), preset.bits, preset.trust_remote_code)
    converted = _BY_REPO.get(key.lower())
    if converted is not None:
        return MLXCheckpoint(converted.repo, converted.source, _family_name(converted.source), converted.bits, converted.trust_remote_code)
    if quantization is not None:
        known = ", ".join(sorted({p.source for p in PRESETS.values()}))
        raise ConfigError(f"no known INT4 MLX conversion of {model!r}; pass an mlx-community repo, or one of: {known}")
    return MLXCheckpoint(key, key, family_hint or _family_name(key))


def _family_name(model: str) -> str | None:
    try:
        return get_family(model).name
    except VlmlabError:
        return None


def checkpoint_options(family: Family | None, source: str) -> dict[str, Any]:
    """The processor options the checkpoint's own processor runs with (mlx-vlm does not take
    per-request processor options): the family defaults with the checkpoint's overrides."""
    if family is None:
        return {}
    try:
        own = dict(family.checkpoint(source).options)
    except VlmlabError:
        own = {}
    return family.resolve_options(own)


def check_options(family: Family | None, source: str, options: Mapping[str, Any], where: str) -> None:
    """Raises ConfigError when ``options`` ask for processing other than the checkpoint's own."""
    if not options:
        return
    wanted = family.resolve_options(options) if family is not None else dict(options)
    fixed = checkpoint_options(family, source)
    changed = {k: v for k, v in wanted.items() if fixed.get(k) != v}
    if changed or family is None:
        raise ConfigError(
            f"the mlx engine runs the checkpoint's processor as configured ({fixed or 'its defaults'}); "
            f"{where} asks for {dict(options)}. Drop the option, or use --engine hf / vllm"
        )


# -- requests ------------------------------------------------------------------------------------


def mlx_messages(chat: Chat) -> list[dict[str, Any]]:
    """Core chat -> messages for ``apply_chat_template``: ordered ``{"type": "image"}`` /
    ``{"type": "text"}`` parts where a message holds images, plain strings otherwise (the
    pixels travel separately, in prompt order)."""
    out: list[dict[str, Any]] = []
    for message in chat.messages:
        if not message.images:
            out.append({"role": message.role, "content": message.text})
            continue
        parts = [{"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in message.content]
        out.append({"role": message.role, "content": parts})
    return out


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """``stream_generate`` keyword arguments (mlx-vlm's ``GenerateKwargs``). Temperature 0 is
    greedy there too; top_k and seed are passed only when set."""
    kwargs: dict[str, Any] = {"max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.top_k > 0:
        kwargs["top_k"] = sampling.top_k
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    return kwargs


def finish_reason(mlx_reason: str | None, stopped_by_text: bool, cancelled: bool) -> FinishReason:
    """mlx-vlm's ``finish_reason`` (``stop`` at EOS, ``length`` at max_tokens) with vlmlab's
    own stop strings and cancellation."""
    if cancelled:
        return "abort"
    if stopped_by_text:
        return "stop"
    return "length" if mlx_reason == "length" else "stop"


@dataclass
class StepFigures:
    """mlx-vlm's running figures from its last ``GenerationResult``."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def timings(self) -> dict[str, Any]:
        """``Timings`` fields: prefill from the prompt rate, decode from the generation rate
        (mlx-vlm times generation from its first token), peak memory in bytes (mlx-vlm divides
        ``mx.get_peak_memory()`` by 1e9)."""
        out: dict[str, Any] = {}
        if self.prompt_tps > 0:
            out["prefill_s"] = self.prompt_tokens / self.prompt_tps
        if self.generation_tps > 0 and self.generation_tokens:
            out["decode_s"] = self.generation_tokens / self.generation_tps
        if self.peak_memory_gb > 0:
            out["peak_memory_bytes"] = int(self.peak_memory_gb * 1e9)
        return out
