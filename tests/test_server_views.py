"""``POST /views``: what the model sees of each image (size after the processor, grid, views,
tokens, a preview), equal to what the model's own processor makes and to ``/tokenize``."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.nano import checkpoint_path

SIZES = [(640, 480), (100, 300), (1500, 40)]


@pytest.fixture(scope="module")
def server():
    with running_server(ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), api_key="k")) as running:
        yield running


def test_views_match_the_processor_and_tokenize(server) -> None:
    from transformers import AutoProcessor

    pngs = [png_bytes(w, h) for w, h in SIZES]
    body = {"messages": image_message("What is it?", *(data_url(p) for p in pngs))}
    headers = {"Authorization": "Bearer k"}
    views = httpx.post(f"{server.url}/views", json=body, headers=headers, timeout=60).json()
    count = httpx.post(f"{server.url}/tokenize", json=body, headers=headers, timeout=60).json()
    assert views["family"] == "nano" and [v["tokens"] for v in views["images"]] == count["per_image_tokens"]
    processor = AutoProcessor.from_pretrained(checkpoint_path())
    patch = processor.image_processor.patch_size["height"] if isinstance(processor.image_processor.patch_size, dict) else processor.image_processor.patch_size
    for view, png, (width, height) in zip(views["images"], pngs, SIZES):
        pixels = processor.image_processor(Image.open(io.BytesIO(png)), return_tensors="pt")["pixel_values"]
        real_h, real_w = pixels.shape[-2:]
        image_size = processor.image_processor(Image.open(io.BytesIO(png)), return_tensors="pt").get("image_sizes")
        if image_size is not None:  # Pixtral's processor pads the batch; image_sizes is the image's own
            real_h, real_w = (int(x) for x in image_size[0])
        assert view["resized"] == [real_w, real_h], view
        assert view["grid"] == [real_h // patch, real_w // patch] and view["unit"] == "patches" and view["views"] == 1
        assert (view["width"], view["height"]) == (width, height)
        preview = Image.open(io.BytesIO(base64.b64decode(view["preview"].split(",", 1)[1])))
        assert abs(preview.width / preview.height - real_w / real_h) < 0.05


def test_views_need_the_key_and_name_bad_images(server) -> None:
    body = {"messages": image_message("x", data_url(png_bytes(64, 64)))}
    assert httpx.post(f"{server.url}/views", json=body, timeout=30).status_code == 401
    bad = {"messages": image_message("x", "data:image/png;base64," + base64.b64encode(b"not a png").decode())}
    reply = httpx.post(f"{server.url}/views", json=bad, headers={"Authorization": "Bearer k"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["message"]


def test_models_list_each_familys_processor_options(server) -> None:
    """The options a request may set in mm_processor_kwargs (none for nano; Qwen's max_pixels,
    Phi's num_crops for theirs), with the served model's defaults."""
    from vlmlab.server.app import processor_options

    card = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]
    assert card["processor_options"] == []
    qwen = {o["name"]: o for o in processor_options("qwen2_vl", {"max_pixels": 1003520})}
    assert qwen["max_pixels"]["default"] == 1003520 and qwen["max_pixels"]["kind"] == "int"
    assert qwen["variant"]["choices"] == ["hf", "qwen_vl_utils"]
    assert processor_options("phi3_5_vision", {})[0]["name"] == "num_crops"
