"""Server behaviour under load and failure: 429 when full, 504 on timeout, cancel on disconnect,
engine fallback at start-up and at run time, in-band stream errors."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings

NANO = EngineSpec(model="nano", device="cpu")
# 950 tokens: nano decodes a single stream at well under 1,900 tokens/s on a CPU, so a 0.5 s
# deadline always falls inside the generation.
LONG = {"max_tokens": 950, "temperature": 0, "ignore_eos": True}


def body(**extra) -> dict:
    return {"model": "nano", "messages": image_message("Describe it.", data_url(png_bytes())), **extra}


def test_full_queue_answers_429_with_retry_after() -> None:
    settings = ServerSettings(engines=(NANO,), max_concurrency=1, max_queue=0)
    with running_server(settings) as server:
        results: list[httpx.Response] = []

        def long_request() -> None:
            results.append(httpx.post(f"{server.url}/v1/chat/completions", json=body(**LONG), timeout=120))

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.time() + 30
        while server.service.active < 1 and time.time() < deadline:
            time.sleep(0.01)
        busy = httpx.post(f"{server.url}/v1/chat/completions", json=body(max_tokens=4), timeout=60)
        assert busy.status_code == 429
        assert busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["type"] == "RateLimitError"
        worker.join()
        assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == LONG["max_tokens"]
        again = httpx.post(f"{server.url}/v1/chat/completions", json=body(max_tokens=4), timeout=60)
        assert again.status_code == 200  # the slot was freed


def test_request_timeout_gives_504_and_frees_the_engine() -> None:
    settings = ServerSettings(engines=(NANO,), request_timeout_s=0.5)
    with running_server(settings) as server:
        slow = httpx.post(f"{server.url}/v1/chat/completions", json=body(**LONG), timeout=60)
        assert slow.status_code == 504 and "0.5 s" in slow.json()["error"]["message"]
        engine = server.service.chain.current()
        deadline = time.time() + 30
        while engine.batcher.running and time.time() < deadline:
            time.sleep(0.02)
        assert engine.batcher.running == 0 and engine.batcher.aborted_total >= 1
        assert server.service.active == 0 and server.service.in_engine == 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(stream: bool) -> None:
    with running_server(ServerSettings(engines=(NANO,))) as server:
        engine = server.service.chain.current()
        before = engine.batcher.aborted_total
        with httpx.Client(timeout=60) as http:
            if stream:
                with http.stream("POST", f"{server.url}/v1/chat/completions", json=body(stream=True, **LONG)) as response:
                    for line in response.iter_lines():
                        if '"content":"' in line and '"content":""' not in line:
                            break  # a token arrived: hang up
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post(f"{server.url}/v1/chat/completions", json=body(**LONG), timeout=0.5)
        deadline = time.time() + 30
        while engine.batcher.aborted_total == before and time.time() < deadline:
            time.sleep(0.05)
        assert engine.batcher.aborted_total == before + 1
        assert server.service.active == 0


def test_fallback_when_the_first_engine_fails_to_load(tmp_path) -> None:
    settings = ServerSettings(engines=(EngineSpec(model=str(tmp_path / "missing-model")), NANO), served_model_name="nano")
    with running_server(settings) as server:
        stats = httpx.get(f"{server.url}/stats").json()
        assert stats["engine"] == "hf" and stats["engine_model"] == "nano"
        assert "missing-model" in stats["engines_skipped"][0]["reason"]
        reply = openai.OpenAI(base_url=server.base_url, api_key="x").chat.completions.create(
            model="nano", messages=image_message("What colour is the shape?", data_url(png_bytes())),
            max_tokens=4, temperature=0,
        )
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].message.content


def test_fallback_when_the_serving_engine_dies_at_run_time() -> None:
    second = EngineSpec(model="nano", device="cpu", max_batch_size=4)  # distinguishable spec
    settings = ServerSettings(engines=(NANO, second))
    with running_server(settings) as server:
        first_engine = server.service.chain.current()
        first_engine.batcher.close()  # the worker thread is gone: the engine is dead
        assert httpx.get(f"{server.url}/health").status_code == 503
        failed = httpx.post(f"{server.url}/v1/chat/completions", json=body(max_tokens=4), timeout=60)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "InternalServerError"
        deadline = time.time() + 60
        while server.service.chain.engine in (None, first_engine) and time.time() < deadline:
            time.sleep(0.05)
        assert server.service.chain.spec is second
        assert httpx.get(f"{server.url}/health").status_code == 200
        ok = httpx.post(f"{server.url}/v1/chat/completions", json=body(max_tokens=4), timeout=60)
        assert ok.status_code == 200
        stats = httpx.get(f"{server.url}/stats").json()
        assert "died" in stats["engines_skipped"][-1]["reason"]
        assert 'vlmlab:engine_fallbacks_total{model_name="nano"} 1.0' in httpx.get(f"{server.url}/metrics").text


def test_errors_after_the_stream_started_are_sse_error_events() -> None:
    settings = ServerSettings(engines=(NANO,), request_timeout_s=0.5)
    with running_server(settings) as server:
        httpx.post(f"{server.url}/v1/chat/completions", json=body(max_tokens=2), timeout=60)  # warm-up
        # The first token comes well inside 0.5 s; 950 tokens cannot (see LONG).
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body(stream=True, **LONG), timeout=60) as response:
            assert response.status_code == 200
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "GatewayTimeoutError" and error["code"] == 504
        assert any('"content":"' in e and '"content":""' not in e for e in events[:-2])  # tokens came first
