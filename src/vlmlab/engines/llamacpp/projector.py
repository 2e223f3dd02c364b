"""The GGUF vision projector (``mmproj``): what vlmlab reads from it, and the check of the image
embeddings llama.cpp computes with it.

Why the check exists: llama.cpp's Pixtral graph (``tools/mtmd/models/pixtral.cpp`` in
llama-cpp-python 0.3.36) builds the ``[IMG_BREAK]`` rows as ``ggml_scale(new_tensor, 0.0)``
plus the ``v.token_embd.img_break`` row. Nothing writes ``new_tensor``: it holds whatever bytes
the compute buffer held. ``0 * x`` clears finite leftovers but not NaN or infinity
(``0 * inf`` is NaN), so those rows came out NaN, every logit was NaN, and the answer was empty or
garbage. ggml's CPU buffers come from ``malloc``. A fresh process hands out zeroed pages, but
once glibc reuses freed memory (it does after large blocks are freed, which torch does all the
time) the buffer holds stale bytes. That was the "llamacpp answers garbage after
tests/test_engine_archs.py" bug, and a second copy's contexts could hit it too.

The correct value of every such row is the ``img_break`` row itself, so a row that is non-finite
exactly where its finite values equal that row is replaced by it: bit-exact with a clean buffer.
Any other non-finite embedding is an error rather than a garbage answer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.protocol.errors import EngineError

# The tensor llama.cpp's clip loader reads as the [IMG_BREAK] embedding (TN_TOK_IMG_BREAK in
# tools/mtmd/clip-impl.h), written by convert_hf_to_gguf.py for Pixtral-style projectors.
IMG_BREAK_TENSOR = "v.token_embd.img_break"


@dataclasses.dataclass(frozen=True)
class Projector:
    """What the engine needs from an mmproj file.

    Attributes:
        projector_type: ``clip.projector_type`` ("pixtral", "qwen2vl_merger", ...), None if unknown.
        img_break: the ``[IMG_BREAK]`` embedding row as float32, None where the projector has none.
    """

    projector_type: str | None = None
    img_break: Any = None


def read_projector(mmproj: Path | None) -> Projector:
    """Read ``mmproj``'s projector type and ``[IMG_BREAK]`` row with the ``gguf`` package.

    Returns an empty :class:`Projector` when there is no file or ``gguf`` is not installed (then
    no family is detected from the projector, and non-finite embeddings are refused unrepaired).
    """
    if mmproj is None:
        return Projector()
    try:
        from gguf import GGUFReader
    except ImportError:
        return Projector()
    reader = GGUFReader(str(mmproj))
    field = reader.fields.get("clip.projector_type")
    img_break = None
    for tensor in reader.tensors:
        # Only plain float rows: their float32 values are exactly what ggml adds.
        if tensor.name == IMG_BREAK_TENSOR and tensor.data.dtype in (np.float32, np.float16):
            img_break = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return Projector(str(field.contents()) if field is not None else None, img_break)


def repair_image_embeddings(embeddings: Any, img_break: Any) -> int:
    """Check one image's embeddings ``[n_tokens, n_embd]`` (float32, changed in place) before
    they are decoded: rows that are the ``img_break`` row spoiled by stale NaN / inf bytes get
    the row back.

    Returns:
        How many rows were repaired (0 when every value is finite: the usual case).

    Raises:
        EngineError: non-finite values that are not a spoiled ``[IMG_BREAK]`` row.
    """
    finite = np.isfinite(embeddings)
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    if not len(bad_rows):
        return 0
    repaired = 0
    if img_break is not None and img_break.shape == embeddings.shape[1:]:
        for row in bad_rows:
            kept = finite[row]
            if np.array_equal(embeddings[row, kept], img_break[kept]):
                embeddings[row] = img_break
                repaired += 1
    if repaired < len(bad_rows):
        raise EngineError(
            f"llama.cpp's image encoder returned non-finite embeddings in {len(bad_rows) - repaired} of "
            f"{embeddings.shape[0]} image tokens; the projector or its weights are broken"
        )
    return repaired
