"""Admission of image work against a memory budget, and per-host limits on image fetches.

Small files can ask for huge work: a 20 KB PNG of 13000x13000 1-bit pixels decodes to 676 MB
of RGB (PIL keeps RGB at 4 bytes a pixel) and costs about 2.2 GB at its peak, so four at once
took a server from 1.9 to 8.2 GB. Here each image's cost is estimated from its header before a
pixel is decoded (:func:`vlmlab.media.plan_decode`), and a request's images are admitted
together against one budget for all in-flight images:

* the cost: the decode's peak (the raster in its own mode plus the RGB conversion), the working
  copies preprocessing makes of the decoded raster, and the model's tensors (from the family's
  layout rule);
* more than the whole budget: 413 (:class:`PayloadTooLargeError`), retrying cannot help;
  momentarily no room: 429 with ``Retry-After`` (:class:`OverloadedError`);
* the reservation lives as long as the decoded images do, i.e. until the request ends
  (:class:`ImageHold`); where worker processes decoded an image only its tensors come back,
  and the reservation shrinks to them.

The default per-image pixel cap follows the served family (:func:`default_pixel_cap`), and in
``fast`` mode JPEGs are decoded at a reduced DCT scale where the family's layout (tokens, grid,
canvas) comes out the same (:meth:`ImageCosts.reduce_rule`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from vlmlab.families import Family, ImageLayout
from vlmlab.media import DecodePlan
from vlmlab.protocol.errors import OverloadedError, PayloadTooLargeError, VlmlabError

# Bytes per decoded pixel that preprocessing allocates beside the decoded image. Measured with
# nano's transformers-exact torchvision path (benchmarks/memory_amplification.py and a sampled
# RSS of one decode + preprocess): the HWC uint8 array, the NCHW tensor the antialiased
# interpolate reads and its buffers peaked at 6-8 bytes/pixel over the decoded image
# (8000x8000 and 13000x13000); transformers' PIL backends resize the PIL image and add ~0.
PREPROCESS_BYTES_PER_PIXEL = 8
# The default pixel cap: four times the largest canvas the family's encoder sees, and never below
# 4096x4096 (16.8 MP: 12 MP phone photos, 4K/5K screenshots), nor above the old fixed default
# (vLLM's VLLM_MAX_IMAGE_PIXELS, media.DEFAULT_MAX_PIXELS).
PIXEL_CAP_FLOOR = 4096 * 4096
PIXEL_CAP_CANVASES = 4
PIXEL_CAP_CEILING = 178_956_970
_PROBE_SIZES = ((8192, 8192), (8192, 2048), (2048, 8192))  # large square and long images
RETRY_AFTER_S = 1.0


def family_options(family: Family, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that are the family's own processor options."""
    names = {o.name for o in family.options}
    return {k: v for k, v in options.items() if k in names}


def largest_canvas(family: Family, options: Mapping[str, Any] | None = None) -> int:
    """Pixels of the largest canvas ``family`` resizes any image to (0 when no rule answers)."""
    largest = 0
    for width, height in _PROBE_SIZES:
        try:
            resized = family.image_layout(width, height, **family_options(family, options or {}))
        except VlmlabError:  # a rule that refuses the probe shape (aspect limits)
            continue
        largest = max(largest, resized.resized[0] * resized.resized[1])
    return largest


def default_pixel_cap(family: Family | None, options: Mapping[str, Any] | None = None) -> int:
    """The per-image pixel cap a server uses for ``family`` when none is configured."""
    canvas = largest_canvas(family, options) if family is not None else 0
    return min(PIXEL_CAP_CEILING, max(PIXEL_CAP_FLOOR, PIXEL_CAP_CANVASES * canvas))


def tensor_bytes(layout: ImageLayout | None) -> int:
    """Estimated bytes of one image's float32 pixel tensors: the canvas in 3 channels, plus one
    more view (the thumbnail / global view of tiled families, taken as one tile's size)."""
    if layout is None:
        return 0
    canvas = layout.resized[0] * layout.resized[1] * 3 * 4
    return canvas + (canvas // (layout.views - 1) if layout.views > 1 else 0)


class ImageCosts:
    """The family-dependent estimates for the served engine (``family`` ``None``: no family).

    Args:
        family: the served model's family record.
        defaults: the engine's processor options (request options override them).
    """

    def __init__(self, family: Family | None, defaults: Mapping[str, Any] | None = None):
        self.family = family
        self.defaults = dict(defaults or {})

    def layout(self, size: tuple[int, int], options: Mapping[str, Any]) -> ImageLayout | None:
        if self.family is None:
            return None
        merged = family_options(self.family, {**self.defaults, **options})
        try:
            return self.family.image_layout(size[0], size[1], **merged)
        except VlmlabError:  # the engine reports the refusal itself, with its own message
            return None

    def cost(self, plan: DecodePlan, options: Mapping[str, Any]) -> int:
        """Peak bytes of decoding and preprocessing one image planned as ``plan``."""
        pixels = plan.decoded_size[0] * plan.decoded_size[1]
        layout = self.layout(plan.decoded_size, options)
        return plan.decode_bytes + pixels * PREPROCESS_BYTES_PER_PIXEL + tensor_bytes(layout)

    def reduce_rule(
        self, options: Mapping[str, Any], mode: str
    ) -> Callable[[tuple[int, int], tuple[int, int]], bool] | None:
        """For ``fast`` mode: a rule that allows a reduced JPEG decode when the family lays the
        reduced image out exactly as the full one (same tokens, grid and canvas) and still
        downscales it. ``exact`` mode decodes every pixel, as the reference processor does."""
        if mode != "fast" or self.family is None:
            return None

        def same_layout(size: tuple[int, int], reduced: tuple[int, int]) -> bool:
            full, small = self.layout(size, options), self.layout(reduced, options)
            if full is None or small != full:
                return False
            return full.resized[0] <= reduced[0] and full.resized[1] <= reduced[1]

        return same_layout


class ImageMemoryBudget:
    """Bytes of decoded images and tensors in flight, admitted against ``capacity``.

    Thread-safe: reservations are made on the event loop and shrunk or released from worker
    threads.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0
        self.images = 0
        self.admitted = 0
        self.refused_too_large = 0
        self.refused_busy = 0

    def reserve(self, costs: Sequence[int]) -> Reservation:
        """Admit images costing ``costs`` bytes (one request's) together, or refuse them all.

        Raises:
            PayloadTooLargeError: they need more than the whole budget (413).
            OverloadedError: the budget has no room for them now (429, ``retry_after``).
        """
        total = sum(costs)
        with self._lock:
            if total > self.capacity:
                self.refused_too_large += 1
                what = "this image needs" if len(costs) == 1 else f"these {len(costs)} images need"
                raise PayloadTooLargeError(
                    f"{what} about {_mib(total)} of memory to decode and preprocess, more than "
                    f"this server's whole image budget of {_mib(self.capacity)} "
                    "(vlmlab serve --image-memory-budget); send smaller images (fewer pixels)",
                    param="messages",
                    code="image_memory_budget_exceeded",
                )
            if self.in_use + total > self.capacity:
                self.refused_busy += 1
                raise OverloadedError(
                    f"the server is busy decoding other images ({_mib(self.in_use)} of its "
                    f"{_mib(self.capacity)} image budget in use; this request needs "
                    f"{_mib(total)}); retry shortly",
                    retry_after=RETRY_AFTER_S,
                )
            self.in_use += total
            self.peak = max(self.peak, self.in_use)
            self.images += len(costs)
            self.admitted += len(costs)
        return Reservation(self, total, len(costs))

    def _give_back(self, nbytes: int, images: int) -> None:
        with self._lock:
            self.in_use -= nbytes
            self.images -= images

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget_bytes": self.capacity,
                "in_use_bytes": self.in_use,
                "peak_bytes": self.peak,
                "images_in_flight": self.images,
                "images_admitted": self.admitted,
                "refused_too_large": self.refused_too_large,
                "refused_busy": self.refused_busy,
            }


class Reservation:
    """Bytes one request holds in an :class:`ImageMemoryBudget`."""

    def __init__(self, budget: ImageMemoryBudget, nbytes: int, images: int):
        self._budget = budget
        self._lock = threading.Lock()
        self.nbytes = nbytes
        self.images = images

    def shrink(self, by: int) -> None:
        """Give back ``by`` bytes (an image's raster is gone, only its tensors remain)."""
        with self._lock:
            by = max(0, min(by, self.nbytes))
            self.nbytes -= by
        self._budget._give_back(by, 0)

    def release(self) -> None:
        """Give back everything still held (idempotent)."""
        with self._lock:
            nbytes, images = self.nbytes, self.images
            self.nbytes = self.images = 0
        self._budget._give_back(nbytes, images)


class ImageHold:
    """One request's reservations, released together when the request ends; work still running
    on them in worker threads (a request cancelled mid-decode) delays the release until it is
    done, so the budget never forgets memory that is still in use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reservations: list[Reservation] = []
        self._running = 0
        self._released = False

    def add(self, reservation: Reservation) -> None:
        with self._lock:
            self._reservations.append(reservation)
            released = self._released and self._running == 0
        if released:
            reservation.release()

    def track(self, work: Future[Any]) -> None:
        """Keep the reservations until ``work`` (a worker-thread future using them) is done."""
        with self._lock:
            self._running += 1
        work.add_done_callback(self._work_done)

    def _work_done(self, _: object) -> None:
        with self._lock:
            self._running -= 1
            free = self._released and self._running == 0
        if free:
            self._free()

    def release(self) -> None:
        with self._lock:
            self._released = True
            free = self._running == 0
        if free:
            self._free()

    def _free(self) -> None:
        with self._lock:
            reservations, self._reservations = self._reservations, []
        for reservation in reservations:
            reservation.release()


class HostSlots:
    """At most ``per_host`` fetches at once to any one host, so a slow host can hold only that
    many fetch threads; the rest of its requests wait here, on the event loop, not in a thread."""

    def __init__(self, per_host: int):
        self.per_host = per_host
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    async def acquire(self, host: str) -> None:
        semaphore = self._slots.setdefault(host, asyncio.Semaphore(self.per_host))
        self._users[host] = self._users.get(host, 0) + 1
        try:
            await semaphore.acquire()
        except BaseException:
            self._forget(host)
            raise

    def release(self, host: str) -> None:
        """Free one slot of ``host`` (call on the event loop)."""
        self._slots[host].release()
        self._forget(host)

    def _forget(self, host: str) -> None:
        self._users[host] -= 1
        if self._users[host] == 0:  # nobody holds or waits: keep the table small
            del self._users[host], self._slots[host]

    def busy(self) -> dict[str, int]:
        """Fetches running or waiting, per host."""
        return dict(self._users)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"
