"""What one ``vlmlab bench`` run does: target, workload, load shape and outputs, as one record.

The CLI parses flags into :class:`BenchConfig` (with the small parsers below for the compound
flags) and hands it to :func:`vlmlab.bench.run_bench`; nothing else reads flags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmlab.protocol.errors import ConfigError
from vlmlab.units import parse_size

# SLO names follow `vllm bench serve --goodput` (vllm/benchmarks/serve.py, VALID_NAMES).
SLO_METRICS = ("ttft", "tpot", "e2el")

# SGLang bench_serving's named resolutions (--image-resolution 4k/1080p/720p/360p) plus a phone
# camera's 12 MP frame, which is where VLM preprocessing cost shows most.
NAMED_SIZES: dict[str, tuple[int, int]] = {
    "4k": (3840, 2160),
    "1080p": (1920, 1080),
    "720p": (1280, 720),
    "360p": (640, 360),
    "12mp": (4032, 3024),
}


@dataclass(frozen=True)
class ImageBucket:
    """One synthetic image size and its share of the images drawn."""

    width: int
    height: int
    weight: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


def parse_image_sizes(items: str | list[str] | tuple[str, ...]) -> tuple[ImageBucket, ...]:
    """``"512x512,1920x1080:3"`` or ``["1080p", "4032x3024:0.5"]`` -> buckets.

    Each item is ``WIDTHxHEIGHT`` or a name from :data:`NAMED_SIZES`, optionally ``:WEIGHT``
    (relative share, default 1).

    Raises:
        ConfigError: an unreadable size or a weight that is not a positive number.
    """
    raw = [items] if isinstance(items, str) else list(items)
    buckets = []
    for item in (p.strip() for chunk in raw for p in chunk.split(",")):
        if not item:
            continue
        size, _, weight_text = item.partition(":")
        named = NAMED_SIZES.get(size.strip().lower())
        width, height = named if named else parse_size(size)
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            weight = -1.0
        if not weight > 0 or math.isinf(weight):
            raise ConfigError(f"image size weight in {item!r} must be a positive number, e.g. 1920x1080:2")
        buckets.append(ImageBucket(width, height, weight))
    if not buckets:
        raise ConfigError(f"no image size in {items!r}; write e.g. 1024x1024,1920x1080")
    return tuple(buckets)


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft=500,tpot=50"`` (or vLLM's ``"ttft:500 tpot:50"``) -> ``{"ttft": 500.0, ...}`` in ms.

    Raises:
        ConfigError: an unknown metric name or a value that is not a positive number.
    """
    slo: dict[str, float] = {}
    for pair in re.split(r"[,\s]+", (text or "").strip()):
        if not pair:
            continue
        match = re.fullmatch(r"(\w+)[=:](.*)", pair)
        name = (match.group(1) if match else pair).lower()
        if name not in SLO_METRICS:
            raise ConfigError(f"unknown SLO metric {name!r} in --slo; use {', '.join(SLO_METRICS)} (ms), e.g. ttft=500,tpot=50")
        try:
            value = float(match.group(2)) if match else -1.0
        except ValueError:
            value = -1.0
        if not value > 0 or math.isinf(value):
            raise ConfigError(f"--slo {pair!r} needs a positive number of milliseconds, e.g. {name}=500")
        slo[name] = value
    return slo


def parse_concurrency(text: str | None) -> tuple[int | None, ...]:
    """``"1,4,16"`` -> ``(1, 4, 16)`` (sorted, duplicates dropped); empty -> ``(None,)`` (no cap).

    Raises:
        ConfigError: a level that is not a positive integer.
    """
    if not text or not text.strip():
        return (None,)
    levels = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ConfigError(f"concurrency level {item!r} must be a positive integer, e.g. --concurrency 1,4,16")
        levels.add(int(item))
    return tuple(sorted(levels)) or (None,)


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of one benchmark (written into the result JSON as ``settings``).

    Target:
        base_url: an OpenAI-compatible server (``http://host:8000`` or ``.../v1``). ``None``:
            start ``vlmlab serve --model MODEL`` as a subprocess on a free loopback port.
        model: the model id sent in requests (default with ``base_url``: the first entry of
            ``/v1/models``); without ``base_url``, the model the local server loads.
        api_key: sent as ``Authorization: Bearer``.
        serve_args: extra ``vlmlab serve`` flags for the local server (e.g. ``--device cpu``).
        server_start_timeout_s: how long the local server may take to become healthy.

    Workload:
        dataset: ``random`` (synthetic photo-like images of ``image_sizes``) or ``synth``
            (the nano synthetic tasks: small rendered charts, shapes, documents).
        image_sizes, images_per_request, image_format: the random dataset's images.
        image_pool: ``None`` makes every image unique (no preprocessing-cache hit is possible);
            ``N`` reuses N distinct images round-robin, so the hit ratio is about 1 - N/images.
        transport: ``data`` (base64 data URLs in the body) or ``http`` (URLs served by a
            local image host that the bench starts; the target must be allowed to fetch it).
        image_host: address the image host binds and writes into URLs (the target must reach it).
        prompt, prompt_words: the question, and random filler words put before it.
        max_tokens, ignore_eos, temperature: generation settings sent with each request.

    Load:
        request_rate: requests per second (``inf``: all at once); arrivals are Gamma with
            shape ``burstiness`` (1 = Poisson), rescaled to span exactly N/rate (vLLM's rule).
        concurrency: client-side caps to run one after another (``(None,)``: no cap).
        num_requests / duration_s: run size per level (``duration_s`` wins when given).
        warmups: requests sent (and not measured) before each level, with their own images.
        seed: drives images, text and arrival times.
        request_timeout_s: client timeout for connecting and for each wait on the server (a
            stream silent for this long fails the request).
        slo: goodput thresholds in ms for ``ttft``, ``tpot``, ``e2el``.

    Output:
        output: result JSON path. plots: directory for PNG plots (default: next to ``output``).
        make_plots: turn plots off. scrape_metrics: read the server's ``/metrics`` before/after.
    """

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    endpoint: str = "/v1/chat/completions"
    serve_args: tuple[str, ...] = ()
    server_start_timeout_s: float = 300.0

    dataset: Literal["random", "synth"] = "random"
    image_sizes: tuple[ImageBucket, ...] = (ImageBucket(1024, 1024),)
    images_per_request: int = 1
    image_format: Literal["jpeg", "png"] = "jpeg"
    image_pool: int | None = None
    transport: Literal["data", "http"] = "data"
    image_host: str = "127.0.0.1"
    prompt: str = "Describe the image in one sentence."
    prompt_words: int = 0
    max_tokens: int = 64
    ignore_eos: bool = False
    temperature: float = 0.0

    request_rate: float = math.inf
    burstiness: float = 1.0
    concurrency: tuple[int | None, ...] = (None,)
    num_requests: int | None = None
    duration_s: float | None = None
    warmups: int = 1
    seed: int = 0
    request_timeout_s: float = 600.0
    slo: Mapping[str, float] = field(default_factory=dict)

    output: str | None = None
    plots: str | None = None
    make_plots: bool = True
    scrape_metrics: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in ("random", "synth"):
            raise ConfigError(f"unknown dataset {self.dataset!r}; use random or synth")
        if self.transport not in ("data", "http"):
            raise ConfigError(f"unknown transport {self.transport!r}; use data or http")
        if self.image_format not in ("jpeg", "png"):
            raise ConfigError(f"unknown image format {self.image_format!r}; use jpeg or png")
        if self.images_per_request < 0:
            raise ConfigError(f"images_per_request must be >= 0, got {self.images_per_request}")
        if self.image_pool is not None and self.image_pool < 1:
            raise ConfigError(f"image_pool must be at least 1 (or unset for unique images), got {self.image_pool}")
        if not self.request_rate > 0:
            raise ConfigError(f"request_rate must be positive (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ConfigError(f"burstiness must be positive, got {self.burstiness}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError(f"num_requests must be at least 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"duration must be positive, got {self.duration_s}")
        if self.duration_s is not None and math.isinf(self.request_rate) and None in self.concurrency:
            raise ConfigError("--duration with an infinite request rate needs --max-concurrency (or --concurrency), "
                              "otherwise the run would open requests without limit")  # fmt: skip
        if any(c is not None and c < 1 for c in self.concurrency) or not self.concurrency:
            raise ConfigError(f"concurrency levels must be positive integers, got {self.concurrency}")
        if self.max_tokens < 1 or self.warmups < 0 or self.prompt_words < 0:
            raise ConfigError("max_tokens must be >= 1, warmups and prompt_words >= 0")
        unknown = set(self.slo) - set(SLO_METRICS)
        if unknown:
            raise ConfigError(f"unknown SLO metric(s) {sorted(unknown)}; use {', '.join(SLO_METRICS)}")

    @property
    def requests_per_level(self) -> int | None:
        """Requests per concurrency level, ``None`` for a closed-loop ``duration_s`` run."""
        if self.duration_s is not None:
            return None if math.isinf(self.request_rate) else max(1, math.ceil(self.request_rate * self.duration_s))
        return self.num_requests or 100

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings (``inf`` rate written as ``null``: all requests at t = 0)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "api_key":
                value = "***" if value else None
            elif name == "image_sizes":
                value = [{"width": b.width, "height": b.height, "weight": b.weight} for b in value]
            elif isinstance(value, float) and math.isinf(value):
                value = None
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[name] = value
        return out


def bench_config(
    *,
    image_size: list[str] | None = None,
    max_concurrency: int | None = None,
    concurrency: str | None = None,
    image_pool: int | None = None,
    unique_images: bool = False,
    slo: str | None = None,
    **settings: Any,
) -> BenchConfig:
    """A :class:`BenchConfig` from CLI-shaped flags (strings for the compound ones).

    ``--max-concurrency C`` is a one-level ``--concurrency C``; ``--unique-images`` is the
    default image policy and cannot be combined with ``--image-pool``.

    Raises:
        ConfigError: conflicting flags or any value :class:`BenchConfig` refuses.
    """
    if max_concurrency is not None and concurrency:
        raise ConfigError("give either --max-concurrency C or a sweep --concurrency 1,4,16, not both")
    if unique_images and image_pool is not None:
        raise ConfigError("--unique-images and --image-pool N contradict each other; pick one")
    levels = parse_concurrency(concurrency) if concurrency else (max_concurrency,)
    extra: dict[str, Any] = {"image_sizes": parse_image_sizes(image_size)} if image_size else {}
    return BenchConfig(concurrency=levels, image_pool=image_pool, slo=parse_slo(slo), **extra, **settings)
