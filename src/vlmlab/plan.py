"""Token and memory arithmetic over model families: what an image costs before any model loads.

Pure functions, no I/O: the CLI reads image headers and passes sizes in.

Memory model (stated so users can check it): weights = parameters x bytes per weight; the KV cache
holds K and V for every prompt and generated position, ``2 x layers x kv_heads x head_dim x
bytes`` per token; the GPU budget is ``gpu_mem x utilization`` (vLLM's
``--gpu-memory-utilization`` default 0.9) minus the weights. Activations, the vision encoder's
workspace and CUDA graphs are not modelled, so concurrency is an upper bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmlab.families import FAMILIES, Family, canonical_dtype, get_family
from vlmlab.protocol.errors import BadRequestError, ConfigError
from vlmlab.units import format_bytes, parse_bytes, parse_size

__all__ = ["PlanInput", "PlanRow", "format_bytes", "parse_bytes", "parse_size", "plan", "plan_family"]

DEFAULT_GPU_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default

@dataclass(frozen=True)
class PlanInput:
    """What to plan for.

    Attributes:
        images: (width, height) of each image in one request.
        options: processor options (``num_crops``, ``max_pixels``...); for ``--model all`` an
            option only applies to the families that take it.
        prompt_tokens: text tokens of the prompt besides the images.
        max_tokens: tokens to generate.
        max_model_len: context to plan for; default: the checkpoint's.
        gpu_mem: GPU memory in bytes, or None to skip the GPU fit.
        dtype: weight dtype (``bf16``, ``fp8``, ``int4``...); the KV cache uses ``kv_dtype``.
    """

    images: Sequence[tuple[int, int]]
    options: Mapping[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 64
    max_tokens: int = 256
    max_model_len: int | None = None
    gpu_mem: int | None = None
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    gpu_utilization: float = DEFAULT_GPU_UTILIZATION


@dataclass(frozen=True)
class PlanRow:
    """The plan for one family / checkpoint. ``error`` is set when the family rejects the input."""

    family: str
    display_name: str
    checkpoint: str
    image_tokens: tuple[int, ...] = ()
    grids: tuple[str, ...] = ()
    prompt_tokens: int = 0
    request_tokens: int = 0
    kv_bytes_per_token: int = 0
    kv_bytes_per_request: int = 0
    weight_bytes: int = 0
    max_model_len: int = 0
    max_images: int = 0
    fits_context: bool = False
    fits_gpu: bool | None = None
    concurrent_requests: int | None = None
    error: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def plan_family(family: Family | str, spec: PlanInput, checkpoint: str | None = None) -> PlanRow:
    """Image tokens, context and memory of one request on one family's checkpoint."""
    fam = get_family(family) if isinstance(family, str) else family
    ckpt = fam.checkpoint(checkpoint)
    valid = {o.name for o in fam.options}
    options = {**ckpt.options, **{k: v for k, v in spec.options.items() if k in valid}}
    notes = [f"option {k} not used by {fam.name}" for k in spec.options if k not in valid]
    base = dict(
        family=fam.name,
        display_name=fam.display_name,
        checkpoint=ckpt.hub_id,
        max_images=fam.max_images,
        weight_bytes=ckpt.weight_bytes(spec.dtype),
        kv_bytes_per_token=ckpt.kv.bytes_per_token(spec.kv_dtype),
        max_model_len=spec.max_model_len or ckpt.max_model_len,
    )
    try:
        per_image = fam.prompt_image_tokens(list(spec.images), **options)
        layouts = [fam.image_layout(w, h, **options) for w, h in spec.images]
    except BadRequestError as exc:
        return PlanRow(**base, error=exc.message, notes=tuple(notes))  # type: ignore[arg-type]
    if len(spec.images) > fam.max_images:
        notes.append(f"{len(spec.images)} images exceed the {fam.max_images} this model takes")
    prompt = spec.prompt_tokens + sum(per_image)
    request = prompt + spec.max_tokens
    kv_request = request * base["kv_bytes_per_token"]  # type: ignore[operator]
    fits_gpu = concurrent = None
    if spec.gpu_mem is not None:
        free = spec.gpu_mem * spec.gpu_utilization - base["weight_bytes"]  # type: ignore[operator]
        concurrent = max(0, int(free // kv_request)) if kv_request else 0
        fits_gpu = concurrent >= 1
    return PlanRow(
        **base,  # type: ignore[arg-type]
        image_tokens=tuple(per_image),
        grids=tuple(layout.grid_text for layout in layouts),
        prompt_tokens=prompt,
        request_tokens=request,
        kv_bytes_per_request=kv_request,
        fits_context=request <= base["max_model_len"],  # type: ignore[operator]
        fits_gpu=fits_gpu,
        concurrent_requests=concurrent,
        notes=tuple(notes),
    )


def plan(models: Sequence[str], spec: PlanInput) -> list[PlanRow]:
    """One row per model; ``"all"`` expands to every registered family's default checkpoint.

    A hub id selects that checkpoint of its family; a family name its default checkpoint.

    Raises:
        NotFoundError: for an unknown model name (listing the valid ones).
        UnknownOptionError: when a single named model does not take one of ``spec.options``.
    """
    canonical_dtype(spec.dtype)
    canonical_dtype(spec.kv_dtype)
    if spec.prompt_tokens < 0 or spec.max_tokens < 0:
        raise ConfigError("--prompt-tokens and --max-tokens must not be negative")
    rows = []
    names = list(FAMILIES.names()) if any(m.lower() == "all" for m in models) else list(models)
    for name in names:
        fam = get_family(name)
        if name.lower() != "all" and len(names) == 1:
            fam.resolve_options(spec.options)  # a single named model: unknown options are errors
        checkpoint = name if "/" in name else None
        rows.append(plan_family(fam, spec, checkpoint))
    return rows
