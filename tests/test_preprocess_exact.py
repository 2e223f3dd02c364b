"""Exact mode: vlmlab.preprocess against the reference processors, pixel for pixel.

For every family, option set and backend, random sizes (odd, tiny, extreme aspect, one above
4k) go through the reference (see ``test_preprocess_reference.py``) and through
``get_preprocessor``; the outputs must have the same names, shapes and integer metadata, and
normalized pixels within 1e-5. Encoded formats (JPEG, PNG, WebP, palette, RGBA, grayscale,
EXIF-rotated) go through ``vlmlab.media`` on both sides. The kernels' own claims (channels-last
torch resize, the numpy bicubic) are checked against the library calls they replace.
"""

from __future__ import annotations

import functools
import io
import random
import zlib

import numpy as np
import pytest

from test_preprocess_reference import reference  # noqa: E402  (skips without the references)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms.v2 import functional as tvF  # noqa: E402

from vlmlab import media  # noqa: E402
from vlmlab.families import get_family  # noqa: E402
from vlmlab.preprocess import get_preprocessor, preprocess_bytes  # noqa: E402
from vlmlab.preprocess.core import decode_bytes  # noqa: E402
from vlmlab.preprocess.kernels import (  # noqa: E402
    Pixels,
    channel_planes,
    cubic_resize_planes,
    resize,
    rgbx_view,
)

TOLERANCE = 1e-5
MAX_DIFFS: dict[str, float] = {}  # family/backend -> worst difference seen (printed with -s)

# (family, options, backends). Pixtral's mistral variant and Phi-3 have one reference each.
CASES = [
    ("pixtral", {}, ["mistral_common"]),
    ("pixtral", {"variant": "hf"}, ["torchvision", "pil"]),
    ("nano", {}, ["torchvision", "pil"]),
    ("qwen2_vl", {}, ["torchvision", "pil"]),
    ("qwen2_5_vl", {"max_pixels": 1003520, "min_pixels": 200704}, ["torchvision", "pil"]),
    ("qwen2_vl", {"variant": "qwen_vl_utils"}, ["torchvision"]),
    ("llava_next", {}, ["torchvision", "pil"]),
    ("llava_onevision", {}, ["torchvision", "pil"]),
    ("llava_onevision", {"multi_image": True}, ["torchvision", "pil"]),
    ("internvl2", {}, ["torchvision", "pil"]),
    ("internvl2", {"max_num": 6}, ["pil"]),
    ("idefics3", {}, ["torchvision", "pil"]),
    ("idefics3", {"do_image_splitting": False}, ["torchvision"]),
    ("phi3_5_vision", {}, ["remote_code"]),
    ("phi3_vision", {}, ["remote_code"]),
]

# Sizes every case sees, plus a few random ones per case. 4100x2300 is the > 4k case; the
# Qwen default (12.8 MP budget) keeps it at full size, where the PIL-backend reference alone takes
# seconds, so that case gets it only with the smaller pixel budget.
FIXED_SIZES = [(1, 1), (3, 2), (17, 5), (5, 17), (900, 7), (333, 777), (1023, 769)]
BIG = (4100, 2300)


@functools.lru_cache(maxsize=4)
def _image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: resampling differences show up, as on photos."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), dtype=np.int16)
    pixels[..., 0] = (np.arange(width, dtype=np.int32) * 255 // max(width - 1, 1))[None, :]
    pixels[..., 1] = (np.arange(height, dtype=np.int32) * 255 // max(height - 1, 1))[:, None]
    pixels[..., 2] = (np.arange(width)[None, :] + np.arange(height)[:, None]) % 256
    pixels += rng.integers(-40, 41, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _sizes(family: str, options: dict, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = list(FIXED_SIZES)
    sizes += [(rng.randint(2, 1600), rng.randint(2, 1600)) for _ in range(2)]
    sizes.append((rng.randint(5, 14) * 2 + 1, rng.randint(400, 2000)))  # odd, tall, thin (< 200:1)
    if not (family.startswith("qwen") and options.get("max_pixels", 12845056) > 2_000_000):
        sizes.append(BIG)
    if family.startswith("pixtral") and options.get("variant") == "hf":
        sizes.remove((900, 7))  # transformers' floor rule rounds the short side to 0: refused
    return sizes


def assert_matches(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], label: str) -> float:
    assert set(ours) == set(ref), f"{label}: names {sorted(ours)} != reference {sorted(ref)}"
    worst = 0.0
    for name, expected in ref.items():
        got = ours[name]
        assert got.shape == expected.shape, f"{label} {name}: shape {got.shape} != {expected.shape}"
        if np.issubdtype(expected.dtype, np.floating):
            assert got.dtype == np.float32, f"{label} {name}: dtype {got.dtype}"
            diff = (
                float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
                if got.size
                else 0.0
            )
            assert diff <= TOLERANCE, f"{label} {name}: max abs diff {diff}"
            worst = max(worst, diff)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=f"{label} {name}")
    return worst


def assert_layout_agrees(family: str, out: dict[str, np.ndarray], grid) -> None:
    """The family's token layout (what the planner and the prompt use) matches the tensors."""
    pixels = out["pixel_values"]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        _, gh, gw = out["image_grid_thw"][0]
        assert gh * gw // 4 == grid.vision_embedding_positions
        assert pixels.shape == (gh * gw, 1176)
    elif family == "internvl2":
        assert int(out["num_patches"][0]) == grid.views == pixels.shape[0]
    elif family in ("phi3_5_vision", "phi3_vision"):
        assert int(out["num_img_tokens"][0]) == grid.tokens
        assert tuple(out["image_sizes"][0]) == (grid.resized[1], grid.resized[0])
    elif family in ("llava_next", "llava_onevision", "idefics3"):
        assert pixels.shape[1] == grid.views
    else:  # pixtral, nano: whole patches of 16 px
        height, width = pixels.shape[-2:]
        assert (height // 16, width // 16) == grid.grid


@pytest.mark.parametrize(("family", "options", "backends"), CASES, ids=lambda v: str(v))
def test_exact_matches_reference(family: str, options: dict, backends: list[str]) -> None:
    seed = zlib.crc32(repr((family, sorted(options.items()))).encode()) % 10_000
    for index, (width, height) in enumerate(_sizes(family, options, seed)):
        image = _image(width, height, 0 if (width, height) == BIG else seed + index)
        for backend in backends:
            label = f"{family}{options} {backend} {width}x{height}"
            ref = reference(family, image, backend, **options)
            result = get_preprocessor(family, backend=backend, **options)(image)
            worst = assert_matches(result.tensors, ref, label)
            assert_layout_agrees(get_family(family).name, result.tensors, result.grid)
            key = f"{family}{options or ''}/{backend}"
            MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), worst)
    print({k: f"{v:.2e}" for k, v in MAX_DIFFS.items() if k.startswith(family)})


# -- encoded formats, decoded through vlmlab.media on both sides ---------------------------------


def _encode(image: Image.Image, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "jpeg":
        image.save(buf, "JPEG", quality=88)
    elif kind == "png":
        image.save(buf, "PNG")
    elif kind == "webp":
        image.save(buf, "WEBP", quality=80)
    elif kind == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, "PNG")
    elif kind == "rgba":
        rgba = image.convert("RGBA")
        alpha = np.zeros((image.height, image.width), dtype=np.uint8)
        alpha[:, : image.width // 2] = 255
        alpha[: image.height // 3] = 90
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(buf, "PNG")
    elif kind == "gray":
        image.convert("L").save(buf, "PNG")
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise on display
        image.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


FORMATS = ["jpeg", "png", "webp", "palette", "rgba", "gray", "exif_rotated"]
FORMAT_FAMILIES = [
    ("pixtral", {}, "mistral_common"),
    ("qwen2_vl", {"max_pixels": 1003520}, "pil"),
    ("llava_next", {}, "torchvision"),
    ("internvl2", {}, "torchvision"),
    ("idefics3", {}, "pil"),
    ("phi3_5_vision", {}, "remote_code"),
]


@pytest.mark.parametrize("kind", FORMATS)
def test_formats_through_media(kind: str) -> None:
    data = _encode(_image(701, 433, 7), kind)
    decoded = media.decode_image(media.ImageBytes(data, "test", ""))
    if kind == "exif_rotated":
        assert decoded.size == (433, 701)
    ours, size = decode_bytes(data)  # the exact path's decoder: media's pixels, without copies
    assert size == decoded.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(decoded.image))
    for family, options, backend in FORMAT_FAMILIES:
        ref = reference(family, decoded.image, backend, **options)
        result = preprocess_bytes(data, family, backend=backend, **options)
        assert result.size == decoded.size
        assert_matches(result.tensors, ref, f"{family} {kind}")
        assert set(result.stages) == {"decode", "resize", "normalize", "to_tensor"}


def test_rgba_mode_input_is_converted_like_media() -> None:
    """A non-RGB PIL image handed in directly gets vlmlab.media's conversion (alpha over white)."""
    data = _encode(_image(120, 90, 3), "rgba")
    rgba = Image.open(io.BytesIO(data))
    rgba.load()
    decoded = media.decode_image(media.ImageBytes(data, "test", ""))
    direct = get_preprocessor("llava_next")(rgba).tensors["pixel_values"]
    via_media = get_preprocessor("llava_next")(decoded).tensors["pixel_values"]
    np.testing.assert_array_equal(direct, via_media)


# -- the kernels' claims --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bicubic", "lanczos", "bilinear"])
def test_channels_last_resize_equals_torchvision(mode: str) -> None:
    """Our torch call on a channels-last view == torchvision's resize on the planar copy."""
    interpolation = {
        "bicubic": tvF.InterpolationMode.BICUBIC,
        "lanczos": tvF.InterpolationMode.LANCZOS,
        "bilinear": tvF.InterpolationMode.BILINEAR,
    }[mode]
    rng = random.Random(mode)
    for _ in range(4):
        w, h = rng.randint(1, 900), rng.randint(1, 900)
        image = _image(w, h, rng.randint(0, 99))
        target = (rng.randint(1, 700), rng.randint(1, 700))
        planar = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
        expected = tvF.resize(
            planar, [target[1], target[0]], interpolation=interpolation, antialias=True
        )
        got = resize(Pixels(pil=image), target, mode, "torch").hwc()
        np.testing.assert_array_equal(got, expected.permute(1, 2, 0).numpy())


def test_decoded_pixels_are_viewed_not_copied() -> None:
    """decode_bytes decodes into one block, so the pipelines view PIL's RGBX storage; resizing
    those 4 channels (chained, as Idefics3 does) gives the RGB channels' own result."""
    data = _encode(_image(2101, 2050, 5), "jpeg")  # 17 MB as RGBX: above one PIL block
    image, _ = decode_bytes(data)
    view = rgbx_view(image)
    assert view is not None and view.shape == (2050, 2101, 4) and not view.flags.writeable
    np.testing.assert_array_equal(view[:, :, :3], np.asarray(image))
    del image  # the view keeps the pixels alive
    assert Pixels(array=view).hwc().shape == (2050, 2101, 3)
    rgb = np.ascontiguousarray(view[:, :, :3])
    for mode in ("bicubic", "lanczos", "bilinear"):
        four, three = Pixels(array=view), Pixels(array=rgb)
        for size in ((701, 523), (364, 364)):
            four, three = resize(four, size, mode, "torch"), resize(three, size, mode, "torch")
            assert four.to_tensor().shape[1] == 4
            np.testing.assert_array_equal(four.hwc(), three.hwc())


def test_channels_last_results_are_the_same_pixels() -> None:
    """resize(channels_last=True) (Idefics3's chain) leaves torch's result interleaved, also
    through a second resize, and changes no pixel; channel_planes copies the RGB planes out of
    RGBX words, of RGB or RGBX bytes, or views pixels that already are planar."""
    data = _encode(_image(1203, 907, 3), "jpeg")
    image, _ = decode_bytes(data)
    assert rgbx_view(image) is not None  # the RGBX storage, as from_bytes sees it
    for mode in ("bicubic", "lanczos", "bilinear"):
        planar, kept = Pixels(pil=image), Pixels(pil=image)
        for size in ((1456, 1092), (701, 523), (364, 364)):
            planar = resize(planar, size, mode, "torch")
            kept = resize(kept, size, mode, "torch", channels_last=True)
            assert kept.tensor.shape[1] == 4
            assert kept.tensor.is_contiguous(memory_format=torch.channels_last)
            expected = planar.hwc()
            np.testing.assert_array_equal(kept.hwc(), expected)
            planes = kept.planes()
            assert planes.strides[1] == 1
            np.testing.assert_array_equal(planes, expected)
            assert planar.planes().strides[1] == 1  # torch's planes: viewed, not copied
            np.testing.assert_array_equal(planar.planes(), expected)
    rgb = np.asarray(image)
    for pixels in (rgb, rgbx_view(image), rgb.transpose(1, 0, 2)):
        np.testing.assert_array_equal(channel_planes(pixels), pixels[:, :, :3])


def test_numpy_bicubic_matches_torch_interpolate() -> None:
    rng = np.random.default_rng(0)
    for shape in [(3, 672, 1008), (3, 336, 336), (3, 1344, 336), (3, 5, 7)]:
        planes = rng.normal(0, 1, shape).astype(np.float32)
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(planes)[None], size=(336, 336), mode="bicubic"
        )[0]
        np.testing.assert_allclose(
            cubic_resize_planes(planes, (336, 336)), expected.numpy(), atol=2e-5
        )


@pytest.mark.parametrize(
    ("image_hw", "canvas_hw", "top", "left", "fill"),
    [
        ((100, 70), (128, 128), 14, 29, 0),  # centred in one tile
        ((200, 256), (256, 256), 28, 0, 0),  # full width, bands above and below
        ((130, 250), (256, 384), 0, 67, 127),  # tiles of pure fill on either side
        ((256, 384), (256, 384), 0, 0, 0),  # no padding at all
    ],
)
def test_canvas_tiles_equal_pasting_then_tiling(image_hw, canvas_hw, top, left, fill) -> None:
    """The anyres tiles written straight into the output equal the canvas built and cut up."""
    from vlmlab.preprocess.kernels import (
        Normalization,
        grid_tiles,
        normalize_canvas_tiles,
        normalize_tiles,
        paste_centered,
    )

    norm = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    image = np.random.default_rng(sum(image_hw)).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    tile = 128
    expected = normalize_tiles(grid_tiles(paste_centered(image, canvas_hw, fill, top, left), tile, tile), norm, (tile, tile))
    out = np.full(expected.shape, np.nan, dtype=np.float32)
    normalize_canvas_tiles(out, image, canvas_hw[1], top, left, fill, norm)
    np.testing.assert_array_equal(out, expected)
