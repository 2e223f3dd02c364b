"""Pixtral-12B (both variants) and vlmlab nano: one resize to whole 16 px patches, normalize.

References:

* ``variant="mistral"``: mistral_common 1.13 ``tokens/tokenizers/image.py``
  (``ImageEncoder.__call__`` -> ``transform_image``): ``cv2.resize`` of the *float32* image with
  ``INTER_CUBIC`` (no antialiasing) straight to ``16*cols x 16*rows``, then
  ``(x / 255 - DATASET_MEAN) / DATASET_STD``; the image comes back as (3, H, W).
* ``variant="hf"`` and nano: transformers ``PixtralImageProcessor`` (torchvision backend) /
  ``PixtralImageProcessorPil``: bicubic resize (``resample 3``) to the floor-rule size, rescale,
  normalize; ``pixel_values`` (1, 3, H, W) and ``image_sizes`` [[H, W]].

Sizes come from :mod:`vlmlab.families.pixtral` (``resized_size``; patch 16 and longest edge 1024
from ``tekken_240911.json``) and :mod:`vlmlab.families.nano` (longest edge 192). Statistics:
mistral_common ``DATASET_MEAN`` / ``DATASET_STD`` (the OpenAI CLIP values; the HF port's
``preprocessor_config.json`` ships the same) and, for nano, the packaged checkpoint's
``nano/checkpoint/preprocessor_config.json``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import numpy as np

from vlmlab.families import nano as nano_family
from vlmlab.families.pixtral import resized_size
from vlmlab.preprocess.core import HF_BACKENDS, Context, Pipeline
from vlmlab.preprocess.kernels import Normalization, Pixels, normalize_into, output_array, resize
from vlmlab.protocol.errors import ConfigError

# mistral_common tokens/tokenizers/image.py DATASET_MEAN / DATASET_STD (= OpenAI CLIP; also
# mistral-community/pixtral-12b preprocessor_config.json image_mean / image_std).
CLIP = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - installed with mistral-common[image]
        raise ConfigError(
            "Pixtral variant='mistral' resizes with OpenCV like mistral_common; install "
            "opencv-python-headless (pip install 'mistral-common[image]') or use variant='hf'",
            param="variant",
        ) from e
    return cv2


def _run_mistral(
    pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
) -> dict[str, np.ndarray]:
    width, height = size
    target = resized_size(width, height, variant="mistral")
    with ctx.stage("resize"):
        if ctx.mode == "fast" and pixels.size != target:
            # Fast: torch's antialiased bicubic from a (possibly DCT-reduced) decode. mistral_common
            # samples 4 taps without antialiasing, so this is close to it, not equal.
            resized = resize(
                pixels, target, "bicubic", "torch" if ctx.engine == "torch" else "pil"
            ).hwc()
        elif pixels.size == target:
            resized = pixels.hwc()  # cv2.resize to the same size copies; the pixels are the same
        else:
            # The reference converts the whole image to float32 through PIL (np.array(.., float32)),
            # then resizes; astype from the uint8 view is the same values at a fraction of the cost.
            resized = _cv2().resize(
                pixels.hwc().astype(np.float32), target, interpolation=_cv2().INTER_CUBIC
            )
    with ctx.stage("normalize"):
        out = output_array((3, target[1], target[0]))
        normalize_into(out, resized, CLIP)
    return {"pixel_values": out}


def _hf_run(longest_edge: int, norm: Normalization) -> Any:
    def run(
        pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
    ) -> dict[str, np.ndarray]:
        target = resized_size(*size, variant="hf", longest_edge=longest_edge)
        resized = ctx.hwc(ctx.resize(pixels, target, "bicubic"))
        with ctx.stage("normalize"):
            out = output_array((1, 3, target[1], target[0]))
            normalize_into(out[0], resized, norm)
        with ctx.stage("to_tensor"):
            sizes = np.array([[target[1], target[0]]], dtype=np.int64)
        return {"pixel_values": out, "image_sizes": sizes}

    return run


_run_hf = _hf_run(1024, CLIP)  # families.pixtral.LONGEST_EDGE (tekken max_image_size)


def _run_pixtral(
    pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
) -> dict[str, np.ndarray]:
    run = _run_mistral if options["variant"] == "mistral" else _run_hf
    return run(pixels, size, options, ctx)


def _pixtral_targets(width: int, height: int, options: Mapping[str, Any]) -> list[tuple[int, int]]:
    return [resized_size(width, height, variant=options["variant"])]


PIXTRAL = Pipeline(
    run=_run_pixtral,
    source_targets=_pixtral_targets,
    norm=CLIP,
    backends=lambda options: (
        ("mistral_common",) if options["variant"] == "mistral" else HF_BACKENDS
    ),
    reference=(
        "mistral_common ImageEncoder (variant=mistral); "
        "transformers PixtralImageProcessor(Pil) (variant=hf)"
    ),
)


# -- nano -----------------------------------------------------------------------------------------


@functools.cache
def nano_normalization() -> Normalization:
    """Mean / std / rescale of the packaged nano checkpoint's ``preprocessor_config.json``."""
    path = resources.files("vlmlab") / "nano" / "checkpoint" / "preprocessor_config.json"
    config = json.loads(path.read_text())
    return Normalization(
        tuple(config["image_mean"]), tuple(config["image_std"]), config["rescale_factor"]
    )


def _run_nano(
    pixels: Pixels, size: tuple[int, int], options: Mapping[str, Any], ctx: Context
) -> dict[str, np.ndarray]:
    return _hf_run(nano_family.LONGEST_EDGE, nano_normalization())(pixels, size, options, ctx)


NANO = Pipeline(
    run=_run_nano,
    source_targets=lambda w, h, o: [
        resized_size(w, h, variant="hf", longest_edge=nano_family.LONGEST_EDGE)
    ],
    norm=lambda options: nano_normalization(),
    backends=lambda options: HF_BACKENDS,
    reference=(
        "transformers PixtralImageProcessor(Pil) with the nano checkpoint's "
        "preprocessor_config.json"
    ),
)
