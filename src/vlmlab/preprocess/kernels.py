"""Pixel kernels shared by every family: resampling primitives, normalization, tiling.

Where the time goes in the reference processors (transformers issue #34272 and our own
profiles): per-image ``np.array`` / ``astype(float64)`` round trips, a float64 rescale pass, a
separate normalize pass with transposes, channels-first copies before a resize that wants
channels-last, and a final stack/concatenate. What stays here is the resampling primitive itself
(called exactly as the reference calls it, so the resized uint8 pixels are bit-identical) plus
one pass that turns uint8 pixels into normalized float32, written straight into the final output
buffer in the layout the model wants.

Two resampling engines:

* ``"pil"``: ``PIL.Image.resize`` on the decoded image, as transformers' ``*ImageProcessorPil``
  classes (``image_transforms.resize``) and the Phi-3 / InternVL model-card code do.
* ``"torch"``: ``torch.nn.functional.interpolate(uint8, antialias=True)``, the call
  ``torchvision.transforms.v2.functional.resize_image`` makes for transformers' default
  (torchvision-backend) processors. We hand it a channels-last view of the decoded HWC array:
  the uint8 kernel works channels-last internally, so the reference's ``permute().contiguous()``
  copy to planar layout costs ~3x the resize itself and changes nothing in the result (checked in
  ``tests/test_preprocess_exact.py``).

Decoded pixels are read in place: ``decode_bytes`` has PIL decode into one block of memory
(advised into huge pages) and :func:`rgbx_view` views its RGBX storage through Pillow's Arrow
export, where ``np.asarray(image)`` (what the references do) copies the 12 MP raster twice.

torch is imported lazily: the PIL paths work without it.
"""

from __future__ import annotations

import ctypes
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from vlmlab.protocol.errors import ConfigError

Filter = Literal["bicubic", "bilinear", "lanczos"]
Engine = Literal["pil", "torch"]

# PIL enum per filter name, and the torch ``interpolate`` mode torchvision maps it to
# (transformers ``image_utils.pil_torch_interpolation_mapping``; torchvision ``InterpolationMode``).
_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


def torch_module() -> Any:
    """``torch``, or a ConfigError saying how to get it (or avoid needing it)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is installed wherever tests run
        raise ConfigError(
            "this preprocessing path needs torch (the torchvision-backend reference resizes with "
            "torch); install torch or pass backend='pil'",
            param="backend",
        ) from e
    return torch


# --------------------------------------------------------------------------- output buffers

OutputAllocator = Callable[[tuple[int, ...], np.dtype], "np.ndarray | None"]
_OUTPUT_ALLOCATOR: ContextVar[OutputAllocator | None] = ContextVar("vlmlab_output_allocator", default=None)


@contextmanager
def outputs_from(allocator: OutputAllocator) -> Iterator[None]:
    """Within the block, :func:`output_array` asks ``allocator`` first (a preprocessing
    worker's shared memory, :class:`vlmlab.preprocess.shm.Arena`)."""
    token = _OUTPUT_ALLOCATOR.set(allocator)
    try:
        yield
    finally:
        _OUTPUT_ALLOCATOR.reset(token)


def output_array(shape: tuple[int, ...], dtype: Any = np.float32, *, zeros: bool = False) -> np.ndarray:
    """A tensor a pipeline returns (``pixel_values`` and the like): from the current output
    allocator when one is set and takes it (its arrays are zero-filled), else ``np.empty`` /
    ``np.zeros``."""
    allocator = _OUTPUT_ALLOCATOR.get()
    if allocator is not None:
        array = allocator(tuple(int(n) for n in shape), np.dtype(dtype))
        if array is not None:
            return array
    return np.zeros(shape, dtype=dtype) if zeros else np.empty(shape, dtype=dtype)


# --------------------------------------------------------------------------- pixels


class Pixels:
    """An RGB uint8 image in whichever form the last operation produced.

    Exactly one of ``pil`` (a ``PIL.Image`` in mode RGB), ``array`` (HWC uint8, any strides) or
    ``tensor`` (torch uint8 ``(1, C, H, W)``, any memory format) is set; conversions are lazy
    and only copy when the consumer needs another form. ``array`` and ``tensor`` may carry a
    fourth, padding channel (PIL's own RGBX storage, viewed without a copy, and what torch
    resamples it into): :meth:`hwc` never shows it, and it changes nothing in the RGB channels
    (each channel is resampled on its own; checked in ``tests/test_preprocess_exact.py``).
    """

    __slots__ = ("array", "pil", "tensor")

    def __init__(
        self, pil: Image.Image | None = None, array: np.ndarray | None = None, tensor: Any = None
    ):
        self.pil, self.array, self.tensor = pil, array, tensor

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        if self.pil is not None:
            return self.pil.size
        if self.array is not None:
            return self.array.shape[1], self.array.shape[0]
        return int(self.tensor.shape[3]), int(self.tensor.shape[2])

    def _array(self) -> np.ndarray:
        """(H, W, 3 or 4) uint8: PIL's RGBX storage viewed in place where it allows that, else
        one copy out of it (``np.asarray``, read-only)."""
        if self.array is None:
            if self.pil is not None:
                view = rgbx_view(self.pil)
                self.array = np.asarray(self.pil) if view is None else view
            else:
                self.array = self.tensor[0].permute(1, 2, 0).numpy()
        return self.array

    def hwc(self) -> np.ndarray:
        """An (H, W, 3) uint8 view (a copy only when PIL keeps the pixels in several blocks)."""
        array = self._array()
        return array if array.shape[2] == 3 else array[:, :, :3]

    def planes(self) -> np.ndarray:
        """:meth:`hwc` backed by three contiguous planes (:func:`channel_planes`: a copy unless
        torch left the pixels planar)."""
        return channel_planes(self._array())

    def to_pil(self) -> Image.Image:
        if self.pil is None:
            self.pil = Image.fromarray(np.ascontiguousarray(self.hwc()), "RGB")
        return self.pil

    def to_tensor(self, channels_last: bool = False) -> Any:
        """``(1, C, H, W)`` uint8, channels-last in memory when it came from an HWC array (no
        copy); C is 4 when the pixels are PIL's RGBX storage (torch's uint8 kernel packs RGB into
        4 bytes a pixel itself, so the padding channel costs nothing).

        ``channels_last``: give the batch dimension a stride torch's ``suggest_memory_format``
        accepts (a view), so that ``interpolate`` keeps its output channels-last too (see
        :func:`resize`). Without it the batch stride is ``C`` (``unsqueeze`` after ``permute``),
        torch reads the layout as ambiguous and unpacks its result into planes.
        """
        if self.tensor is None:
            torch = torch_module()
            with warnings.catch_warnings():
                # np.asarray(PIL) is read-only; interpolate only reads its input.
                warnings.filterwarnings("ignore", message=".*not writable.*")
                self.tensor = torch.from_numpy(self._array()).permute(2, 0, 1).unsqueeze(0)
        tensor = self.tensor
        if channels_last and tensor.stride(0) < tensor.numel():
            # One image: the batch stride never addresses memory, any value is a valid view.
            tensor = tensor.as_strided(tensor.shape, (tensor.numel(), *tensor.stride()[1:]))
        return tensor


# -- PIL's pixel storage without a copy (Arrow C data interface, Pillow >= 11.2) -----------------


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _Exported:
    """Keeps Pillow's exported Arrow array (and with it the image memory: Pillow counts the
    export as a reference) alive for as long as a numpy view of it exists."""

    __slots__ = ("__array_interface__", "capsules")

    def __init__(self, capsules: tuple[Any, Any], interface: dict[str, Any]):
        self.capsules = capsules
        self.__array_interface__ = interface


def _export(core: Any, width: int, height: int) -> tuple[tuple[Any, Any], int] | None:
    """(Arrow capsules, address of the first pixel) of an RGB ``ImagingCore`` stored in one
    block, or None (several blocks, another layout, a Pillow without Arrow export)."""
    try:
        schema_capsule, array_capsule = core.__arrow_c_schema__(), core.__arrow_c_array__()
    except (ValueError, OSError, AttributeError):  # rows in several blocks, no arrow support
        return None
    schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
    if (
        schema.format != b"+w:4"
        or schema.n_children != 1
        or schema.children[0].contents.format != b"C"
        or array.n_children != 1
        or array.length != width * height
        or array.offset != 0
    ):
        return None
    child = array.children[0].contents
    if child.n_buffers != 2 or child.offset != 0 or child.length != 4 * width * height:
        return None
    return (schema_capsule, array_capsule), int(child.buffers[1])


def rgbx_view(image: Image.Image) -> np.ndarray | None:
    """A read-only ``(H, W, 4)`` uint8 view of an RGB image's own storage (R, G, B, padding),
    or None where Pillow cannot export it in one piece (before 11.2, or an image whose rows
    live in several blocks: use ``np.asarray``). :func:`decode_bytes` allocates decoded images
    in one block so that this works; ``np.asarray`` would copy the whole raster twice (PIL's
    ``tobytes`` in chunks, then their join) to drop the padding byte."""
    if image.mode != "RGB" or not hasattr(image, "__arrow_c_array__"):
        return None
    image.load()
    width, height = image.size
    exported = _export(image.im, width, height)
    if exported is None:
        return None
    capsules, address = exported
    interface = {
        "version": 3,
        "shape": (height, width, 4),
        "typestr": "|u1",
        "data": (address, True),  # read-only: the image's pixels, never written
    }
    return np.asarray(_Exported(capsules, interface))


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux <asm-generic/mman-common.h>


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """``madvise(MADV_HUGEPAGE)`` over the 2 MiB pages inside [address, address + nbytes).

    A fresh multi-MB block is first touched by the decoder: in 4 KiB pages that is ~12,000
    page faults for a 12 MP image (~15 ms, as much as the copy the view saves); in huge pages
    ~24. numpy advises its own large arrays the same way. Linux only; a no-op elsewhere."""
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start or not hasattr(ctypes, "CDLL"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):  # pragma: no cover - not Linux / no madvise
        pass


def new_block_storage(image: Image.Image) -> None:
    """Before ``image.load()``: have it decode into one block, so :func:`rgbx_view` can view it.

    Pillow otherwise allocates large images in 16 MB blocks of rows. Only for plugins that
    decode into the storage ``ImageFile.load_prepare`` would create; a no-op where Pillow lacks
    ``core.new_block``."""
    new_block = getattr(Image.core, "new_block", None)
    if new_block is None or image.mode != "RGB" or getattr(image, "_im", False) is not None:
        return
    core = new_block(image.mode, image.size)
    width, height = image.size
    if sys.platform == "linux" and 4 * width * height >= 4 * _HUGE_PAGE:
        exported = _export(core, width, height)
        if exported is not None:
            _advise_huge_pages(exported[1], 4 * width * height)
    image.im = core


def resize(
    pixels: Pixels,
    size: tuple[int, int],
    filter: Filter,
    engine: Engine,
    *,
    reducing_gap: float | None = None,
    channels_last: bool = False,
) -> Pixels:
    """Resample ``pixels`` to ``size`` = (width, height) with ``filter`` on ``engine``.

    Same-size requests return the input untouched: PIL's ``resize`` returns a copy and
    torchvision's ``resize_image`` returns its input for them, so the pixels are identical.
    ``reducing_gap`` (PIL only) is the fast mode's two-step reduction; exact paths leave it None.

    ``channels_last`` (torch only; the pixels are the same either way): keep the result
    interleaved, as the uint8 kernel computes it, instead of having torch unpack it into planes
    and, when it is resized again, pack it back (for Idefics3's 1456x1092 image ~1.5 ms and
    ~1.3 ms of a ~13 ms resize stage, one thread). Worth it where the result is resized again
    or tiled through :func:`channel_planes`; :func:`normalize_into` reads planes faster than
    interleaved pixels, so a result only normalized is better left planar.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ConfigError(f"cannot resize to {width}x{height}")
    if pixels.size == (width, height):
        return pixels
    if engine == "pil":
        out = pixels.to_pil().resize(
            (width, height), _PIL_FILTERS[filter], reducing_gap=reducing_gap
        )
        return Pixels(pil=out)
    torch = torch_module()
    # The exact call torchvision makes for uint8 CPU tensors (resize_image: align_corners=False,
    # antialias=True, native uint8 kernel for bicubic/lanczos; bilinear on AVX2/AVX512 CPUs).
    out = torch.nn.functional.interpolate(
        pixels.to_tensor(channels_last),
        size=[height, width],
        mode=filter,
        align_corners=False,
        antialias=True,
    )
    return Pixels(tensor=out)


# --------------------------------------------------------------------------- normalize


@dataclass(frozen=True)
class Normalization:
    """``(pixel * rescale - mean) / std`` per channel, fused into ``pixel * scale + offset``.

    The references compute ``(float32(pixel / 255) - mean) / std`` in two or three float passes
    (transformers' PIL backend even rescales in float64 first); the fused form differs from them
    by a few float32 ulps (< 1e-6 on these value ranges), far inside the 1e-5 tolerance.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    scale: np.ndarray = field(init=False, repr=False, compare=False)
    offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        std = np.asarray(self.std, dtype=np.float64)
        object.__setattr__(self, "scale", (self.rescale / std).astype(np.float32))
        object.__setattr__(self, "offset", (-mean / std).astype(np.float32))

    def value(self, pixel: tuple[int, int, int]) -> np.ndarray:
        """The normalized float32 value of one RGB pixel (used for constant padding)."""
        return (np.asarray(pixel, np.float32) * self.scale + self.offset).astype(np.float32)


def normalize_into(out: np.ndarray, hwc: np.ndarray, norm: Normalization) -> None:
    """Write ``normalize(hwc)`` into ``out`` (3, h, w) float32, one plane at a time.

    ``hwc`` may be any uint8 (h, w, 3) view (a tile of a canvas, a transposed tensor); reading it
    plane by plane and writing contiguous float32 planes is the cheapest numpy order found (two
    passes per plane, no temporaries).
    """
    for c in range(3):
        plane = out[c]
        np.multiply(hwc[:, :, c], norm.scale[c], out=plane, dtype=np.float32)
        plane += norm.offset[c]


def channel_planes(pixels: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 view of ``pixels`` (H, W, 3 or 4; a fourth channel is padding)
    backed by three contiguous planes: a view of ``pixels`` when it already is planar, else one
    copy.

    :func:`normalize_into` reads a plane of interleaved RGB(X) pixels with a 3- or 4-byte
    stride, about twice as slow as a contiguous plane; for a large image cut into tiles,
    copying out the planes first (one pass of uint8, not float32) is cheaper overall.
    """
    rgb = pixels[:, :, :3]
    if rgb.strides[1] == 1:  # already planar (a tensor torch unpacked into planes)
        return rgb
    height, width = rgb.shape[:2]
    planes = np.empty((3, height, width), dtype=np.uint8)
    if pixels.shape[2] == 4 and pixels.strides[1:] == (4, 1):
        # RGBX read as one little-endian uint32 a pixel: shifting a channel down and narrowing
        # it are contiguous (SIMD) loops, ~1.6x faster than three byte copies with a 4-byte stride.
        words = pixels.view("<u4")[:, :, 0]
        np.copyto(planes[0], words, casting="unsafe")  # narrowing keeps the low byte: R
        shifted = np.empty((height, width), dtype=np.uint32)
        for c in (1, 2):
            np.right_shift(words, 8 * c, out=shifted)
            np.copyto(planes[c], shifted, casting="unsafe")
    else:
        for c in range(3):
            planes[c] = rgb[:, :, c]
    return planes.transpose(1, 2, 0)


def normalize_tiles(
    views: list[np.ndarray], norm: Normalization, tile: tuple[int, int]
) -> np.ndarray:
    """Stack same-size HWC uint8 ``views`` into one normalized ``(n, 3, th, tw)`` float32 array."""
    th, tw = tile
    out = output_array((len(views), 3, th, tw))
    for index, view in enumerate(views):
        normalize_into(out[index], view, norm)
    return out


def normalize_canvas_tiles(
    out: np.ndarray, image: np.ndarray, canvas_w: int, top: int, left: int, fill: int, norm: Normalization
) -> None:
    """``normalize_tiles(grid_tiles(paste_centered(image, ..., fill, top, left)))`` written into
    ``out`` (n, 3, th, tw) without building the canvas: each output pixel is written once, from
    the HWC uint8 ``image`` or as the normalized ``fill``."""
    th, tw = out.shape[2], out.shape[3]
    cols = canvas_w // tw
    height, width = image.shape[:2]
    background = np.empty((3, 1, 1), dtype=np.float32)
    normalize_into(background, np.full((1, 1, 3), fill, dtype=np.uint8), norm)  # same arithmetic
    for index in range(out.shape[0]):
        row, col = divmod(index, cols)
        y0, x0 = row * th, col * tw
        # the image's part of this tile, in tile coordinates
        ty0, ty1 = max(0, top - y0), min(th, top + height - y0)
        tx0, tx1 = max(0, left - x0), min(tw, left + width - x0)
        tile = out[index]
        if (ty0, tx0, ty1, tx1) != (0, 0, th, tw):  # not all image: fill first
            tile[...] = background
        if ty0 < ty1 and tx0 < tx1:
            part = image[y0 + ty0 - top : y0 + ty1 - top, x0 + tx0 - left : x0 + tx1 - left]
            normalize_into(tile[:, ty0:ty1, tx0:tx1], part, norm)


def grid_tiles(canvas: np.ndarray, tile_h: int, tile_w: int) -> list[np.ndarray]:
    """Row-major (top-left first) tiles of an HWC canvas whose sides are multiples of the tile."""
    rows, cols = canvas.shape[0] // tile_h, canvas.shape[1] // tile_w
    return [
        canvas[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w]
        for r in range(rows)
        for c in range(cols)
    ]


def paste_centered(
    image: np.ndarray, canvas_hw: tuple[int, int], fill: int, top: int, left: int
) -> np.ndarray:
    """A uint8 canvas of ``canvas_hw`` filled with ``fill`` with ``image`` at (top, left)."""
    canvas = np.full((canvas_hw[0], canvas_hw[1], 3), fill, dtype=np.uint8)
    canvas[top : top + image.shape[0], left : left + image.shape[1]] = image
    return canvas


# --------------------------------------------------------------------------- cubic (no antialias)


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (out, 4) and weights (out, 4) of Keys' cubic (A = -0.75), half-pixel centres,
    clamped borders: the rule of ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False, antialias=False)`` and of OpenCV's ``INTER_CUBIC``."""
    a = -0.75
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    # Keys' kernel at distances 1+t, t, 1-t, 2-t (torch's get_cubic_upsample_coefficients).
    x1 = t + 1.0
    w0 = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    x2 = 1.0 - t
    w2 = ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1
    x3 = 2.0 - t
    w3 = ((a * x3 - 5 * a) * x3 + 8 * a) * x3 - 4 * a
    weights = np.stack([w0, w1, w2, w3], axis=1).astype(np.float32)
    index = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(index, 0, in_size - 1), weights


def cubic_resize_planes(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic (no antialias) resize of float32 (C, H, W) planes to (C, h, w) = ``size`` (h, w).

    Phi-3's global thumbnail is ``F.interpolate(normalized, (336, 336), mode="bicubic")``; it is
    linear in the pixels, so it is computed here in two separable numpy passes (4 taps each)
    instead of needing torch. Agrees with torch to ~1e-6.
    """
    out_h, out_w = size
    row_idx, row_w = _cubic_taps(planes.shape[1], out_h)
    col_idx, col_w = _cubic_taps(planes.shape[2], out_w)
    rows = np.einsum("chkw,hk->chw", planes[:, row_idx, :], row_w, optimize=True)
    return np.einsum("chwk,wk->chw", rows[:, :, col_idx], col_w, optimize=True).astype(np.float32)


# --------------------------------------------------------------------------- quality


def psnr(a: np.ndarray, b: np.ndarray, pixel_scale: float = 1.0) -> float:
    """PSNR in dB between two tensors of equal shape, with a 255 peak.

    ``pixel_scale`` converts the tensors' units to 0..255 pixel units: for normalized tensors
    pass ``255 * std`` (the mean of the per-channel stds is close enough for CLIP/SigLIP stats).
    """
    diff = (a.astype(np.float64) - b.astype(np.float64)) * pixel_scale
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
