"""Weight quantization: one table of the methods vlmlab names, and what each means per backend.

``--quantization NAME`` (or ``--load-in-4bit`` / ``--load-in-8bit``) lands in
``EngineSpec.extra["quantization"]``. Each engine asks this module what the name means for it:

* vLLM (:func:`vllm_quantization`): the value of vLLM's ``quantization`` engine argument
  (``fp8``, ``awq``, ``gptq``, ``bitsandbytes``; other names vLLM knows pass through unchanged
  and vLLM itself validates them).
* transformers (:func:`hf_quantization`): bitsandbytes 4-bit NF4 / 8-bit LLM.int8() on CUDA
  through a ``BitsAndBytesConfig`` handed to ``from_pretrained``, or torchao int8 weight-only
  (``quantize_(model, Int8WeightOnlyConfig())``) on any device after loading.
* ``vlmlab plan`` (:func:`plan_dtype`): the weight dtype whose bytes per parameter the planner
  uses (``int4`` for AWQ/GPTQ/NF4, ``int8``, ``fp8``).

The table is pure data; torch, bitsandbytes and torchao are imported only by the hf helpers.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlmlab.protocol.errors import ConfigError, EngineUnavailableError


class _TorchaoEnumNotice(logging.Filter):
    """Drops one deprecation notice: torchao (0.18) registers its Enums as pytree constants,
    which torch >= 2.14 warns about at import; transformers imports torchao whenever it is
    installed (quantizer_torchao.py), so every model load would print it twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now natively supported by torch.compile" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())


@dataclass(frozen=True)
class QuantMethod:
    """One quantization method as vlmlab names it.

    Attributes:
        name: canonical name (``--quantization`` value).
        weight_dtype: bytes-per-weight class for ``vlmlab plan`` (``int4``, ``int8``, ``fp8``).
        vllm: value of vLLM's ``quantization`` argument, or None when vLLM has no such option.
        hf: how the transformers engine applies it (``bnb-4bit``, ``bnb-8bit``, ``int8``), or
            None when it does not (pre-quantized checkpoints load as they are).
        help: one line for ``--help`` and error messages.
    """

    name: str
    weight_dtype: str
    vllm: str | None
    hf: str | None
    help: str


METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in (
        # vLLM quantizes bf16 weights to FP8 while loading (docs: "Dynamic quantization ... no
        # calibration data is required", --quantization fp8); needs an Ada / Hopper GPU.
        QuantMethod("fp8", "fp8", "fp8", None, "FP8 weights quantized while loading (vLLM, Ada/Hopper GPUs)"),
        # AWQ and GPTQ are INT4 checkpoints (group size 128): the weights ship quantized.
        QuantMethod("awq", "int4", "awq", None, "an AWQ INT4 checkpoint (vLLM; transformers reads it from config.json)"),
        QuantMethod("gptq", "int4", "gptq", None, "a GPTQ INT4 checkpoint (vLLM; transformers reads it from config.json)"),
        # vLLM's in-flight bitsandbytes quantization is 4-bit NF4 (docs "BitsAndBytes":
        # "--quantization bitsandbytes" quantizes a bf16 checkpoint while loading).
        QuantMethod("bitsandbytes", "int4", "bitsandbytes", "bnb-4bit", "bitsandbytes NF4, quantized while loading"),
        QuantMethod("bnb-4bit", "int4", "bitsandbytes", "bnb-4bit", "bitsandbytes NF4 on CUDA (= --load-in-4bit)"),
        QuantMethod("bnb-8bit", "int8", None, "bnb-8bit", "bitsandbytes LLM.int8() on CUDA (= --load-in-8bit; hf only)"),
        QuantMethod("int8", "int8", None, "int8", "torchao int8 weight-only, any device (hf only)"),
    )
}
ALIASES = {
    "4bit": "bnb-4bit",
    "nf4": "bnb-4bit",
    "load-in-4bit": "bnb-4bit",
    "8bit": "bnb-8bit",
    "load-in-8bit": "bnb-8bit",
    "llm.int8": "bnb-8bit",
    "int8-weight-only": "int8",
    "int8_weight_only": "int8",
}


def canonical_quantization(name: str) -> str:
    """The canonical spelling of a quantization name (case, aliases and ``_`` vs ``-`` folded);
    names vlmlab does not know come back stripped and lower-cased (vLLM has many more)."""
    key = name.strip().lower()
    for candidate in (key, key.replace("_", "-")):
        if candidate in METHODS:
            return candidate
        if candidate in ALIASES:
            return ALIASES[candidate]
    return key


def known_names() -> str:
    return ", ".join(METHODS)


def from_flags(quantization: str | None, load_in_4bit: bool = False, load_in_8bit: bool = False) -> str | None:
    """The one quantization the CLI flags ask for, or None.

    Raises:
        ConfigError: two flags ask for different methods.
    """
    asked = [q for q in (quantization and canonical_quantization(quantization),
                         "bnb-4bit" if load_in_4bit else None, "bnb-8bit" if load_in_8bit else None) if q]  # fmt: skip
    if len(set(asked)) > 1:
        raise ConfigError(
            f"conflicting quantization flags ({', '.join(asked)}); pass one of --quantization, "
            "--load-in-4bit, --load-in-8bit"
        )
    return asked[0] if asked else None


def spec_quantization(extra: Mapping[str, Any]) -> str | None:
    """``extra["quantization"]`` in canonical form, or None (``""`` / ``"none"`` mean none)."""
    value = extra.get("quantization")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"quantization must be a name such as {known_names()}, got {value!r}")
    name = canonical_quantization(value)
    return None if name in ("", "none") else name


def plan_dtype(name: str) -> str:
    """The weight dtype ``vlmlab plan`` prices a quantization method at.

    Raises:
        ConfigError: naming the method and listing the known ones.
    """
    method = METHODS.get(canonical_quantization(name))
    if method is None:
        raise ConfigError(f"unknown quantization {name!r} for planning. Known: {known_names()}", param="quantization")
    return method.weight_dtype


def vllm_quantization(name: str) -> str:
    """The value for vLLM's ``quantization`` argument.

    Raises:
        ConfigError: the method is one vLLM does not offer (``bnb-8bit``, ``int8``).
    """
    canonical = canonical_quantization(name)
    method = METHODS.get(canonical)
    if method is None:
        return canonical  # one of vLLM's own methods (compressed-tensors, gguf, ...): vLLM checks it
    if method.vllm is None:
        raise ConfigError(
            f"quantization {name!r} is not a vLLM option ({method.help}); with vLLM use fp8, awq, gptq "
            "or bitsandbytes, or run --engine hf",
            param="quantization",
        )
    return method.vllm


# -- transformers -------------------------------------------------------------------------------


@dataclass
class HFQuantization:
    """How the transformers engine loads one model: extra ``from_pretrained`` arguments before,
    and an in-place weight rewrite after.

    Attributes:
        method: ``bnb-4bit``, ``bnb-8bit``, ``int8`` or None.
        load_kwargs: merged into the model's ``from_pretrained`` call (``quantization_config``
            and ``device_map``: bitsandbytes places the weights itself, so the engine must not
            call ``model.to(device)`` when this is non-empty).
    """

    method: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def places_weights(self) -> bool:
        return "device_map" in self.load_kwargs

    def label(self, dtype: str) -> str:
        """``fp32`` -> ``fp32+int8`` (what :meth:`EngineInfo.dtype` reports)."""
        return f"{dtype}+{self.method}" if self.method else dtype

    def finish(self, model: Any) -> Any:
        """Apply post-load quantization (torchao int8) in place; returns the model."""
        if self.method == "int8":
            quantize_int8_weight_only(model)
        return model


def hf_quantization(extra: Mapping[str, Any], device: str, torch_dtype: Any) -> HFQuantization:
    """What ``extra["quantization"]`` means for the transformers engine on ``device``.

    Raises:
        ConfigError: a method the hf engine does not apply, or bitsandbytes off CUDA.
        EngineUnavailableError: bitsandbytes / torchao is not installed.
    """
    name = spec_quantization(extra)
    if name is None:
        return HFQuantization()
    method = METHODS.get(name)
    if method is None or method.hf is None:
        what = method.help if method else "not a method the hf engine knows"
        raise ConfigError(
            f"quantization {name!r} is not applied by the hf engine ({what}). With --engine hf use "
            "bnb-4bit / bnb-8bit (CUDA) or int8 (any device); pre-quantized AWQ/GPTQ checkpoints "
            "load as they are without --quantization",
            param="quantization",
        )
    if method.hf in ("bnb-4bit", "bnb-8bit"):
        if not device.startswith("cuda"):
            raise ConfigError(
                f"{method.hf} (bitsandbytes) needs a CUDA GPU, and this engine runs on {device}; "
                "on the CPU use --quantization int8"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise EngineUnavailableError("bitsandbytes is not installed: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        if method.hf == "bnb-4bit":
            # NF4 with the compute dtype of the unquantized layers (QLoRA paper's recipe; the
            # transformers bitsandbytes docs' "NF4 ... bnb_4bit_compute_dtype" example).
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        return HFQuantization(method.hf, {"quantization_config": config, "device_map": {"": device}})
    if importlib.util.find_spec("torchao") is None:
        raise EngineUnavailableError("torchao is not installed (int8 weight-only quantization): pip install torchao")
    return HFQuantization("int8")


def quantize_int8_weight_only(model: Any) -> int:
    """Replace the weights of ``model``'s linear layers by int8 (per-channel scales) in place,
    with torchao; returns how many layers were converted.

    A linear layer whose weight is shared with an embedding (a tied ``lm_head``) stays as it is:
    quantizing it would add an int8 copy next to the full-precision embedding instead of saving
    memory.
    """
    import torch
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Int8WeightOnlyConfig

        config: Any = Int8WeightOnlyConfig()
    except ImportError:  # torchao < 0.10 spelled it as a function
        from torchao.quantization import int8_weight_only

        config = int8_weight_only()
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    converted = 0

    def wanted(module: Any, fqn: str) -> bool:
        nonlocal converted
        ok = isinstance(module, torch.nn.Linear) and id(module.weight) not in shared
        converted += ok
        return ok

    quantize_(model, config, filter_fn=wanted)
    return converted


def tensor_bytes(tensor: Any) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao keeps int8 data and
    scales as inner tensors; ``element_size`` of the wrapper would report the outer dtype)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel() * tensor.element_size())


def weight_bytes(model: Any) -> int:
    """Bytes of ``model``'s parameters, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += tensor_bytes(param.data if hasattr(param, "data") else param)
    return total
