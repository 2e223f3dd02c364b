"""Tiling families: InternVL2 (dynamic 448 px tiles + thumbnail) and Idefics3 (364 px tiles of
an image rescaled to a 1456 px long side + a global view).

InternVL2 references: the model card's ``load_image`` / ``dynamic_preprocess`` (PIL
``image.resize`` with its default bicubic filter to ``448*cols x 448*rows``, row-major crops, a
448x448 thumbnail when there is more than one tile, then ``T.Resize(448)`` (an identity at that
size), ``ToTensor``, ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``) and its transformers port
``GotOcr2ImageProcessor(Pil)`` with ``crop_to_patches=True`` (same steps; ``max_patches=1``
resizes to one 448x448 view). The model card and ``backend="pil"`` are the same pixels; the
default ``backend="torchvision"`` follows transformers' torchvision class. Outputs
``pixel_values`` (views, 3, 448, 448) and ``num_patches`` [views]. Grid and tile size from
:mod:`vlmlab.families.internvl2` (``config.json`` ``force_image_size`` 448, ``max_dynamic_patch``).

Idefics3 reference: transformers ``models/idefics3/image_processing_idefics3.py`` /
``image_processing_pil_idefics3.py``: resize so the long side is 1456 (``size.longest_edge``;
upscaling small images), resize again so both sides are multiples of 364
(``resize_for_vision_encoder``), cut 364 px tiles row-major and append the whole (second-stage)
image resized to 364x364; without splitting, the 1456 image is squashed to one 364x364 view.
LANCZOS throughout (``preprocessor_config.json`` ``resample`` 1), mean/std 0.5. Outputs
``pixel_values`` (1, views, 3, 364, 364) and ``pixel_attention_mask`` (1, views, 364, 364).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from vlmlab.families import idefics3 as idefics3_family
from vlmlab.families import internvl2 as internvl2_family
from vlmlab.preprocess.core import HF_BACKENDS, Context, Pipeline
from vlmlab.preprocess.kernels import (
    Normalization,
    Pixels,
    grid_tiles,
    normalize_tiles,
    output_array,
)

# -- InternVL2 ------------------------------------------------------------------------------------

# InternVL2 model card build_transform: IMAGENET_MEAN / IMAGENET_STD (the HF InternVL ports'
# preprocessor_config.json carry the same values).
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INTERNVL_TILE = internvl2_family.TILE


def _internvl_plan(
    width: int, height: int, options: Mapping[str, Any]
) -> tuple[tuple[int, int], bool]:
    """((cols, rows), thumbnail?) for the image."""
    cols, rows = internvl2_family.closest_grid(width, height, options["max_num"])
    return (cols, rows), cols * rows != 1


def _internvl_run(
    pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
) -> dict[str, np.ndarray]:
    (cols, rows), thumbnail = _internvl_plan(*size, options)
    tile = INTERNVL_TILE
    canvas = ctx.hwc(ctx.resize(pixels, (tile * cols, tile * rows), "bicubic"))
    views = grid_tiles(canvas, tile, tile)
    if thumbnail:
        views.append(ctx.hwc(ctx.resize(pixels, (tile, tile), "bicubic")))
    with ctx.stage("normalize"):
        values = normalize_tiles(views, IMAGENET, (tile, tile))
    with ctx.stage("to_tensor"):
        counts = np.array([len(views)], dtype=np.int64)
    return {"pixel_values": values, "num_patches": counts}


def _internvl_targets(width: int, height: int, options: Mapping[str, Any]) -> list[tuple[int, int]]:
    (cols, rows), thumbnail = _internvl_plan(width, height, options)
    return [(INTERNVL_TILE * cols, INTERNVL_TILE * rows)] + (
        [(INTERNVL_TILE,) * 2] if thumbnail else []
    )


INTERNVL2 = Pipeline(
    run=_internvl_run,
    source_targets=_internvl_targets,
    norm=IMAGENET,
    backends=lambda options: HF_BACKENDS,
    reference=(
        "InternVL2 model card dynamic_preprocess = "
        "transformers GotOcr2ImageProcessor(Pil) crop_to_patches"
    ),
)


# -- Idefics3 -------------------------------------------------------------------------------------

# HuggingFaceM4/Idefics3-8B-Llama3 preprocessor_config.json image_mean / image_std.
IDEFICS_NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IDEFICS_TILE = idefics3_family.TILE


def encoder_size(width: int, height: int, tile: int = IDEFICS_TILE) -> tuple[int, int]:
    """(width, height) after ``resize_for_vision_encoder``: multiples of ``tile``, the long side
    rounded up, the short side recomputed from the aspect ratio (float64, ``int``), rounded up.
    """
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


def _idefics_run(
    pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
) -> dict[str, np.ndarray]:
    tile = IDEFICS_TILE
    first = idefics3_family.upscaled_size(*size)
    # Channels-last resizes (torch engine; same pixels): the 1456 px image is resized again
    # (the global view, the encoder-size step), so torch neither unpacks it into planes nor
    # packs it back, and the tiles are cut from its planes copied out once (channel_planes).
    image = ctx.resize(pixels, first, "lanczos", channels_last=True)
    if options["do_image_splitting"]:
        second = encoder_size(*first)
        image = ctx.resize(image, second, "lanczos", channels_last=True)
        if second[0] > tile or second[1] > tile:
            views = grid_tiles(ctx.hwc(image, planes=True), tile, tile)
            views.append(ctx.hwc(ctx.resize(image, (tile, tile), "lanczos", channels_last=True)))
        else:  # pragma: no cover - the 1456 px long side always splits; kept as the reference
            views = [ctx.hwc(image)]
    else:
        views = [ctx.hwc(ctx.resize(image, (tile, tile), "lanczos", channels_last=True))]
    height = max(v.shape[0] for v in views)
    width = max(v.shape[1] for v in views)
    uniform = all(v.shape[:2] == (height, width) for v in views)
    with ctx.stage("normalize"):
        if uniform:
            values = normalize_tiles(views, IDEFICS_NORM, (height, width))[None]
        else:  # pragma: no cover - only the unsplit sub-tile case above; padded with zeros
            values = output_array((1, len(views), 3, height, width), zeros=True)
            for index, view in enumerate(views):
                values[0, index, :, : view.shape[0], : view.shape[1]] = normalize_tiles(
                    [view], IDEFICS_NORM, view.shape[:2]
                )[0]
    with ctx.stage("to_tensor"):
        if uniform:  # all ones: one fill, no zero-fill first
            mask = output_array((1, len(views), height, width), np.int64)
            mask.fill(1)
        else:  # pragma: no cover - as above
            mask = output_array((1, len(views), height, width), np.int64, zeros=True)
            for index, view in enumerate(views):
                mask[0, index, : view.shape[0], : view.shape[1]] = 1
    return {"pixel_values": values, "pixel_attention_mask": mask}


IDEFICS3 = Pipeline(
    run=_idefics_run,
    source_targets=lambda w, h, o: [idefics3_family.upscaled_size(w, h)],
    norm=IDEFICS_NORM,
    backends=lambda options: HF_BACKENDS,
    reference="transformers Idefics3ImageProcessor(Pil)",
)
