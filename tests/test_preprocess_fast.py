"""Fast mode, decoding, the API's errors and the process pool.

Fast mode must keep the token count and every tensor shape of exact mode and stay close to it
(PSNR >= 40 dB in 0..255 pixel units on photo-like images); JPEG DCT-domain reduction must
actually happen for large JPEGs (and respect EXIF rotation); errors are vlmlab errors naming the
bad value; the pool returns what the in-process call returns.
"""

from __future__ import annotations

import asyncio
import io
import pickle

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("cv2")

from vlmlab import media  # noqa: E402
from vlmlab.families import ImageSizeError, get_family  # noqa: E402
from vlmlab.preprocess import PreprocessPool, get_preprocessor, preprocess_bytes, psnr  # noqa: E402
from vlmlab.preprocess.core import decode_bytes  # noqa: E402
from vlmlab.protocol.errors import (  # noqa: E402
    ConfigError,
    ImageDecodeError,
    ImageTooLargeError,
    NotFoundError,
    UnknownOptionError,
)

FAMILIES = [
    ("pixtral", {}),
    ("pixtral", {"variant": "hf"}),
    ("nano", {}),
    ("qwen2_vl", {"max_pixels": 1003520}),
    ("qwen2_5_vl", {"variant": "qwen_vl_utils", "max_pixels": 1003520}),
    ("llava_next", {}),
    ("llava_onevision", {}),
    ("llava_onevision", {"multi_image": True}),
    ("internvl2", {}),
    ("idefics3", {}),
    ("phi3_5_vision", {}),
    ("phi3_vision", {}),
]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like statistics: smooth colour regions, mid-scale texture, a little sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(
        rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2), 3), dtype=np.uint8)
    )
    texture = Image.fromarray(
        rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    )
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16) * 3 // 4
    pixels += np.asarray(texture.resize((width, height), Image.BILINEAR), dtype=np.int16) // 4
    pixels += rng.integers(-6, 7, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return jpeg(photo(2600, 1950, 1))


@pytest.mark.parametrize(("family", "options"), FAMILIES, ids=lambda v: str(v))
def test_fast_keeps_layout_and_stays_close(big_jpeg: bytes, family: str, options: dict) -> None:
    exact = preprocess_bytes(big_jpeg, family, "exact", **options)
    fast = preprocess_bytes(big_jpeg, family, "fast", **options)
    assert fast.grid == exact.grid
    assert fast.size == exact.size == (2600, 1950)
    assert set(fast.tensors) == set(exact.tensors)
    for name, value in exact.tensors.items():
        assert fast.tensors[name].shape == value.shape, name
        if not np.issubdtype(value.dtype, np.floating):
            np.testing.assert_array_equal(fast.tensors[name], value, err_msg=name)
    scale = 255.0 * float(np.mean(get_preprocessor(family, **options).norm.std))
    quality = psnr(exact.tensors["pixel_values"], fast.tensors["pixel_values"], scale)
    assert quality >= 40.0, f"{family} fast vs exact PSNR {quality:.1f} dB"


def test_fast_mode_decodes_large_jpegs_reduced(big_jpeg: bytes) -> None:
    pre = get_preprocessor("pixtral", "fast")
    image, source = decode_bytes(big_jpeg, None, pre._draft_target)
    assert source == (2600, 1950)
    assert image.size == (1300, 975)  # 1/2 scale still covers the 1024x768 target
    # LLaVA-NeXT needs only 672x504 + 336x336: 1/2 scale is the largest reduction still >= it.
    image, _ = decode_bytes(big_jpeg, None, get_preprocessor("llava_next", "fast")._draft_target)
    assert image.size == (1300, 975)
    # nano's 192 px target allows 1/8.
    image, _ = decode_bytes(big_jpeg, None, get_preprocessor("nano", "fast")._draft_target)
    assert image.size == (325, 244)


def test_fast_mode_respects_exif_rotation() -> None:
    data = jpeg(photo(2600, 1300, 2), orientation=6)  # displayed as 1300 x 2600
    exact = preprocess_bytes(data, "internvl2", "exact")
    fast = preprocess_bytes(data, "internvl2", "fast")
    assert exact.size == fast.size == (1300, 2600)
    assert fast.grid == exact.grid
    scale = 255.0 * float(np.mean(get_preprocessor("internvl2").norm.std))
    assert psnr(exact.tensors["pixel_values"], fast.tensors["pixel_values"], scale) >= 40.0


def test_fast_mode_leaves_small_and_non_jpeg_images_full_size() -> None:
    small = jpeg(photo(700, 500, 3))
    image, _ = decode_bytes(small, None, get_preprocessor("pixtral", "fast")._draft_target)
    assert image.size == (700, 500)
    buf = io.BytesIO()
    photo(2600, 1950, 4).save(buf, "PNG")
    image, _ = decode_bytes(buf.getvalue(), None, get_preprocessor("nano", "fast")._draft_target)
    assert image.size == (2600, 1950)


def test_stages_are_timed(big_jpeg: bytes) -> None:
    result = preprocess_bytes(big_jpeg, "llava_next")
    assert set(result.stages) == {"decode", "resize", "normalize", "to_tensor"}
    assert all(v >= 0 for v in result.stages.values())
    assert result.stages["decode"] > 0 and result.stages["resize"] > 0
    assert result.total_s == pytest.approx(sum(result.stages.values()))
    assert result.nbytes == sum(t.nbytes for t in result.tensors.values())
    as_torch = result.torch()
    assert as_torch["pixel_values"].shape == result.tensors["pixel_values"].shape


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_family_lists_choices() -> None:
    with pytest.raises(NotFoundError, match="qwen2_vl"):
        get_preprocessor("qwen9_vl")


def test_family_without_pipeline_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="idefics2.*supported"):
        get_preprocessor("idefics2")


def test_bad_mode_backend_and_option() -> None:
    with pytest.raises(ConfigError, match="mode"):
        get_preprocessor("qwen2_vl", "turbo")
    with pytest.raises(ConfigError, match="backend 'cv2'.*torchvision"):
        get_preprocessor("qwen2_vl", backend="cv2")
    with pytest.raises(ConfigError, match="mistral_common"):
        get_preprocessor("pixtral", backend="pil")  # variant=mistral has one reference
    with pytest.raises(UnknownOptionError, match="num_crop"):
        get_preprocessor("phi3_5_vision", num_crop=4)


def test_reference_rejections_are_image_size_errors() -> None:
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        get_preprocessor("qwen2_vl")(photo(402, 2, 5))
    with pytest.raises(ImageSizeError, match="0 px"):
        get_preprocessor("phi3_5_vision")(photo(3000, 1, 5))
    thin = io.BytesIO()
    photo(402, 2, 5).save(thin, "PNG")
    with pytest.raises(ImageSizeError):
        preprocess_bytes(thin.getvalue(), "qwen2_vl", "fast")  # refused before decoding


def test_decode_errors_and_limits_come_from_media() -> None:
    with pytest.raises(ImageDecodeError):
        preprocess_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "llava_next")
    with pytest.raises(ImageDecodeError):
        preprocess_bytes(b"\xff\xd8\xff\xe0 not really a jpeg", "llava_next", "fast")
    data = jpeg(photo(800, 600, 6))
    tight = media.MediaPolicy(max_pixels=1000)
    for mode in ("exact", "fast"):
        with pytest.raises(ImageTooLargeError, match="max_pixels"):
            preprocess_bytes(data, "pixtral", mode, policy=tight)
    truncated = data[: len(data) // 2]
    with pytest.raises(ImageDecodeError):
        preprocess_bytes(truncated, "pixtral", "fast")


def test_preprocessor_pickles_and_names_its_reference() -> None:
    pre = get_preprocessor("Qwen/Qwen2.5-VL-7B-Instruct", "fast", max_pixels=1003520, backend="pil")
    clone = pickle.loads(pickle.dumps(pre))
    assert (clone.family.name, clone.mode, clone.backend, clone.options) == (
        "qwen2_5_vl",
        "fast",
        "pil",
        pre.options,
    )
    assert get_preprocessor("pixtral").backend == "mistral_common"
    assert get_preprocessor("pixtral", variant="hf").backend == "torchvision"
    assert (
        get_preprocessor("phi3_5_vision").options["num_crops"]
        == get_family("phi3_5_vision").default_options["num_crops"]
    )


# -- pool ------------------------------------------------------------------------------------------


def test_pool_matches_in_process_results() -> None:
    jobs = [
        (jpeg(photo(900, 700, 7)), "qwen2_vl", "exact", {"max_pixels": 1003520}),
        (jpeg(photo(1500, 600, 8)), "llava_onevision", "fast", {}),
        (jpeg(photo(640, 480, 9)), "pixtral", "exact", {}),
    ]
    with PreprocessPool(max_workers=2) as pool:
        futures = [pool.submit(data, family, mode, options) for data, family, mode, options in jobs]
        with pytest.raises(UnknownOptionError):
            pool.submit(jobs[0][0], "qwen2_vl", "exact", {"max_pixel": 1})  # raised here, at once
        bad = pool.submit(b"not an image", "llava_next")
        results = [f.result(timeout=120) for f in futures]
        with pytest.raises(ImageDecodeError):
            bad.result(timeout=120)
        awaited = asyncio.run(pool.run(jobs[2][0], "pixtral"))
    for (data, family, mode, options), result in zip(jobs, results, strict=True):
        local = preprocess_bytes(data, family, mode, **options)
        assert result.grid == local.grid
        for name, value in local.tensors.items():
            np.testing.assert_array_equal(result.tensors[name], value, err_msg=f"{family} {name}")
    np.testing.assert_array_equal(
        awaited.tensors["pixel_values"], results[2].tensors["pixel_values"]
    )
