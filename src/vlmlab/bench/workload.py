"""Request bodies for the benchmark: synthetic images by size bucket, or the nano synthetic tasks.

Every request is a pure function of (seed, namespace, index), so a run can be repeated exactly
and each concurrency level of a sweep (its own namespace) uses images no other level has sent.
That matters because the thing measured includes caches:

- unique images (``image_pool=None``): every image differs in its pixels, not just its bytes,
  because vLLM hashes decoded pixels while vlmlab hashes the file bytes; neither can hit.
- pooled images (``image_pool=N``): image slot ``k`` of the run is pool entry ``k mod N``, so
  after the first N images every one repeats (expected hit ratio ``1 - N / images``).

Each prompt starts with its request number, so no server can answer from a response cache or
a shared text prefix beyond the images themselves. Warm-up requests use a separate namespace so
they never pre-load the images of the measured run.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmlab.bench.config import BenchConfig, ImageBucket

MIME = {"jpeg": "image/jpeg", "png": "image/png"}
FILLER_WORDS = (
    "image", "photo", "scene", "detail", "colour", "light", "shape", "object", "corner", "edge",
    "left", "right", "top", "bottom", "small", "large", "bright", "dark", "near", "far",
)  # fmt: skip
# Grain tile edge: tiling a small noise tile costs far less than drawing noise for 12 MP, and
# the grain keeps JPEG sizes photo-like (a clean gradient compresses to almost nothing).
_GRAIN_TILE = 256


@dataclass(frozen=True)
class EncodedImage:
    name: str  # the path the image host serves it under, e.g. "r0-17.jpeg"
    data: bytes
    mime: str
    width: int
    height: int


@dataclass
class PreparedRequest:
    """One request, serialised before the clock starts (JSON/base64 cost is not latency).

    Attributes:
        index: position in the run (``-1 - k`` for warm-up ``k``).
        payload: the JSON body as bytes.
        image_count, image_bytes: images attached and their encoded size.
        image_sizes: ``(width, height)`` of each image.
        image_names: stable names of the images (equal names = the same image).
    """

    index: int
    payload: bytes
    image_count: int = 0
    image_bytes: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)


def photo_like(width: int, height: int, seed: int | list[int], fmt: str = "jpeg") -> bytes:
    """A synthetic photo: a smooth random colour field, a few soft shapes, and film grain.

    Inputs: size, an RNG seed (ints or a list of ints), ``jpeg`` or ``png``.
    Output: the encoded file. Different seeds give different pixels.
    """
    rng = np.random.default_rng(seed)
    # A coarse random grid upsampled bicubically reads as out-of-focus background.
    # Colours scatter around one random base tone (a scene's palette) rather than spanning the
    # whole cube, and the cells are roughly square whatever the aspect ratio.
    rows = int(rng.integers(3, 7))
    cols = max(2, round(rows * width / height))
    base = rng.uniform(40, 215, size=3)
    coarse = np.clip(base + rng.normal(0, 45, size=(rows, cols, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20 + 1, width // 3 + 2)), int(rng.integers(height // 20 + 1, height // 3 + 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    tile = rng.integers(-12, 13, size=(_GRAIN_TILE, _GRAIN_TILE, 3), dtype=np.int16)
    reps = (-(-height // _GRAIN_TILE), -(-width // _GRAIN_TILE), 1)
    pixels = np.asarray(image, dtype=np.int16) + np.tile(tile, reps)[:height, :width]
    out = io.BytesIO()
    result = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if fmt == "png":
        result.save(out, "PNG", compress_level=1)  # fast: encoding time is not what we measure
    else:
        result.save(out, "JPEG", quality=90)
    return out.getvalue()


def data_url(image: EncodedImage) -> str:
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"


class Workload:
    """Builds the requests of one run (one concurrency level) and keeps the images it sent.

    Inputs: the config, the model id to send, a ``namespace`` (the level's number) and, for the
    http transport, the image host's base URL. ``build(i)`` is thread-safe.
    """

    def __init__(self, config: BenchConfig, model: str, namespace: int, image_base_url: str | None = None):
        self.config = config
        self.model = model
        self.namespace = namespace
        self.image_base_url = image_base_url
        self._images: dict[str, EncodedImage] = {}
        self._lock = threading.Lock()
        total = sum(b.weight for b in config.image_sizes)
        self._weights = np.array([b.weight / total for b in config.image_sizes])

    # -- images --------------------------------------------------------------------------------

    def image(self, name: str) -> EncodedImage | None:
        """An image this workload has built, by name (what the image host serves)."""
        with self._lock:
            return self._images.get(name)

    def _remember(self, image: EncodedImage) -> EncodedImage:
        # Unique images sent inline are never needed again: keeping them would hold every
        # image of the run in memory twice (file and base64 body).
        if self.config.transport == "data" and self.config.image_pool is None:
            return image
        with self._lock:
            return self._images.setdefault(image.name, image)

    def _bucket(self, namespace: int, slot: int) -> ImageBucket:
        rng = np.random.default_rng([self.config.seed, namespace, slot, 1])
        return self.config.image_sizes[int(rng.choice(len(self._weights), p=self._weights))]

    def random_image(self, namespace: int, slot: int) -> EncodedImage:
        fmt = self.config.image_format
        name = f"r{namespace}-{slot}.{fmt}"
        known = self.image(name)
        if known is not None:
            return known
        bucket = self._bucket(namespace, slot)
        data = photo_like(bucket.width, bucket.height, [self.config.seed, namespace, slot], fmt)
        return self._remember(EncodedImage(name, data, MIME[fmt], bucket.width, bucket.height))

    def _slot(self, index: int, position: int, per_request: int) -> int:
        """Which image (pool entry, or unique number) position ``position`` of request ``index`` uses."""
        flat = index * per_request + position
        return flat if self.config.image_pool is None else flat % self.config.image_pool

    # -- requests ------------------------------------------------------------------------------

    def build(self, index: int, warmup: bool = False) -> PreparedRequest:
        """Request ``index`` of the run (or warm-up ``index``), serialised.

        Warm-ups live in their own namespace and never share images with measured requests.
        """
        namespace = self.namespace + (1_000_000 if warmup else 0)
        if self.config.dataset == "synth":
            images, question = self._synth(namespace, index)
        else:
            per = self.config.images_per_request
            images = [self.random_image(namespace, self._slot(index, j, per)) for j in range(per)]
            question = self.config.prompt
        text = f"{'Warm-up' if warmup else 'Request'} {index}. {self._filler(namespace, index)}{question}"
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": self._url(im)}} for im in images]
        parts.append({"type": "text", "text": text})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.config.ignore_eos:  # a vLLM extension; OpenAI itself would reject the field
            body["ignore_eos"] = True
        return PreparedRequest(
            index=-1 - index if warmup else index,
            payload=json.dumps(body, separators=(",", ":")).encode(),
            image_count=len(images),
            image_bytes=sum(len(im.data) for im in images),
            image_sizes=[(im.width, im.height) for im in images],
            image_names=[im.name for im in images],
        )

    def _url(self, image: EncodedImage) -> str:
        if self.config.transport == "http":
            return f"{self.image_base_url}/{image.name}"
        return data_url(image)

    def _filler(self, namespace: int, index: int) -> str:
        if not self.config.prompt_words:
            return ""
        rng = np.random.default_rng([self.config.seed, namespace, index, 2])
        words = rng.choice(len(FILLER_WORDS), size=self.config.prompt_words)
        return " ".join(FILLER_WORDS[int(w)] for w in words) + ". "

    def _synth(self, namespace: int, index: int) -> tuple[list[EncodedImage], str]:
        """The nano synthetic task sample for this request (pooled by sample, not by image)."""
        from vlmlab.nano.tasks import make_sample

        pool = self.config.image_pool
        sample_index = index if pool is None else index % pool
        stream_seed = self.config.seed * 1_000_003 + namespace
        sample = make_sample(sample_index, seed=stream_seed)
        images = []
        for j, picture in enumerate(sample.images):
            name = f"s{namespace}-{sample_index}-{j}.png"
            known = self.image(name)
            if known is None:
                buf = io.BytesIO()
                picture.convert("RGB").save(buf, "PNG")
                known = self._remember(EncodedImage(name, buf.getvalue(), MIME["png"], picture.width, picture.height))
            images.append(known)
        return images, sample.question

    def expected_hit_ratio(self, requests: list[PreparedRequest]) -> float | None:
        """Share of the images sent that an unbounded per-image cache could answer (repeats)."""
        names = [n for r in requests for n in r.image_names]
        if not names:
            return None
        return (len(names) - len(set(names))) / len(names)
