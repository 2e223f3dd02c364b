"""`vlmlab serve` end to end: a real server on loopback with the nano model, driven by the
official openai client and raw httpx."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from serverutil import data_url, file_server, image_message, png_bytes, running_server

from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.families import get_family

MEDIA_DIR_IMAGE = "shape.png"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / MEDIA_DIR_IMAGE).write_bytes(png_bytes(120, 90, "blue", "circle"))
    (root / "notes.txt").write_text("not an image at all")
    return root


@pytest.fixture(scope="module")
def image_host(media_dir: Path):
    """A local http server for image URLs (reached through the policy's test allowance)."""
    with file_server(media_dir) as url:
        yield url


@pytest.fixture(scope="module")
def server(media_dir: Path):
    settings = ServerSettings(
        engines=(EngineSpec(model="nano", device="cpu"),),
        allowed_local_media_path=str(media_dir),
        trusted_media_hosts=("127.0.0.1",),
        max_images=3,
        default_max_tokens=16,
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, messages: list[dict], **kwargs):
    return client.chat.completions.create(model="nano", messages=messages, temperature=0, max_tokens=12, **kwargs)


def test_models_health_and_metrics(server, client) -> None:
    models = client.models.list()
    card = models.data[0].model_dump()
    assert card["id"] == "nano" and card["max_model_len"] == 1024 and card["engine"] == "hf"
    assert card["input_modalities"] == ["text", "image"] and card["max_images"] == 3
    assert httpx.get(f"{server.url}/health").status_code == 200
    ask(client, image_message("What colour is the shape?", data_url(png_bytes())))
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:num_requests_running", "vllm:mm_cache_queries_total", 'vlmlab:preprocess_stage_seconds_count{model_name="nano",stage="decode"}'):
        assert name in metrics, name


def test_image_by_data_url_http_url_and_file(server, client, image_host, media_dir) -> None:
    question = "What shape is it?"
    by_file = ask(client, image_message(question, f"file://{media_dir / MEDIA_DIR_IMAGE}"))
    by_http = ask(client, image_message(question, f"{image_host}/{MEDIA_DIR_IMAGE}"))
    by_data = ask(client, image_message(question, data_url((media_dir / MEDIA_DIR_IMAGE).read_bytes())))
    assert by_file.choices[0].message.content == by_http.choices[0].message.content == by_data.choices[0].message.content
    assert by_file.usage.prompt_tokens == by_http.usage.prompt_tokens == by_data.usage.prompt_tokens


def test_usage_equals_an_independent_count_and_tokenize(server, client) -> None:
    from transformers import AutoProcessor

    from vlmlab.nano import checkpoint_path

    images = [png_bytes(100, 60), png_bytes(300, 200, "green", "circle")]
    messages = [{"role": "system", "content": "Answer briefly."}, *image_message("Compare the two images.", *[data_url(i) for i in images])]
    response = ask(client, messages)
    processor = AutoProcessor.from_pretrained(checkpoint_path())
    hf_messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two images."}]},
    ]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    import io

    from PIL import Image

    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    expected = processor(text=[prompt], images=pil, return_tensors="pt", add_special_tokens=False)["input_ids"].shape[1]
    family = get_family("nano")
    image_tokens = family.image_tokens(100, 60) + family.image_tokens(300, 200)
    assert response.usage.prompt_tokens == expected
    assert response.usage.prompt_tokens_details.image_tokens == image_tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    counted = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    assert counted["prompt_tokens"] == expected and counted["image_tokens"] == image_tokens
    assert counted["per_image_tokens"] == [family.image_tokens(100, 60), family.image_tokens(300, 200)]
    assert counted["max_model_len"] == 1024


def test_streaming_text_equals_non_streaming(client) -> None:
    messages = image_message("What colour is the shape?", data_url(png_bytes(80, 80, "green")))
    plain = ask(client, messages)
    stream = ask(client, messages, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens
    no_usage = list(ask(client, messages, stream=True))
    assert all(c.usage is None for c in no_usage)


def test_caches_report_hits(server, client) -> None:
    image = data_url(png_bytes(140, 70, "yellow", "circle"))
    first = ask(client, image_message("What colour?", image)).model_dump()
    second = ask(client, image_message("What shape?", image)).model_dump()
    assert first["timings"]["preprocess_cache_hits"] == 0
    assert second["timings"]["preprocess_cache_hits"] == 1  # same bytes: no decode, no processor
    repeat = ask(client, image_message("What shape?", image)).model_dump()
    assert repeat["timings"]["response_cache_hit"] is True
    assert repeat["choices"][0]["message"] == second["choices"][0]["message"]
    assert repeat["usage"] == second["usage"]
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["engine"] == "hf" and stats["response_cache"]["hits"] >= 1
    assert stats["preprocess_cache"]["hits"] >= 1 and stats["totals"]["requests"] >= 3
    assert stats["encoder_cache"]["hits"] >= 1  # nano's vision tower skipped for the repeat


def expect_error(server, body: dict | str, status: int, message: str) -> dict:
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error
    return error


def test_bad_inputs_get_openai_errors_and_the_server_keeps_answering(server, client, image_host, media_dir) -> None:
    good = image_message("Colour?", data_url(png_bytes()))
    cases = [
        ("{not json", 400, "JSON"),
        ({"model": "nano"}, 400, "messages"),
        ({"messages": good, "n": 17}, 400, "less than or equal to 16"),
        ({"messages": good, "temperature": 5}, 400, "temperature"),
        ({"model": "gpt-4o", "messages": good}, 404, "The model 'gpt-4o' does not exist"),
        ({"messages": image_message("x", *[data_url(png_bytes())] * 4)}, 400, "At most 3 image(s)"),
        ({"messages": image_message("x", "data:image/png;base64,aGVsbG8gd29ybGQ=")}, 400, "data URL"),
        ({"messages": image_message("x", f"{image_host}/notes.txt")}, 400, "notes.txt"),
        ({"messages": image_message("x", f"{image_host}/missing.png")}, 400, "404"),
        ({"messages": image_message("x", "http://10.0.0.1/cat.png")}, 403, "10.0.0.1"),
        ({"messages": image_message("x", "file:///etc/passwd")}, 403, "/etc/passwd"),
        ({"messages": image_message("x", "ftp://example.com/a.png")}, 403, "ftp"),
        ({"messages": good, "max_tokens": 5000}, 400, "maximum context length is 1024 tokens"),
        ({"messages": good, "mm_processor_kwargs": {"num_crops": 4}}, 400, "unknown option 'num_crops'"),
    ]
    for body, status, message in cases:
        error = expect_error(server, body, status, message)
        if status == 400 and "context" in message:
            assert error["code"] == "context_length_exceeded"
    assert ask(client, good).choices[0].message.content is not None  # still serving
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["totals"]["errors_400"] >= 8 and stats["totals"].get("errors_500", 0) == 0
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, good, n=17)
    assert "n" in str(info.value)


def test_api_key_is_required_when_set(media_dir) -> None:
    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), api_key="s3cret")
    with running_server(settings) as running:
        anonymous = httpx.get(f"{running.url}/v1/models")
        assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "AuthenticationError"
        wrong = httpx.post(f"{running.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200  # probes need no key
        good = openai.OpenAI(base_url=running.base_url, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "nano"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.base_url, api_key="guess", max_retries=0).models.list()


def _photo_jpeg(w: int, h: int, seed: int = 0) -> bytes:
    """A noisy photo-like JPEG well above the pool's byte threshold."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_large_images_are_preprocessed_in_worker_processes_with_the_same_answer(server, client) -> None:
    """An image over ``preprocess_pool_min_bytes`` is decoded and preprocessed from its bytes in
    the process pool; the answer and usage equal the in-thread path's (workers off), a repeat is
    a cache hit, and a fast-mode request keeps the token count."""
    jpeg = _photo_jpeg(1600, 1200)
    assert len(jpeg) >= server.service.settings.preprocess_pool_min_bytes
    messages = image_message("What colour is the shape?", data_url(jpeg, "image/jpeg"))
    pooled = ask(client, messages).model_dump()
    assert server.service._preprocess_pool is not None  # the pool really ran it
    assert pooled["timings"]["preprocess_cache_hits"] == 0
    # every stage the request went through, the server's and the worker's, in its timings
    assert {"fetch", "decode", "resize", "normalize", "to_tensor", "engine"} <= set(pooled["timings"]["stages_ms"])
    again = client.chat.completions.create(model="nano", messages=messages, temperature=0, max_tokens=11).model_dump()
    assert again["timings"]["preprocess_cache_hits"] == 1
    off = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), preprocess_workers=0, default_max_tokens=16)
    with running_server(off) as plain:
        threaded = ask(openai.OpenAI(base_url=plain.base_url, api_key="x", max_retries=0), messages).model_dump()
        assert plain.service._preprocess_pool is None
    assert pooled["choices"][0]["message"] == threaded["choices"][0]["message"]
    assert pooled["usage"] == threaded["usage"]
    fast = ask(client, messages, extra_body={"mm_processor_kwargs": {"preprocess_mode": "fast"}}).model_dump()
    assert fast["usage"] == pooled["usage"]  # same image tokens; pixels may differ slightly
    assert fast["timings"]["preprocess_cache_hits"] == 0  # fast pixels are cached apart from exact
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'vlmlab:preprocess_stage_seconds_count{model_name="nano",stage="resize"}' in metrics


def test_bad_preprocess_mode_and_undecodable_large_bytes_are_400(server, client) -> None:
    good = image_message("Colour?", data_url(png_bytes()))
    body = {"model": "nano", "messages": good, "mm_processor_kwargs": {"preprocess_mode": "turbo"}}
    error = expect_error(server, body, 400, "preprocess_mode")
    assert error["param"] == "mm_processor_kwargs"
    junk = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2048  # a JPEG header, then noise: 512 KiB
    expect_error(server, {"model": "nano", "messages": image_message("Colour?", data_url(junk, "image/jpeg"))}, 400, "image")
    assert ask(client, good).choices[0].message.content is not None  # still answering
    small_fast = ask(client, good, extra_body={"mm_processor_kwargs": {"preprocess_mode": "fast"}})
    assert small_fast.usage == ask(client, good).usage  # in-thread fast path: same tokens


def test_a_stream_reports_where_its_time_went(server) -> None:
    """The finish chunk's timings: the body's receive + parse + validation (http), the request's
    parse, the SSE serialization, prefill and decode, beside the media and engine stages; inside
    the engine: the chat template, the wait for a batch and the detokenizer; the server slot's wait."""
    body = {"model": "nano", "messages": image_message("What colour is the shape?", data_url(png_bytes())),
            "max_tokens": 6, "temperature": 0, "stream": True}  # fmt: skip
    finish = None
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("timings"):
                    finish = chunk["timings"]
    assert finish is not None
    stages = finish["stages_ms"]
    assert {"http", "parse", "sse", "engine", "slot_wait", "template", "batch_wait", "detokenize"} <= set(stages)
    assert all(stages[k] >= 0 for k in ("http", "parse", "sse", "slot_wait", "batch_wait"))
    assert stages["template"] > 0 and stages["detokenize"] > 0  # timed, not placeholders
    # the engine's parts happen inside its time
    assert stages["template"] + stages["batch_wait"] + stages["detokenize"] < stages["engine"]
    assert finish["prefill_ms"] > 0 and finish["decode_ms"] >= 0
