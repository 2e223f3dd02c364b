"""Phi-3-vision / Phi-3.5-vision: the HD transform into 336 px crops plus a global view.

Reference: the checkpoints' remote code ``image_processing_phi3_v.py``
(``Phi3VImageProcessor.preprocess``), which cannot be downloaded here; these are its steps:

1. ``HD_transform``: transpose portrait images (``Image.TRANSPOSE``); ``scale`` = the largest
   ``s`` with ``s * ceil(s / ratio) <= num_crops``; resize to ``new_w = 336*s`` by
   ``new_h = int(new_w / ratio)`` with ``torchvision.transforms.functional.resize`` on the PIL
   image (default BILINEAR, i.e. PIL's antialiased bilinear); ``padding_336`` pads the height
   to a multiple of 336 with white, ``int(pad / 2)`` on top; transpose back.
2. ``ToTensor`` + ``Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)`` of that canvas.
3. The global view: ``F.interpolate(canvas, (336, 336), mode="bicubic")`` of the *normalized*
   canvas (no antialiasing, align_corners False).
4. ``pixel_values`` = [global, crops row-major...] zero-padded to ``num_crops + 1`` views:
   shape (1, num_crops + 1, 3, 336, 336); ``image_sizes`` [[H, W]] of the canvas;
   ``num_img_tokens`` [(rows*cols + 1)*144 + 1 + (rows + 1)*12].

Where it differs in cost, not in result: the canvas is built in uint8 (white fill, one paste)
and normalized once, crops are written straight into their output slots, the global view is
the same ``F.interpolate`` call (a 4-tap numpy bicubic without torch), and nothing goes through
``ToTensor`` / ``torch.cat`` / padding copies. Portrait images are still transposed at full
resolution in exact mode (see ``_run``).

Geometry from :mod:`vlmlab.families.phi3_vision` (``hd_scale``, ``hd_canvas``,
``tokens_for_canvas``; crop 336, ``num_crops`` 4 for Phi-3.5 / 16 for Phi-3 from the checkpoints'
``preprocessor_config.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from vlmlab.families import ImageSizeError
from vlmlab.families.phi3_vision import CROP, hd_canvas, hd_scale, tokens_for_canvas
from vlmlab.preprocess.core import Context, Pipeline
from vlmlab.preprocess.kernels import (
    Normalization,
    Pixels,
    cubic_resize_planes,
    normalize_into,
    output_array,
)

# image_processing_phi3_v.py Phi3VImageProcessor defaults: OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
CLIP = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
WHITE = 255  # padding_336 fill [255, 255, 255]


def hd_resized(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) of the resized image before padding, in the original orientation.

    Raises:
        ImageSizeError: the short side truncates to 0 px, where the reference's resize fails.
    """
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    new_long = hd_scale(width, height, num_crops) * CROP
    new_short = int(new_long / (long_side / short_side))
    if new_short < 1:
        raise ImageSizeError(
            f"a {width}x{height} image is too thin for Phi-3-vision's HD transform: its short side "
            f"becomes 0 px at {new_long} px long (the reference fails to resize it); pad or "
            "crop it "
            "to an aspect ratio below 336*scale:1"
        )
    return (new_short, new_long) if transposed else (new_long, new_short)


def global_view(planes: np.ndarray) -> np.ndarray:
    """The 336x336 bicubic (no antialias) view of the normalized canvas: the reference's own
    ``F.interpolate`` call when torch is present, else the same filter in numpy."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is installed wherever tests run
        return cubic_resize_planes(planes, (CROP, CROP))
    view = torch.nn.functional.interpolate(
        torch.from_numpy(planes)[None], size=(CROP, CROP), mode="bicubic"
    )
    return view[0].numpy()


def _run(
    pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
) -> dict[str, np.ndarray]:
    width, height = size
    num_crops = options["num_crops"]
    resized_size = hd_resized(width, height, num_crops)
    canvas_w, canvas_h = hd_canvas(width, height, num_crops)
    transposed = width < height
    if ctx.mode == "exact" and transposed:
        with ctx.stage("resize"):
            # PIL resamples in two separable passes with uint8 rounding in between, and which
            # pass runs first depends on the sizes and the Pillow version (Pillow 13 starts with
            # the axis it shrinks most); only resizing the transposed image reproduces the
            # reference's order everywhere.
            flipped = pixels.to_pil().transpose(Image.Transpose.TRANSPOSE)
            resized_t = flipped.resize(
                (resized_size[1], resized_size[0]), Image.Resampling.BILINEAR
            )
            resized = np.asarray(resized_t.transpose(Image.Transpose.TRANSPOSE))
    else:
        resized = ctx.hwc(ctx.resize(pixels, resized_size, "bilinear"))
    with ctx.stage("to_tensor"):
        canvas = np.full((canvas_h, canvas_w, 3), WHITE, dtype=np.uint8)
        # padding_336 pads the (transposed) height: int((target - size) / 2) before, rest after.
        if transposed:
            left = int((canvas_w - resized_size[0]) / 2)
            canvas[:, left : left + resized_size[0]] = resized
        else:
            top = int((canvas_h - resized_size[1]) / 2)
            canvas[top : top + resized_size[1]] = resized
    rows, cols = canvas_h // CROP, canvas_w // CROP
    out = output_array((1, num_crops + 1, 3, CROP, CROP))
    with ctx.stage("normalize"):
        planes = np.empty((3, canvas_h, canvas_w), dtype=np.float32)
        normalize_into(planes, canvas, CLIP)
        out[0, 0] = global_view(planes)
        # One strided copy of the canvas into the crop slots (row-major crops).
        slots = out[0, 1 : 1 + rows * cols].reshape(rows, cols, 3, CROP, CROP)
        slots[...] = planes.reshape(3, rows, CROP, cols, CROP).transpose(1, 3, 0, 2, 4)
        out[0, 1 + rows * cols :] = 0.0  # pad_to_max_num_crops_tensor: zero views
    with ctx.stage("to_tensor"):
        sizes = np.array([[canvas_h, canvas_w]], dtype=np.int64)
        tokens = np.array([tokens_for_canvas(canvas_w, canvas_h)], dtype=np.int64)
    return {"pixel_values": out, "image_sizes": sizes, "num_img_tokens": tokens}


def _targets(width: int, height: int, options: Mapping[str, Any]) -> list[tuple[int, int]]:
    return [hd_resized(width, height, options["num_crops"])]


PHI3V = Pipeline(
    run=_run,
    source_targets=_targets,
    norm=CLIP,
    backends=lambda options: ("remote_code",),
    reference="image_processing_phi3_v.py Phi3VImageProcessor (checkpoint remote code)",
)
