"""Settings objects shared by the CLI, the server and the eval runner.

Environment variables use the ``VLMLAB_`` prefix (``VLMLAB_API_KEY``, ...); the CLI turns flags
into these objects and library code only ever sees the objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmlab.protocol.errors import ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class EngineSpec:
    """What to load and how.

    Attributes:
        model: ``nano``, a family preset name (``qwen2_vl``), a hub id or a local checkpoint path.
        engine: backend name (``hf``, ``vllm``, ``mlx``, ``remote``).
        device, dtype: where and at which precision to run (``auto`` picks per machine).
        trust_remote_code: allow the checkpoint's own Python code (Phi-3.5-vision needs it).
        revision: hub revision (branch, tag or commit).
        max_batch_size: requests decoded together.
        max_model_len: context limit to enforce; default: the model's.
        processor_options: defaults for the processor (``num_crops``, ``max_pixels``...).
        preprocess_cache_bytes: budget of the content-addressed cache of processed images
            (0 turns it off).
        extra: backend-specific settings (vLLM's ``tokenizer_mode``, remote ``base_url``...).
    """

    model: str = "nano"
    engine: str = "hf"
    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    max_batch_size: int = 16
    max_model_len: int | None = None
    processor_options: Mapping[str, Any] = field(default_factory=dict)
    preprocess_cache_bytes: int = 256 * 2**20
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or mps")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"unknown dtype {self.dtype!r}; use auto, bf16, fp16 or fp32")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
