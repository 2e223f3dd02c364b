"""Model families: image-token rules, chat prompt formats and known checkpoints.

``get_family(name)`` accepts the canonical name (``pixtral``), an HF ``model_type``
(``qwen2_5_vl``) or a well-known hub id (``Qwen/Qwen2.5-VL-7B-Instruct``). Family modules are
pure Python (no torch), so importing them all is cheap.
"""

from __future__ import annotations

import importlib

from vlmlab.families.base import (
    Checkpoint,
    Family,
    ImageLayout,
    ImageSizeError,
    KVGeometry,
    OptionSpec,
    canonical_dtype,
)
from vlmlab.registry import Registry

# One module per family, in the order tables list them.
_FAMILY_MODULES = (
    "pixtral",
    "phi3_5_vision",
    "phi3_vision",
    "qwen2_vl",
    "qwen2_5_vl",
    "llava_next",
    "llava_onevision",
    "internvl2",
    "idefics2",
    "idefics3",
    "nano",
)

FAMILIES: Registry[Family] = Registry("model family")

for _module in _FAMILY_MODULES:
    _family: Family = importlib.import_module(f"vlmlab.families.{_module}").FAMILY
    FAMILIES.register(_family.name, _family, aliases=_family.all_aliases())


def get_family(name: str) -> Family:
    """The family for a name, ``model_type`` or hub id.

    Raises:
        NotFoundError: naming ``name`` and listing the valid family names.
    """
    return FAMILIES.get(name)


def family_names() -> list[str]:
    return FAMILIES.names()


__all__ = [
    "FAMILIES",
    "Checkpoint",
    "Family",
    "ImageLayout",
    "ImageSizeError",
    "KVGeometry",
    "OptionSpec",
    "canonical_dtype",
    "family_names",
    "get_family",
]
