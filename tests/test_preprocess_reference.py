"""Reference processors for the preprocessing parity tests, built offline from their classes.

Each ``reference(family, image, backend, **options)`` call runs the real reference code on a
decoded RGB PIL image and returns its tensors as numpy arrays:

* transformers 5.23 processors, torchvision backend (``*ImageProcessor``) or PIL backend
  (``*ImageProcessorPil``), constructed with the checkpoints' ``preprocessor_config.json``
  values (class defaults differ: LLaVA-NeXT's 224 px, GotOcr2's CLIP statistics, Qwen's
  1003520 max_pixels), and the packaged nano checkpoint loaded from its directory;
* mistral_common's ``ImageEncoder`` for Pixtral ``variant="mistral"``;
* qwen-vl-utils ``fetch_image`` + the Qwen processor for ``variant="qwen_vl_utils"``;
* Phi-3(.5)-vision: its processor is remote code that cannot be fetched here, so
  :func:`phi3v_reference` re-implements the published ``image_processing_phi3_v.py``
  ``Phi3VImageProcessor.preprocess`` step by step with the same library calls (PIL transpose,
  ``torchvision.transforms.functional.resize`` / ``pad`` on PIL images, ``ToTensor``,
  ``Normalize``, ``F.interpolate(mode="bicubic")``); its token count is checked against the
  family rule below.

This module's own tests check the references against facts that do not come from vlmlab code.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
pytest.importorskip("mistral_common")
pytest.importorskip("cv2")
pytest.importorskip("qwen_vl_utils")

from mistral_common.protocol.instruct.chunk import ImageChunk  # noqa: E402
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs  # noqa: E402
from PIL import Image  # noqa: E402
from qwen_vl_utils import fetch_image  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from vlmlab.families import get_family  # noqa: E402
from vlmlab.nano import checkpoint_path  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json image_grid_pinpoints.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

_MISTRAL = ImageEncoder(
    ImageConfig(image_patch_size=16, max_image_size=1024), SpecialImageIDs(10, 12, 13)
)


def _hf(cls_name: str, backend: str, **kwargs):
    name = cls_name if backend == "torchvision" else cls_name + "Pil"
    return getattr(transformers, name)(**kwargs)


def hf_processor(family: str, backend: str, options: dict):
    """The transformers image processor for ``family`` with checkpoint config values."""
    if family == "pixtral":
        return _hf("PixtralImageProcessor", backend)  # class defaults = mistral-community config
    if family == "nano":
        name = "PixtralImageProcessor" + ("" if backend == "torchvision" else "Pil")
        return getattr(transformers, name).from_pretrained(checkpoint_path())
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _hf(
            "Qwen2VLImageProcessor",
            backend,
            min_pixels=options.get("min_pixels", 3136),
            max_pixels=options.get("max_pixels", 12845056),
        )
    if family == "llava_next":
        return _hf(
            "LlavaNextImageProcessor",
            backend,
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=NEXT_PINPOINTS,
        )
    if family == "llava_onevision":
        return _hf(
            "LlavaOnevisionImageProcessor",
            backend,
            size={"height": 384, "width": 384},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    if family == "internvl2":
        return _hf(
            "GotOcr2ImageProcessor",
            backend,
            size={"height": 448, "width": 448},
            crop_to_patches=True,
            min_patches=1,
            max_patches=options.get("max_num", 12),
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    if family == "idefics3":
        return _hf(
            "Idefics3ImageProcessor",
            backend,
            size={"longest_edge": 1456},
            max_image_size={"longest_edge": 364},
            do_image_splitting=options.get("do_image_splitting", True),
        )
    raise KeyError(family)


def _numpy(out) -> dict[str, np.ndarray]:
    result = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            value = value.numpy()
        result[key] = np.asarray(value)
    return result


def reference(family: str, image: Image.Image, backend: str, **options) -> dict[str, np.ndarray]:
    """The reference tensors for one decoded RGB image."""
    family = get_family(family).name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "pixtral" and options.get("variant", "mistral") == "mistral":
            return {"pixel_values": np.asarray(_MISTRAL(ImageChunk(image=image)).image)}
        if family in ("phi3_5_vision", "phi3_vision"):
            default = get_family(family).default_options["num_crops"]
            return phi3v_reference(image, options.get("num_crops", default))
        if family in ("qwen2_vl", "qwen2_5_vl") and options.get("variant") == "qwen_vl_utils":
            lo, hi = options.get("min_pixels", 3136), options.get("max_pixels", 12845056)
            image = fetch_image({"image": image, "min_pixels": lo, "max_pixels": hi})
        processor = hf_processor(family, backend, options)
        if family == "llava_onevision" and options.get("multi_image"):
            # Two images in one prompt: each is its base view. The first image's tensors; the
            # prompt's batch_num_images (2 here) is the engine's to set, a one-image call says 1.
            out = _numpy(processor([[image, image]], return_tensors="pt"))
            return {"pixel_values": out["pixel_values"][:1], "image_sizes": out["image_sizes"][:1], "batch_num_images": np.array([1])}
        return _numpy(processor(image, return_tensors="pt"))


# -- Phi-3(.5)-vision: image_processing_phi3_v.py, step by step ----------------------------------


def phi3v_reference(image: Image.Image, num_crops: int) -> dict[str, np.ndarray]:
    """``Phi3VImageProcessor(num_crops=...).preprocess([image])`` as published."""
    image = image.convert("RGB")
    # HD_transform
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    image = TF.resize(image, [new_h, new_w])  # torchvision on PIL: BILINEAR
    # padding_336
    w, h = image.size
    target = int(np.ceil(h / 336) * 336)
    top = int((target - h) / 2)
    image = TF.pad(image, [0, top, 0, target - h - top], fill=[255, 255, 255])
    if transposed:
        image = image.transpose(Image.TRANSPOSE)
    # ToTensor + Normalize, global view, crops, pad to num_crops + 1
    hd = TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)
    global_view = torch.nn.functional.interpolate(
        hd.unsqueeze(0).float(), size=(336, 336), mode="bicubic"
    )
    h, w = hd.shape[1], hd.shape[2]
    crops = (
        hd.reshape(1, 3, h // 336, 336, w // 336, 336)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(-1, 3, 336, 336)
    )
    views = torch.cat([global_view, crops], dim=0)
    if views.shape[0] < num_crops + 1:
        pad = torch.zeros(num_crops + 1 - views.shape[0], 3, 336, 336, dtype=views.dtype)
        views = torch.cat([views, pad], dim=0)
    tokens = int(((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12)
    return {
        "pixel_values": views.unsqueeze(0).numpy(),
        "image_sizes": np.array([[h, w]], dtype=np.int64),
        "num_img_tokens": np.array([tokens], dtype=np.int64),
    }


# -- tests of the references themselves -----------------------------------------------------------


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("size", "num_crops", "tokens"),
    [
        # The spec's vLLM-confirmed counts: 757 at num_crops 4, 1921 for a 4:3 photo at 16, and
        # the 1x3 grid (601) between 3:1 and 4:1 at num_crops 4.
        ((640, 480), 4, 757),
        ((640, 480), 16, 1921),
        ((1000, 300), 4, 601),
        ((300, 1000), 4, 625),  # transposed: 3 rows of crops, so 12 more newlines than 1000x300
    ],
)
def test_phi3v_reference_token_counts(size: tuple[int, int], num_crops: int, tokens: int) -> None:
    out = phi3v_reference(_photo(*size), num_crops)
    assert int(out["num_img_tokens"][0]) == tokens
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)


def test_phi3v_reference_pads_with_white_and_zero_views() -> None:
    out = phi3v_reference(_photo(1000, 300), 4)  # 1x3 crops: 3 of 4 crop slots used
    white = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    # padding_336 adds rows above and below the resized 1008x302 image: white after normalize.
    np.testing.assert_allclose(out["pixel_values"][0, 1, :, 0, 0], white, rtol=1e-5)
    assert not out["pixel_values"][0, 4].any()


def test_hf_references_use_checkpoint_values() -> None:
    # Class defaults would silently change the output; the builders must carry config values.
    assert hf_processor("llava_next", "pil", {}).crop_size["height"] == 336
    assert hf_processor("internvl2", "torchvision", {}).image_mean[0] == pytest.approx(0.485)
    assert hf_processor("qwen2_vl", "pil", {}).size["longest_edge"] == 12845056
    assert hf_processor("nano", "torchvision", {}).size["longest_edge"] == 192
    assert math.isclose(hf_processor("llava_onevision", "pil", {}).image_std[0], 0.5)
