"""Qwen2-VL / Qwen2.5-VL: smart_resize, normalize, patchify into ``[n_patches, 1176]``.

Reference: transformers ``models/qwen2_vl/image_processing_qwen2_vl.py``
(``Qwen2VLImageProcessor``: ``resize`` with ``smart_resize``, ``rescale_and_normalize``,
``patchify``) and ``image_processing_pil_qwen2_vl.py`` (``Qwen2VLImageProcessorPil``, which
rescales in float64 and patchifies with numpy). ``variant="qwen_vl_utils"`` first resizes as
qwen-vl-utils 0.0.14 ``fetch_image`` does (``PIL.Image.resize`` with its default bicubic filter)
and then runs the processor on that image.

``pixel_values`` rows are patches in the processor's order: merged 2x2 groups row-major, the 4
patches of a group row-major, each row ``(channel, temporal, 14, 14)`` flattened, the single
frame repeated ``temporal_patch_size`` = 2 times. ``image_grid_thw`` is ``[[1, h/14, w/14]]``.

The reference normalizes the whole float image, permutes it into patch order (a full float
copy) and then expands the temporal axis (a second one). Here the permutation is done on the
uint8 pixels (a quarter of the bytes) and one broadcast multiply writes both temporal copies of
every patch, already normalized.

Values: ``vlmlab.families.qwen2_vl`` (patch 14, merge 2, min/max pixels from the checkpoints'
``preprocessor_config.json``); statistics from that file (``image_mean`` / ``image_std`` = the
OpenAI CLIP values, ``temporal_patch_size`` 2, ``resample`` 3 = bicubic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vlmlab.families.qwen2_vl import MERGE, PATCH, hf_smart_resize, qwen_vl_utils_smart_resize
from vlmlab.preprocess.core import HF_BACKENDS, Context, Pipeline
from vlmlab.preprocess.kernels import Normalization, Pixels, output_array, resize

# Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct preprocessor_config.json.
QWEN_NORM = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TEMPORAL_PATCH = 2  # preprocessor_config.json temporal_patch_size


def _sizes(
    width: int, height: int, options: Mapping[str, Any]
) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """(qwen-vl-utils pre-resize or None, processor resize), each (width, height)."""
    lo, hi = options["min_pixels"], options["max_pixels"]
    if options["variant"] == "qwen_vl_utils":
        h1, w1 = qwen_vl_utils_smart_resize(height, width, min_pixels=lo, max_pixels=hi)
        h2, w2 = hf_smart_resize(h1, w1, min_pixels=lo, max_pixels=hi)
        return (w1, h1), (w2, h2)
    h2, w2 = hf_smart_resize(height, width, min_pixels=lo, max_pixels=hi)
    return None, (w2, h2)


def patchify_normalized(
    hwc: np.ndarray,
    norm: Normalization,
    patch: int = PATCH,
    merge: int = MERGE,
    temporal: int = TEMPORAL_PATCH,
) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(H/p * W/p, 3 * temporal * p * p)`` normalized float32 rows."""
    height, width, channels = hwc.shape
    gh, gw = height // patch, width // patch
    # (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): the processor's patch order.
    blocks = hwc.reshape(gh // merge, merge, patch, gw // merge, merge, patch, channels)
    ordered = np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 6, 2, 5)).reshape(
        gh * gw, channels, 1, patch * patch
    )
    out = output_array((gh * gw, channels, temporal, patch * patch))
    # Broadcasting over the temporal axis writes both copies of a frame in the same pass.
    np.multiply(ordered, norm.scale.reshape(1, channels, 1, 1), out=out, dtype=np.float32)
    out += norm.offset.reshape(1, channels, 1, 1)
    return out.reshape(gh * gw, channels * temporal * patch * patch)


def _run(
    pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
) -> dict[str, np.ndarray]:
    pre, target = _sizes(*size, options)
    if pre is not None:
        with ctx.stage("resize"):
            # qwen-vl-utils resizes with PIL whatever processor backend follows (exact mode).
            engine = ctx.engine if ctx.mode == "fast" else "pil"
            pixels = resize(pixels, pre, "bicubic", engine)
    hwc = ctx.hwc(ctx.resize(pixels, target, "bicubic"))
    with ctx.stage("normalize"):
        values = patchify_normalized(hwc, QWEN_NORM)
    with ctx.stage("to_tensor"):
        grid = np.array([[1, target[1] // PATCH, target[0] // PATCH]], dtype=np.int64)
    return {"pixel_values": values, "image_grid_thw": grid}


def _targets(width: int, height: int, options: Mapping[str, Any]) -> list[tuple[int, int]]:
    pre, target = _sizes(width, height, options)
    return [pre or target]


QWEN = Pipeline(
    run=_run,
    source_targets=_targets,
    norm=QWEN_NORM,
    backends=lambda options: HF_BACKENDS,
    reference=(
        "transformers Qwen2VLImageProcessor(Pil) "
        "(+ qwen-vl-utils fetch_image for variant=qwen_vl_utils)"
    ),
)
