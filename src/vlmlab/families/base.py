"""The model-family record: every fact vlmlab knows about one family, as data in one place.

A family file (``families/<name>.py``) builds one :class:`Family` with its image-token rule, its
chat prompt format, its processor options and the known checkpoints, and registers it. Nothing
here loads a model or reads a file: planning works before any model is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmlab.protocol.core import Chat, ImagePart, TextPart
from vlmlab.protocol.errors import BadRequestError, ConfigError, UnknownOptionError

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}
DTYPE_ALIASES = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float": "fp32",
    "float8": "fp8",
    "4bit": "int4",
    "8bit": "int8",
    "awq": "int4",
    "gptq": "int4",
}


def canonical_dtype(dtype: str) -> str:
    """``"bfloat16"`` -> ``"bf16"``; raises ConfigError naming the valid dtypes."""
    key = dtype.strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ConfigError(
            f"unknown dtype {dtype!r}. Use one of: {', '.join(DTYPE_BYTES)}", param="dtype"
        )
    return key


class ImageSizeError(BadRequestError):
    """The reference implementation rejects this image size (e.g. Qwen aspect ratio > 200)."""


@dataclass(frozen=True)
class KVGeometry:
    """Language-model attention shape that sets the KV-cache cost of each prompt position."""

    layers: int
    kv_heads: int
    head_dim: int
    source: str  # which config file / fields the numbers come from

    def bytes_per_token(self, dtype: str = "bf16") -> int:
        """K and V, every layer: ``2 * layers * kv_heads * head_dim * bytes(dtype)``."""
        return int(2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[canonical_dtype(dtype)])


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint of a family.

    Attributes:
        hub_id: the Hugging Face repository id.
        params: total parameter count (vision tower + projector + language model).
        kv: the language model's KV geometry.
        max_model_len: context length the checkpoint is served with by default.
        source: where ``params`` and ``max_model_len`` come from.
        options: processor options this checkpoint ships that differ from the family default.
        aliases: other names users type for it.
    """

    hub_id: str
    params: int
    kv: KVGeometry
    max_model_len: int
    source: str
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def weight_bytes(self, dtype: str = "bf16") -> int:
        """Bytes of the weights at ``dtype`` (``int8`` / ``int4`` = weight-only quantization)."""
        return int(self.params * DTYPE_BYTES[canonical_dtype(dtype)])


@dataclass(frozen=True)
class ImageLayout:
    """What one image becomes in the prompt.

    Attributes:
        tokens: every prompt token the image adds (image, break, end, wrapper, newline tokens).
        vision_embedding_positions: how many of those positions receive vision features.
        resized: (width, height) of the pixels the vision encoder sees (the canvas, tiles joined).
        grid: (rows, cols) in the family's own grid unit (patches, crops, tiles or merged tokens).
        views: how many separate encoder views (tiles + thumbnail / global image).
    """

    tokens: int
    vision_embedding_positions: int
    resized: tuple[int, int]
    grid: tuple[int, int]
    views: int = 1

    @property
    def grid_text(self) -> str:
        return f"{self.grid[0]}x{self.grid[1]}"


@dataclass(frozen=True)
class OptionSpec:
    """A processor option a family understands (``num_crops``, ``max_pixels``, ...)."""

    name: str
    default: Any
    kind: type  # int, bool or str
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: int | None = None

    def coerce(self, value: Any) -> Any:
        """Turn a CLI string or JSON value into the option's type, or raise ConfigError."""
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    out: Any = lowered in ("true", "1", "yes")
                else:
                    out = bool(value)
            elif self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                out = int(value)
            else:
                out = str(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"option {self.name}={value!r} is not a valid {self.kind.__name__}", param=self.name
            ) from None
        if self.choices is not None and out not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise ConfigError(f"option {self.name}={out!r} must be one of {allowed}", param=self.name)
        if self.minimum is not None and out < self.minimum:
            raise ConfigError(
                f"option {self.name}={out!r} must be at least {self.minimum}", param=self.name
            )
        return out


LayoutRule = Callable[[int, int, Mapping[str, Any]], ImageLayout]
PromptRenderer = Callable[[Chat, bool], str]


@dataclass(frozen=True)
class Family:
    """Everything vlmlab knows about one VLM family.

    Attributes:
        name: canonical key (``pixtral``, ``qwen2_vl``, ...).
        display_name: for tables.
        model_types: Hugging Face ``config.json`` ``model_type`` values that mean this family.
        aliases: other accepted names (hub ids are added from ``checkpoints``).
        layout_rule: ``(width, height, options) -> ImageLayout`` for one image alone.
        render_prompt: ``(chat, add_generation_prompt) -> str`` in the official chat format, with
            the family's image placeholder text where each image goes.
        options: the processor options this family understands, with the checkpoint defaults.
        max_images: images per prompt the model was trained / is documented to take.
        image_placeholder: the text a prompt carries for one image before expansion.
        checkpoints: known checkpoints; the first is the default for planning.
        multi_image_rule: optional ``(sizes, options) -> per-image token counts`` where a prompt
            with several images is counted differently (LLaVA-OneVision drops anyres).
        source: the reference implementation the rule follows.
        splice_images: each image's processor output (expanded tokens and tensors) depends on
            that image alone, so an engine may process it once, cache it by content and splice
            it into any prompt. False where the expansion depends on the other images
            (LLaVA-OneVision drops anyres with several), the placeholder is numbered (Phi's
            ``<|image_1|>``) or tensors are laid out per prompt (Idefics).
        expand_placeholder: the text one image's placeholder becomes in the HF processor's
            prompt (e.g. Pixtral's ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` grid), where vlmlab can
            build the image's tokens itself; with :mod:`vlmlab.preprocess` that replaces the HF
            processor for images.
        image_tensor_dim: the dimension along which the processor stacks one prompt's images in
            its image tensors: 0 (one entry per image or per tile), 1 for Idefics3
            (``[prompts, tiles of all the prompt's images, ...]``).
    """

    name: str
    display_name: str
    model_types: tuple[str, ...]
    layout_rule: LayoutRule
    render_prompt_fn: PromptRenderer
    options: tuple[OptionSpec, ...]
    max_images: int
    image_placeholder: str
    checkpoints: tuple[Checkpoint, ...]
    source: str
    aliases: tuple[str, ...] = ()
    multi_image_rule: Callable[[Sequence[tuple[int, int]], Mapping[str, Any]], list[int]] | None = None
    splice_images: bool = True
    expand_placeholder: Callable[[ImageLayout], str] | None = None
    image_tensor_dim: int = 0

    # -- options -----------------------------------------------------------------------------

    @property
    def default_options(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def resolve_options(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``options``, each coerced to its type.

        Raises:
            UnknownOptionError: naming the option and listing the ones this family takes.
        """
        specs = {o.name: o for o in self.options}
        resolved = self.default_options
        for key, value in (options or {}).items():
            if key not in specs:
                valid = ", ".join(specs) or "none"
                raise UnknownOptionError(
                    f"unknown option {key!r} for model family {self.name!r}. Valid options: {valid}",
                    param=key,
                )
            resolved[key] = specs[key].coerce(value)
        return resolved

    # -- image tokens ------------------------------------------------------------------------

    def image_layout(self, width: int, height: int, **options: Any) -> ImageLayout:
        """The preprocessed size, grid and token count of one ``width`` x ``height`` image.

        Raises:
            BadRequestError: for non-positive sizes; ImageSizeError where the reference rejects
                the size; UnknownOptionError for an option this family does not take.
        """
        for label, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadRequestError(f"image {label} must be a positive integer, got {value!r}")
        return self.layout_rule(width, height, self.resolve_options(options))

    def image_tokens(self, width: int, height: int, **options: Any) -> int:
        """Every prompt token one image of this size adds, as the reference implementation."""
        return self.image_layout(width, height, **options).tokens

    def prompt_image_tokens(self, sizes: Sequence[tuple[int, int]], **options: Any) -> list[int]:
        """Token counts of each image when ``sizes`` appear together in one prompt."""
        if self.multi_image_rule is not None and len(sizes) > 1:
            for w, h in sizes:
                self.image_layout(w, h, **options)  # same validation as single images
            return self.multi_image_rule(sizes, self.resolve_options(options))
        return [self.image_tokens(w, h, **options) for w, h in sizes]

    # -- prompts -----------------------------------------------------------------------------

    def render_prompt(self, chat: Chat, add_generation_prompt: bool = True) -> str:
        """The chat as the model's official template renders it, one placeholder per image."""
        return self.render_prompt_fn(chat, add_generation_prompt)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, name: str | None = None) -> Checkpoint:
        """The checkpoint named ``name`` (hub id or alias), or the family's default."""
        if name is None:
            return self.checkpoints[0]
        key = name.strip().lower()
        for ckpt in self.checkpoints:
            if key in {ckpt.hub_id.lower(), *(a.lower() for a in ckpt.aliases)}:
                return ckpt
        known = ", ".join(c.hub_id for c in self.checkpoints)
        raise ConfigError(f"unknown checkpoint {name!r} for {self.name}. Known: {known}")

    def all_aliases(self) -> tuple[str, ...]:
        names: list[str] = [*self.model_types, *self.aliases]
        for ckpt in self.checkpoints:
            names += [ckpt.hub_id, *ckpt.aliases]
        return tuple(dict.fromkeys(n for n in names if n != self.name))


# -- helpers shared by prompt renderers ----------------------------------------------------------


def message_parts(chat: Chat) -> list[tuple[str, list[TextPart | ImagePart]]]:
    """(role, parts) per message, a small convenience for renderers."""
    return [(m.role, list(m.content)) for m in chat.messages]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
