"""Fast, exact image preprocessing for the model families vlmlab knows.

``get_preprocessor(family, mode="exact", **options)(image)`` and
``preprocess_bytes(data, family, mode, **options)`` return a :class:`Preprocessed` with the
model's tensors (numpy), the family's image layout and per-stage seconds; ``PreprocessPool``
runs the same in worker processes. See :mod:`vlmlab.preprocess.core` for the modes and
references.
"""

from __future__ import annotations

from vlmlab.preprocess.core import (
    MODES,
    PIPELINES,
    Preprocessed,
    Preprocessor,
    get_preprocessor,
    preprocess_bytes,
)
from vlmlab.preprocess.kernels import psnr
from vlmlab.preprocess.pool import PreprocessPool

__all__ = [
    "MODES",
    "PIPELINES",
    "PreprocessPool",
    "Preprocessed",
    "Preprocessor",
    "get_preprocessor",
    "preprocess_bytes",
    "psnr",
]
