"""LLaVA-NeXT and LLaVA-OneVision ("anyres"): a squashed base view plus the tiles of a
letterboxed canvas.

Reference: transformers ``models/llava_next/image_processing_llava_next.py`` /
``image_processing_pil_llava_next.py`` and the LLaVA-OneVision pair (``get_image_patches``):

1. pick the pinpoint canvas (``select_best_resolution``, from :mod:`vlmlab.families.llava_next`);
2. resize the image to fit it (``get_patch_output_size``: the limiting side exactly, the other
   ``ceil``-ed) and pad it centred with 0 (black) to the canvas;
3. cut the canvas into tiles row-major; the first view is the whole image resized (squashed)
   to one tile;
4. every view then goes through ``resize(size)`` / ``center_crop`` (identities at tile size),
   rescale and normalize; ``pixel_values`` is ``(1, views, 3, tile, tile)``.

A single image always takes the anyres path. OneVision images that share a prompt with others
(option ``multi_image``) are only their base view: the image padded centred to a square with
the mean colour (``pad_to_square``, fill ``int(mean * 255)`` = 127), resized to one tile;
``pixel_values`` is ``(1, 1, 3, tile, tile)`` and the prompt's ``batch_num_images`` counts its
images (the engine sets it). Values: llava-hf checkpoints'
``preprocessor_config.json`` (LLaVA-NeXT: ``size.shortest_edge`` / ``crop_size`` 336, 5
pinpoints, OpenAI CLIP mean/std; OneVision: ``size`` 384x384, 36 pinpoints, mean/std 0.5 from
SigLIP); ``resample`` 3 (bicubic) in both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from vlmlab.families import llava_next as next_family
from vlmlab.families import llava_onevision as ov_family
from vlmlab.families.llava_next import select_best_resolution
from vlmlab.preprocess.core import HF_BACKENDS, Context, Pipeline
from vlmlab.preprocess.kernels import (
    Normalization,
    Pixels,
    normalize_canvas_tiles,
    normalize_into,
    normalize_tiles,
    output_array,
    paste_centered,
)

# llava-hf/llava-v1.6-*-hf preprocessor_config.json (OpenAI CLIP statistics).
NEXT_NORM = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# llava-hf/llava-onevision-qwen2-*-ov-hf preprocessor_config.json (SigLIP statistics).
ONEVISION_NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def fitted_size(width: int, height: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the image fitted into ``canvas`` (height, width), as transformers'
    ``image_processing_utils.get_patch_output_size``."""
    target_h, target_w = canvas
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def _anyres(
    tile: int,
    pinpoints: tuple[tuple[int, int], ...],
    norm: Normalization,
    extra: dict[str, np.ndarray],
) -> Pipeline:
    def plan(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        canvas = select_best_resolution(height, width, pinpoints)
        return canvas, fitted_size(width, height, canvas)

    def run(
        pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
    ) -> dict[str, np.ndarray]:
        width, height = size
        if options.get("multi_image"):
            return {**base_view(pixels, ctx), "image_sizes": np.array([[height, width]], dtype=np.int64), **{n: v.copy() for n, v in extra.items()}}
        (canvas_h, canvas_w), fitted = plan(width, height)
        fitted_px = ctx.resize(pixels, fitted, "bicubic")
        fitted_hwc = ctx.hwc(fitted_px)
        # Fast mode squashes the base view from the fitted image (a third of a photo's pixels or
        # fewer) instead of the source: the same picture, resampled twice.
        base_hwc = ctx.hwc(ctx.resize(fitted_px if ctx.mode == "fast" else pixels, (tile, tile), "bicubic"))
        with ctx.stage("normalize"):
            # The base view, then the tiles of the canvas (the fitted image centred on black,
            # divmod(target - size, 2): the left/top pad is the smaller half), written straight
            # into the output.
            values = output_array((1, 1 + (canvas_h // tile) * (canvas_w // tile), 3, tile, tile))
            normalize_into(values[0, 0], base_hwc, norm)
            top, left = (canvas_h - fitted[1]) // 2, (canvas_w - fitted[0]) // 2
            normalize_canvas_tiles(values[0, 1:], fitted_hwc, canvas_w, top, left, 0, norm)
        with ctx.stage("to_tensor"):
            tensors = {
                "pixel_values": values,
                "image_sizes": np.array([[height, width]], dtype=np.int64),
            }
            tensors.update({name: value.copy() for name, value in extra.items()})
        return tensors

    def base_view(pixels: Pixels, ctx: Context) -> dict[str, np.ndarray]:
        # At the pixels' own scale (a fast-mode decode may be smaller than the source).
        pw, ph = pixels.size
        if pw != ph:
            side = max(pw, ph)
            fill = int(norm.mean[0] * 255)  # one value: every channel's mean is equal here
            with ctx.stage("to_tensor"):
                square = paste_centered(ctx.hwc(pixels), (side, side), fill, (side - ph) // 2, (side - pw) // 2)
            pixels = Pixels(array=square)
        view = ctx.hwc(ctx.resize(pixels, (tile, tile), "bicubic"))
        with ctx.stage("normalize"):
            return {"pixel_values": normalize_tiles([view], norm, (tile, tile))[None]}

    def targets(width: int, height: int, options: Mapping[str, Any]) -> list[tuple[int, int]]:
        if options.get("multi_image"):  # the padded square shrinks to one tile
            side = max(width, height)
            return [(max(1, round(tile * width / side)), max(1, round(tile * height / side)))]
        return [plan(width, height)[1], (tile, tile)]

    return Pipeline(
        run=run,
        source_targets=targets,
        norm=norm,
        backends=lambda options: HF_BACKENDS,
        reference="transformers LlavaNext/LlavaOnevision ImageProcessor(Pil) get_image_patches",
    )


LLAVA_NEXT = _anyres(next_family.TILE, next_family.PINPOINTS, NEXT_NORM, {})
# OneVision also returns batch_num_images ([1] for a one-image call).
LLAVA_ONEVISION = _anyres(
    ov_family.TILE,
    ov_family.PINPOINTS,
    ONEVISION_NORM,
    {"batch_num_images": np.array([1], dtype=np.int64)},
)
