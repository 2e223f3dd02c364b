"""Image work admitted against a memory budget: small files of huge dimensions cannot blow up the
server. Header planning and estimates (vlmlab.media.plan_decode, vlmlab.server.admission) and
a real server with the nano engine on loopback, measured by the peak RSS of this process (the
server runs in a thread here; preprocess workers are off so every image is decoded in it).
"""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab import media
from vlmlab.config import EngineSpec, ServerSettings, server_settings
from vlmlab.families import get_family
from vlmlab.protocol.errors import ImageTooLargeError, OverloadedError, PayloadTooLargeError
from vlmlab.server.admission import (
    PIXEL_CAP_FLOOR,
    ImageCosts,
    ImageHold,
    ImageMemoryBudget,
    default_pixel_cap,
)

NANO = EngineSpec(model="nano", device="cpu")
MiB = 2**20


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def bilevel_png(width: int, height: int, seed: int = 0) -> bytes:
    """A few KB of PNG that decodes to width x height pixels (the attack in issue 16)."""
    image = Image.new("1", (width, height), 1)
    ImageDraw.Draw(image).line((0, seed, width, height - seed), fill=0, width=3)
    return encoded(image, "PNG", optimize=True)


def as_bytes(data: bytes) -> media.ImageBytes:
    return media.ImageBytes(data, "test image", "0" * 64)


# -- planning from the header -------------------------------------------------------------------


def test_plan_estimates_the_decode_from_the_header_without_decoding() -> None:
    plan = media.plan_decode(as_bytes(bilevel_png(13000, 13000)))
    assert plan.size == plan.decoded_size == (13000, 13000) and plan.scale == 1
    # "1" is kept at a byte a pixel, the RGB result at four (PIL pads RGB to RGBX).
    assert plan.decode_bytes == 13000 * 13000 * (1 + 4)
    assert plan.image_bytes == 13000 * 13000 * 4
    rgba = media.plan_decode(as_bytes(encoded(Image.new("RGBA", (100, 50)), "PNG")))
    assert rgba.decode_bytes == 100 * 50 * (4 + 4 + 4)  # RGBA, its RGBA copy, the RGB result
    rgb = media.plan_decode(as_bytes(encoded(Image.new("RGB", (100, 50)), "PNG")))
    assert rgb.decode_bytes == rgb.image_bytes == 100 * 50 * 4


def test_a_jpeg_over_the_cap_is_decoded_reduced_a_png_is_refused() -> None:
    policy = media.MediaPolicy(max_pixels=1_000_000)
    jpeg = as_bytes(encoded(Image.new("RGB", (3000, 2000), "red"), "JPEG"))
    plan = media.plan_decode(jpeg, policy)
    assert (plan.scale, plan.decoded_size) == (4, (750, 500))  # 1/2 would still be 1.5 MP
    image = media.decode_image(jpeg, policy, plan)
    assert (image.width, image.height) == (750, 500) and image.image.size == (750, 500)
    with pytest.raises(ImageTooLargeError, match="max_pixels=1000000"):
        media.decode_image(jpeg, policy)  # without the plan: refused, never decoded whole
    png = as_bytes(bilevel_png(3000, 2000))
    with pytest.raises(ImageTooLargeError, match="3000x2000 = 6000000 pixels"):
        media.plan_decode(png, policy)


def test_fast_mode_decodes_jpegs_reduced_only_where_the_family_lays_them_out_the_same() -> None:
    costs = ImageCosts(get_family("nano"))
    jpeg = as_bytes(encoded(Image.new("RGB", (3000, 1500), "red"), "JPEG"))
    exact = media.plan_decode(jpeg, reduce_ok=costs.reduce_rule({}, "exact"))
    fast = media.plan_decode(jpeg, reduce_ok=costs.reduce_rule({}, "fast"))
    assert exact.scale == 1
    assert fast.scale == 8 and fast.decoded_size == (375, 188)
    family = get_family("nano")
    assert family.image_layout(375, 188) == family.image_layout(3000, 1500)  # same tokens
    assert fast.decode_bytes * 60 < exact.decode_bytes


def test_the_default_pixel_cap_follows_the_family() -> None:
    assert default_pixel_cap(get_family("nano")) == PIXEL_CAP_FLOOR == 4096 * 4096
    assert default_pixel_cap(get_family("qwen2_vl")) == 4 * 12845056  # 4 x max_pixels
    assert default_pixel_cap(None) == PIXEL_CAP_FLOOR
    settings = server_settings({"image_memory_budget": "512MiB"}, max_image_pixels=1000)
    assert settings.image_memory_budget == 512 * MiB and settings.max_image_pixels == 1000


def test_the_budget_admits_whole_requests_and_refuses_with_413_or_429() -> None:
    budget = ImageMemoryBudget(100)
    with pytest.raises(PayloadTooLargeError) as too_large:
        budget.reserve([60, 60])  # more than all of it: retrying cannot help
    assert too_large.value.status_code == 413
    first = budget.reserve([40, 30])
    with pytest.raises(OverloadedError) as busy:
        budget.reserve([40])
    assert busy.value.status_code == 429 and busy.value.retry_after > 0
    first.shrink(50)  # a worker process kept the rasters: only tensors came back
    second = budget.reserve([40])
    assert budget.stats()["in_use_bytes"] == 60
    hold = ImageHold()
    hold.add(first)
    hold.add(second)
    from concurrent.futures import Future

    work: Future[None] = Future()
    hold.track(work)
    hold.release()
    assert budget.stats()["in_use_bytes"] == 60  # a thread still decodes: memory still in use
    work.set_result(None)
    stats = budget.stats()
    assert stats["in_use_bytes"] == stats["images_in_flight"] == 0 and stats["peak_bytes"] == 70
    assert (stats["refused_too_large"], stats["refused_busy"]) == (1, 1)


# -- a real server -------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0: ``clear_refs`` value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


BUDGET = 480 * MiB
SETTINGS = ServerSettings(
    engines=(NANO,),
    image_memory_budget=BUDGET,
    max_image_pixels=50_000_000,  # above the family default, so the budget is what protects
    preprocess_workers=0,  # every image decoded in this process, where RSS is measured
    default_max_tokens=2,
    response_cache_entries=0,
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_concurrent_huge_pngs_stay_within_the_budget() -> None:
    # 4000x4000 1-bit PNGs of a few KB: each is estimated at ~208 MB (1 + 4 bytes a pixel to
    # decode, 8 to preprocess), so two fit in the 480 MiB budget and the rest get 429.
    images = [data_url(bilevel_png(4000, 4000, seed)) for seed in range(8)]
    with running_server(SETTINGS) as server:
        url = f"{server.url}/v1/chat/completions"
        small = {"model": "nano", "messages": image_message("What?", data_url(png_bytes()))}
        assert httpx.post(url, json=small, timeout=60).status_code == 200  # warm up
        time.sleep(0.2)
        before = _status_kib("VmRSS")
        if not reset_peak_rss():
            pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
        replies: list[httpx.Response] = []
        start = threading.Barrier(len(images))

        def send(image: str) -> None:
            body = {"model": "nano", "messages": image_message("What?", image)}
            start.wait()
            replies.append(httpx.post(url, json=body, timeout=120))

        threads = [threading.Thread(target=send, args=(image,)) for image in images]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        growth = _status_kib("VmHWM") - before
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        for busy in (r for r in replies if r.status_code == 429):
            assert int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["type"] == "RateLimitError"
        # Without admission the eight would decode four at a time and preprocess together:
        # well over 1 GB. With it the peak stays within the budget (plus allocator slack).
        assert growth < BUDGET + 100 * MiB, f"peak RSS grew {growth / MiB:.0f} MiB"
        stats = server.service.image_memory_stats()
        assert stats["in_use_bytes"] == 0 and stats["images_in_flight"] == 0
        assert 0 < stats["peak_bytes"] <= BUDGET and stats["refused_busy"] == statuses.count(429)
        # One image needing more than the whole budget: 413 from its header, nothing decoded.
        huge = data_url(bilevel_png(6500, 6500))  # ~550 MB estimated, over the 480 MiB
        too_big = {"model": "nano", "messages": image_message("What?", huge)}
        refused = httpx.post(url, json=too_big, timeout=60)
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "image_memory_budget_exceeded"
        assert "--image-memory-budget" in refused.json()["error"]["message"]
        # Afterwards the server answers as before.
        assert httpx.post(url, json=small, timeout=60).status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_the_default_cap_refuses_huge_pngs_and_reduces_huge_jpegs() -> None:
    settings = ServerSettings(engines=(NANO,), default_max_tokens=2, preprocess_workers=0)
    with running_server(settings) as server:
        assert server.service.policy.max_pixels == 4096 * 4096  # nano's family default
        url = f"{server.url}/v1/chat/completions"
        huge = data_url(bilevel_png(13000, 13000))
        png = {"model": "nano", "messages": image_message("What?", huge)}
        refused = httpx.post(url, json=png, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "image_too_large"
        assert "13000x13000" in refused.json()["error"]["message"]
        photo = encoded(Image.new("RGB", (6000, 4000), "green"), "JPEG")  # 24 MP, over 16.8 MP
        jpeg = {"model": "nano", "messages": image_message("What?", data_url(photo, "image/jpeg"))}
        answered = httpx.post(url, json=jpeg, timeout=60)
        assert answered.status_code == 200  # decoded at 1/2 scale: 3000x2000
        image_tokens = answered.json()["usage"]["prompt_tokens_details"]["image_tokens"]
        assert image_tokens == get_family("nano").image_tokens(3000, 2000)
        # fast mode: a JPEG decoded at 1/8 where nano lays it out the same, tokens unchanged
        wide = data_url(encoded(Image.new("RGB", (3000, 1500), "red"), "JPEG"), "image/jpeg")
        usage = []
        for mode in ("exact", "fast"):
            request = {"model": "nano", "messages": image_message("What?", wide)}
            request["mm_processor_kwargs"] = {"preprocess_mode": mode}
            reply = httpx.post(url, json=request, timeout=60)
            assert reply.status_code == 200
            usage.append(reply.json()["usage"]["prompt_tokens_details"]["image_tokens"])
        assert usage[0] == usage[1] == get_family("nano").image_tokens(3000, 1500)
