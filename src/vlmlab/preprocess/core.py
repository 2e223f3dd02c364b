"""The preprocessing API: a family's image -> the exact tensors its model takes, with timings.

``get_preprocessor(family, mode, **options)`` builds a :class:`Preprocessor` for one family
(name, HF ``model_type`` or hub id, as :func:`vlmlab.families.get_family`) and its options (the
family's own, e.g. ``num_crops``, plus ``backend``). Calling it on a decoded image, or
:meth:`Preprocessor.from_bytes` / :func:`preprocess_bytes` on encoded bytes, returns a
:class:`Preprocessed`: numpy tensors named and shaped as the reference processor returns them for
one image, the family's :class:`~vlmlab.families.ImageLayout` (token count, grid) and the seconds
spent per stage (``decode``, ``resize``, ``normalize``, ``to_tensor``).

Modes:

* ``exact`` (default): equal to the reference within 1e-5 on every normalized pixel, same
  shapes. The reference is chosen by ``backend``: ``"torchvision"`` (transformers' default
  processor class, what ``AutoProcessor`` loads when torchvision is installed) or ``"pil"``
  (transformers' ``*ImageProcessorPil`` class / ``use_fast=False``) for the transformers
  families; Pixtral's ``variant="mistral"`` follows mistral_common and Phi-3(.5)-vision its
  remote code, each a single reference (``backend`` may be omitted or named as listed).
* ``fast`` (opt-in): the same token count and shapes; JPEGs much larger than the target are
  decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``), resampling always uses
  torch's channels-last uint8 kernel when torch is present, and normalization writes straight
  into the output. Close to exact (``benchmarks/preprocess.py`` reports the PSNR), not equal.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from vlmlab import media
from vlmlab.families import Family, ImageLayout, get_family
from vlmlab.preprocess.kernels import (
    Engine,
    Filter,
    Normalization,
    Pixels,
    new_block_storage,
    resize,
)
from vlmlab.protocol.core import ImageData
from vlmlab.protocol.errors import ConfigError, ImageDecodeError, ImageTooLargeError, VlmlabError
from vlmlab.registry import Registry

Mode = Literal["exact", "fast"]
MODES = ("exact", "fast")
STAGES = ("decode", "resize", "normalize", "to_tensor")


@dataclass
class Preprocessed:
    """One image, ready for the model.

    Attributes:
        tensors: model inputs named as the reference processor names them (``pixel_values``,
            ``image_sizes``, ``image_grid_thw``, ``num_patches``, ``pixel_attention_mask``, ...),
            shaped as its output for a one-image call; float32 pixels, int64 metadata.
        grid: the family's layout of this image (prompt tokens, vision positions, grid, views),
            from the same family record the planner uses.
        stages: seconds spent per stage: ``decode`` (bytes to RGB, only from bytes),
            ``resize`` (every resampling and pixel-format change), ``normalize`` (rescale and
            normalize into the output buffers) and ``to_tensor`` (layout, padding, metadata).
        family, mode, backend: what produced it.
        size: (width, height) of the source image after EXIF orientation.
    """

    tensors: dict[str, np.ndarray]
    grid: ImageLayout
    stages: dict[str, float]
    family: str
    mode: str
    backend: str
    size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())

    def torch(self) -> dict[str, Any]:
        """The tensors as torch tensors sharing memory with the numpy arrays (no copy)."""
        import torch

        return {
            name: torch.from_numpy(np.ascontiguousarray(value))
            for name, value in self.tensors.items()
        }


class Context:
    """What a family pipeline needs besides the pixels: the resampling engine and a stopwatch."""

    def __init__(self, mode: Mode, backend: str, stages: dict[str, float]):
        self.mode = mode
        self.backend = backend
        self.stages = stages
        self.engine: Engine = _engine_for(mode, backend)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def resize(
        self,
        pixels: Pixels,
        size: tuple[int, int],
        filter: Filter,
        *,
        channels_last: bool = False,
    ) -> Pixels:
        """``pixels`` resampled to ``size`` (width, height) the way this mode/backend does it;
        ``channels_last`` as :func:`vlmlab.preprocess.kernels.resize` (same pixels)."""
        with self.stage("resize"):
            # Without torch, fast mode falls back to PIL's two-step reduction (reducing_gap).
            gap = 2.0 if self.mode == "fast" and self.engine == "pil" else None
            return resize(
                pixels, size, filter, self.engine, reducing_gap=gap, channels_last=channels_last
            )

    def hwc(self, pixels: Pixels, *, planes: bool = False) -> np.ndarray:
        """An (H, W, 3) uint8 view of ``pixels``; ``planes``: backed by channel planes
        (:meth:`Pixels.planes`, a copy when interleaved)."""
        with self.stage("resize"):
            return pixels.planes() if planes else pixels.hwc()


def _engine_for(mode: Mode, backend: str) -> Engine:
    if mode == "fast":
        try:
            import torch  # noqa: F401
        except ImportError:  # pragma: no cover - torch is installed wherever tests run
            return "pil"
        return "torch"
    return "torch" if backend == "torchvision" else "pil"


RunFn = Callable[[Pixels, tuple[int, int], Mapping[str, Any], Context], dict[str, np.ndarray]]
TargetsFn = Callable[[int, int, Mapping[str, Any]], list[tuple[int, int]]]


@dataclass(frozen=True)
class Pipeline:
    """How one family preprocesses an image.

    Attributes:
        run: ``(pixels, (width, height), options, context) -> tensors``; ``(width, height)`` is
            the source size every geometric decision uses (in fast mode the pixels may be a
            DCT-downscaled decode of that source).
        source_targets: the (width, height) of every resize applied to the source pixels, so fast
            mode knows how far JPEG decoding may shrink the image.
        norm: the normalization statistics (or a function of the options giving them).
        backends: the references this pipeline matches, per options; the first is the default.
        reference: what the pipeline reproduces, for messages and docs.
    """

    run: RunFn
    source_targets: TargetsFn
    norm: Normalization | Callable[[Mapping[str, Any]], Normalization]
    backends: Callable[[Mapping[str, Any]], tuple[str, ...]]
    reference: str

    def normalization(self, options: Mapping[str, Any]) -> Normalization:
        return self.norm if isinstance(self.norm, Normalization) else self.norm(options)


HF_BACKENDS = ("torchvision", "pil")

# Family name -> "module:attr" of its Pipeline, imported on first use.
PIPELINES: Registry[Pipeline] = Registry("preprocessing pipeline")
for _family, _target in {
    "pixtral": "vlmlab.preprocess.pixtral:PIXTRAL",
    "nano": "vlmlab.preprocess.pixtral:NANO",
    "qwen2_vl": "vlmlab.preprocess.qwen:QWEN",
    "qwen2_5_vl": "vlmlab.preprocess.qwen:QWEN",
    "llava_next": "vlmlab.preprocess.llava:LLAVA_NEXT",
    "llava_onevision": "vlmlab.preprocess.llava:LLAVA_ONEVISION",
    "internvl2": "vlmlab.preprocess.tiles:INTERNVL2",
    "idefics3": "vlmlab.preprocess.tiles:IDEFICS3",
    "phi3_5_vision": "vlmlab.preprocess.phi:PHI3V",
    "phi3_vision": "vlmlab.preprocess.phi:PHI3V",
}.items():
    PIPELINES.register(_family, _target)


class Preprocessor:
    """A family's preprocessing with fixed mode and options; call it on images.

    Build with :func:`get_preprocessor`. Thread-safe and picklable (it holds only names and
    option values), so one instance can serve a thread or process pool.
    """

    def __init__(self, family: Family, mode: Mode, backend: str, options: Mapping[str, Any]):
        self.family = family
        self.mode = mode
        self.backend = backend
        self.options = dict(options)
        self.pipeline = PIPELINES.get(family.name)
        self.norm = self.pipeline.normalization(self.options)

    def __repr__(self) -> str:
        return (
            f"Preprocessor({self.family.name!r}, mode={self.mode!r}, "
            f"backend={self.backend!r}, options={self.options})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.family.name, self.mode, self.backend, self.options))

    def __call__(
        self, image: Image.Image | ImageData, *, source_size: tuple[int, int] | None = None
    ) -> Preprocessed:
        """Preprocess one decoded image.

        Args:
            image: an RGB ``PIL.Image`` or an :class:`ImageData` from :mod:`vlmlab.media` (other
                modes are converted as :mod:`vlmlab.media` does: alpha over white).
            source_size: (width, height) of the original when ``image`` is a reduced decode of
                it (fast mode); every size decision uses it. Defaults to ``image``'s size.

        Returns:
            :class:`Preprocessed` (``stages`` has no ``decode`` entry).

        Raises:
            ImageSizeError: the reference rejects this size (Qwen aspect > 200, a side scaled
                to 0 px). ConfigError: torch missing for a torch-backed path.
        """
        return self._run(image, source_size, {})

    def from_bytes(self, data: bytes, policy: media.MediaPolicy | None = None) -> Preprocessed:
        """Decode ``data`` under ``policy`` (``vlmlab.media`` rules and limits) and preprocess it.

        Raises:
            ImageDecodeError / ImageTooLargeError: as :func:`vlmlab.media.decode_image`.
            ImageSizeError: see :meth:`__call__`.
        """
        stages: dict[str, float] = {}
        start = time.perf_counter()
        image, source_size = decode_bytes(
            data, policy, self._draft_target if self.mode == "fast" else None
        )
        stages["decode"] = time.perf_counter() - start
        return self._run(image, source_size, stages)

    # -- internals ---------------------------------------------------------------------------

    def _draft_target(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest (width, height) every source resize still downscales from, or None."""
        self.family.image_layout(width, height, **self.options)  # reject bad sizes before decoding
        targets = self.pipeline.source_targets(width, height, self.options)
        if not targets:
            return None
        return max(t[0] for t in targets), max(t[1] for t in targets)

    def _run(
        self, image: Any, source_size: tuple[int, int] | None, stages: dict[str, float]
    ) -> Preprocessed:
        if isinstance(image, ImageData):
            if image.image is None:
                raise ConfigError(f"image {image.source or image.sha256[:12]} carries no pixels")
            source_size = source_size or image.size
            image = image.image
        if not isinstance(image, Image.Image):
            raise ConfigError(f"expected a PIL image or ImageData, got {type(image).__name__}")
        if image.mode != "RGB":
            image = media._to_rgb(image)  # the same conversion vlmlab.media applies on decode
        width, height = source_size or image.size
        layout = self.family.image_layout(width, height, **self.options)
        context = Context(self.mode, self.backend, stages)
        tensors = self.pipeline.run(Pixels(pil=image), (width, height), self.options, context)
        for name in STAGES[1:]:
            stages.setdefault(name, 0.0)
        return Preprocessed(
            tensors, layout, stages, self.family.name, self.mode, self.backend, (width, height)
        )


def _rebuild(family: str, mode: Mode, backend: str, options: Mapping[str, Any]) -> Preprocessor:
    return get_preprocessor(family, mode, backend=backend, **options)


@functools.lru_cache(maxsize=128)
def _cached(
    family_name: str, mode: str, backend: str | None, items: tuple[tuple[str, Any], ...]
) -> Preprocessor:
    if mode not in MODES:
        raise ConfigError(f"unknown preprocessing mode {mode!r}; use one of {MODES}", param="mode")
    family = get_family(family_name)
    if family.name not in PIPELINES:
        supported = ", ".join(sorted(PIPELINES.names()))
        raise ConfigError(
            f"vlmlab has no image preprocessing for model family {family.name!r}; "
            f"supported: {supported}. Use the model's own processor for it",
            param="family",
        )
    options = family.resolve_options(dict(items))
    pipeline = PIPELINES.get(family.name)
    allowed = pipeline.backends(options)
    chosen = backend if backend is not None else allowed[0]
    if chosen not in allowed:
        raise ConfigError(
            f"backend {chosen!r} is not a reference for {family.name} with options {options}; "
            f"use one of {allowed} (reference: {pipeline.reference})",
            param="backend",
        )
    return Preprocessor(family, mode, chosen, options)  # type: ignore[arg-type]


def get_preprocessor(family: str, mode: Mode = "exact", **options: Any) -> Preprocessor:
    """The preprocessor for ``family`` in ``mode`` with ``options``.

    Args:
        family: family name, HF ``model_type`` or hub id (``"qwen2_vl"``,
            ``"Qwen/Qwen2.5-VL-7B-Instruct"``).
        mode: ``"exact"`` (default) or ``"fast"``.
        options: the family's processor options (checkpoint defaults otherwise) plus
            ``backend``: ``"torchvision"`` (default) or ``"pil"`` for transformers families.

    Raises:
        NotFoundError: unknown family. ConfigError: unknown mode, a family vlmlab does not
        preprocess, a backend that is not a reference for it. UnknownOptionError: an option the
        family does not take.
    """
    backend = options.pop("backend", None)
    items = tuple(sorted(options.items()))
    try:
        return _cached(family, mode, backend, items)
    except TypeError as e:  # an unhashable option value
        raise ConfigError(f"preprocessing options must be plain values, got {options}: {e}") from e


def preprocess_bytes(
    data: bytes,
    family: str,
    mode: Mode = "exact",
    *,
    policy: media.MediaPolicy | None = None,
    **options: Any,
) -> Preprocessed:
    """Decode ``data`` (``vlmlab.media`` limits) and preprocess it for ``family``.

    Equivalent to ``get_preprocessor(family, mode, **options).from_bytes(data, policy)``; see
    there for the errors.
    """
    return get_preprocessor(family, mode, **options).from_bytes(data, policy)


# --------------------------------------------------------------------------- reduced decoding


def decode_bytes(
    data: bytes,
    policy: media.MediaPolicy | None = None,
    target_for: Callable[[int, int], tuple[int, int] | None] | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``data`` to the pixels :func:`vlmlab.media.decode_image` gives, minus its waste.

    Same header checks and limits, first frame, EXIF orientation and RGB conversion (the helpers
    of :mod:`vlmlab.media` are used), but the EXIF step works in place (``decode_image`` copies the
    whole raster even when nothing rotates) and no content hash is computed.

    ``target_for(width, height)`` (fast mode) gets the oriented source size from the header and
    returns the smallest (width, height) the pipeline needs; JPEGs at least twice that size in
    both directions are then decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``: still at least
    the target), which skips most of the IDCT and colour-conversion work.

    Returns:
        (RGB image, oriented (width, height) of the full-size source).

    Raises:
        ImageDecodeError / ImageTooLargeError: as :func:`vlmlab.media.decode_image`.
    """
    policy = policy or media.MediaPolicy()
    src = media._Source(data if isinstance(data, bytes) else bytes(data), "image bytes")
    im = media._open_checked(src, policy)
    fmt = im.format or "unknown"
    raw_w, raw_h = im.size
    rotated = media._header_orientation(im) in media._ROTATING_ORIENTATIONS
    source_size = (raw_h, raw_w) if rotated else (raw_w, raw_h)
    target = target_for(*source_size) if target_for is not None else None
    try:
        if target is not None and fmt in ("JPEG", "MPO"):
            want = (target[1], target[0]) if rotated else target
            if raw_w // want[0] >= 2 and raw_h // want[1] >= 2:
                im.draft(None, want)
        im.seek(0)
        if fmt in ("JPEG", "MPO", "PNG"):
            new_block_storage(im)  # one block: the pipelines then view the pixels, not copy them
        im.load()
        # in_place: exif_transpose otherwise returns a full copy even when nothing rotates.
        ImageOps.exif_transpose(im, in_place=True)
        rgb = media._to_rgb(im)
    except VlmlabError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{src.source} is too large to decode: {e}") from e
    except Exception as e:  # the same failures vlmlab.media maps: truncated, corrupt, ...
        raise ImageDecodeError(f"{src.source} ({fmt}) could not be decoded: {e}") from e
    return rgb, source_size
