"""No single request takes the server down: out-of-range numbers and invalid Unicode are 400s at
the edge, and a request that makes the engine raise fails alone while the engine keeps serving.

Each bad request is followed by a normal one (200) and ``/health`` (200)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.engines import Engine, load_engine
from vlmlab.protocol.core import TextPart
from vlmlab.server.engines import EngineChain

NANO = EngineSpec(model="nano", device="cpu")


def good_body(**extra: Any) -> dict[str, Any]:
    message = image_message("What colour is the shape?", data_url(png_bytes()))
    return {"model": "nano", "messages": message, "max_tokens": 4, "temperature": 0, **extra}


def still_serving(url: str) -> None:
    reply = httpx.post(f"{url}/v1/chat/completions", json=good_body(), timeout=60)
    assert reply.status_code == 200, reply.text
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(engines=(NANO,), response_cache_entries=0)
    with running_server(settings) as running:
        yield running


def post_raw(url: str, text: str, path: str = "/v1/chat/completions") -> httpx.Response:
    """A body sent as written (JSON's NaN, huge integers and \\udXXX escapes survive)."""
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}{path}", content=text.encode(), headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", "1" + "0" * 30),
        ("seed", str(2**64)),
        ("seed", str(2**63)),
        ("seed", str(-(2**63) - 1)),
        ("max_tokens", "1" + "0" * 30),
        ("max_completion_tokens", str(2**31)),
        ("top_k", str(2**40)),
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("top_p", "-Infinity"),
        ("n", "17"),
        ("top_logprobs", "21"),
        ("presence_penalty", "2.5"),
        ("logit_bias", "{\"5\": 101}"),
        ("ignore_eos", "0"),
        ("stream", '"yes"'),
    ],
)
def test_out_of_range_numbers_are_400_naming_the_field(server, field: str, value: str) -> None:
    body = json.dumps(good_body())[:-1] + f', "{field}": {value}}}'
    reply = post_raw(server.url, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"].split(".")[0] == field and field in error["message"]  # logit_bias.5: the key too
    still_serving(server.url)


@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1, -1, 0])
def test_every_accepted_seed_is_served(server, seed: int) -> None:
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", json=good_body(seed=seed, temperature=0.8), timeout=60
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(
    "message",
    [
        '{"role": "user", "content": "\\udfff\\ud800"}',
        '{"role": "user", "content": [{"type": "text", "text": "colour? \\ud800"}]}',
        '{"role": "system", "content": "x\\udc00y"}',
    ],
)
def test_text_that_is_not_unicode_is_400_naming_the_message(server, path: str, message: str) -> None:
    body = f'{{"model": "nano", "max_tokens": 2, "messages": [{message}]}}'
    reply = post_raw(server.url, body, path)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages"
    assert "messages[0].content" in error["message"] and "not valid Unicode" in error["message"]
    still_serving(server.url)


def test_a_lone_surrogate_in_a_stop_string_is_400(server) -> None:
    body = json.dumps(good_body())[:-1] + ', "stop": ["ok", "\\ud800"]}'
    reply = post_raw(server.url, body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop"
    still_serving(server.url)


class InputBugEngine(Engine):
    """The real nano engine with one input-triggered bug injected: a request whose text says
    CRASH raises inside ``generate``, as an engine bug on unusual input would. Everything else,
    the probe included, is the real engine's."""

    @classmethod
    def load(cls, spec: EngineSpec) -> InputBugEngine:
        return cls(load_engine(spec))

    def __init__(self, inner: Engine):
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, request) -> AsyncIterator[Any]:
        texts = [p.text for m in request.chat.messages for p in m.content if isinstance(p, TextPart)]
        if any("CRASH" in text for text in texts):
            raise RuntimeError("injected engine bug")
        async for item in self.inner.generate(request):
            yield item

    def info(self):
        return self.inner.info()

    def count_prompt_tokens(self, chat, options=None):
        return self.inner.count_prompt_tokens(chat, options)

    def health(self):
        return self.inner.health()

    def close(self) -> None:
        self.inner.close()


def crash_body() -> dict[str, Any]:
    return good_body(messages=image_message("CRASH please", data_url(png_bytes())))


def test_failing_requests_do_not_kill_the_engine() -> None:
    """2 failing requests, 20 good ones, 1 failing, then more: the engine serves throughout, and
    each failing request gets a 400 of its own (the engine still answers the probe)."""
    chain = EngineChain((NANO,), failures_before_fallback=3, loader=InputBugEngine.load)
    settings = ServerSettings(engines=(NANO,), response_cache_entries=0)
    with running_server(settings, chain) as server:
        post = lambda body: httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)  # noqa: E731
        statuses = [post(crash_body()).status_code for _ in range(2)]
        statuses += [post(good_body()).status_code for _ in range(20)]
        statuses += [post(crash_body()).status_code]
        statuses += [post(crash_body()).status_code for _ in range(3)]
        assert statuses == [400, 400] + [200] * 20 + [400] * 4
        failed = post(crash_body()).json()["error"]
        assert "injected engine bug" in failed["message"] and "serves other requests" in failed["message"]
        still_serving(server.url)
        stats = httpx.get(f"{server.url}/stats").json()
        assert stats["healthy"] and stats["engines_skipped"] == []


# -- before the body: the API key and the size limit -------------------------------------------

KEY = "s3cret"


@pytest.fixture(scope="module")
def keyed_server():
    settings = ServerSettings(engines=(NANO,), api_key=KEY, auth_stats=True, max_request_bytes=2**20)
    with running_server(settings) as running:
        yield running


def headers_only(url: str, head: str) -> tuple[int, dict[str, Any]]:
    """Send only a request's head (no body follows) and read the answer: a server that waited
    for the body would time out here."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_the_key_is_checked_before_the_body_is_read(keyed_server) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\nHost: x\ncontent-type: application/json\n"
        f"content-length: {100 * 2**20}\n"
    )
    status, body = headers_only(keyed_server.url, head)
    assert status == 401 and "API key" in body["error"]["message"]
    status, body = headers_only(keyed_server.url, head.replace("Host: x", "Host: x\nAuthorization: Bearer nope"))
    assert status == 401


def test_a_body_over_the_limit_is_413_before_it_is_read(keyed_server) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\nHost: x\ncontent-type: application/json\n"
        f"Authorization: Bearer {KEY}\ncontent-length: {2**20 + 1}\n"
    )
    status, body = headers_only(keyed_server.url, head)
    assert status == 413
    assert "--max-request-bytes" in body["error"]["message"] and body["error"]["code"] == 413


def test_a_chunked_body_over_the_limit_is_413(keyed_server) -> None:
    def chunks():
        for _ in range(40):
            yield b" " * 65536  # 2.5 MiB of JSON whitespace, no length announced

    reply = httpx.post(
        f"{keyed_server.url}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 413
    small = httpx.post(
        f"{keyed_server.url}/v1/chat/completions",
        content=iter([json.dumps(good_body()).encode()]),
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
        timeout=60,
    )
    assert small.status_code == 200, small.text


def test_stats_and_metrics_behind_the_key_with_auth_stats(keyed_server) -> None:
    for path in ("/stats", "/metrics"):
        assert httpx.get(f"{keyed_server.url}{path}").status_code == 401
        with_key = httpx.get(f"{keyed_server.url}{path}", headers={"Authorization": f"Bearer {KEY}"})
        assert with_key.status_code == 200
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200


# -- the event loop stays free --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_multi_megabyte_prompt_does_not_stall_the_server(server, path: str) -> None:
    """5 MB of text: refused at once from a bound on its tokens (the longest vocabulary entry),
    while /health keeps answering; before, tokenising it on the event loop froze every route for
    seconds (4.5 s here)."""
    import threading
    import time

    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            start = time.perf_counter()
            assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        body = {"model": "nano", "max_tokens": 2, "messages": [{"role": "user", "content": "word " * 10**6}]}
        reply = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    finally:
        done.set()
        poller.join()
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert "5,000,000 characters" in error["message"] and "at least" in error["message"]
    assert latencies and max(latencies) < 0.5, max(latencies)
    still_serving(server.url)


def test_long_text_within_the_bound_is_still_counted_exactly(server) -> None:
    """The bound never refuses what fits: a prompt just under the context is served, and
    /tokenize counts it exactly like a short one."""
    text = "word " * 150
    body = {"model": "nano", "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
    counted = httpx.post(f"{server.url}/tokenize", json=body, timeout=60).json()["count"]
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == counted > 150


@pytest.fixture(scope="module")
def nano_tokenizer():
    from transformers import AutoTokenizer

    from vlmlab.nano import checkpoint_path

    return AutoTokenizer.from_pretrained(checkpoint_path())


def test_the_token_bound_never_overestimates(nano_tokenizer) -> None:
    """Whatever the text, it takes at least characters / bound tokens (so the server refuses
    only what cannot fit)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from vlmlab.engines.hf.prompt import token_span_bound

    bound = token_span_bound(nano_tokenizer)
    assert bound and bound == max(len(t) for t in nano_tokenizer.get_vocab())
    samples = st.one_of(
        st.text(max_size=400),
        st.builds(lambda c, n: c * n, st.sampled_from([" ", "a", "\n", "ab", "\u00e9"]), st.integers(1, 2000)),
    )

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(text=samples)
    def check(text: str) -> None:
        if text.encode("utf-8", "surrogatepass") != text.encode("utf-8", "ignore"):
            return  # lone surrogates are refused before any tokenizer
        tokens = len(nano_tokenizer(text, add_special_tokens=False)["input_ids"])
        assert tokens >= -(-len(text) // bound)

    check()


# -- the documented contract ----------------------------------------------------------------------


def test_health_has_a_json_body_and_405_names_the_allowed_methods(server) -> None:
    health = httpx.get(f"{server.url}/health")
    assert health.headers["content-type"] == "application/json" and health.json() == {"status": "ok"}
    trace = httpx.request("TRACE", f"{server.url}/v1/chat/completions")
    assert trace.status_code == 405 and "POST" in trace.headers["allow"]
    assert trace.json()["error"]["code"] == 405
    schema = httpx.get(f"{server.url}/openapi.json").json()
    post = schema["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in post["responses"] and "400" in post["responses"]
    assert "text/event-stream" in post["responses"]["200"]["content"]
    n = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]
    assert 16 in [v.get("maximum") for v in n.get("anyOf", [n])]  # n up to 16, as the server takes


def test_an_image_nano_cannot_take_gets_advice_nano_accepts(server) -> None:
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=good_body(messages=image_message("What is it?", data_url(png_bytes(1, 20000)))),
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert "variant" not in message and "short side is at least 105 px" in message
    still_serving(server.url)


# -- memory: every cache bounded in bytes and shown in /stats -----------------------------------


def test_the_response_cache_is_bounded_in_bytes_and_entries() -> None:
    from vlmlab.cache import LRUCache

    cache: LRUCache[str] = LRUCache(100, sizeof=len, max_entries=3)
    for key in "abcd":
        cache.put(key, "x" * 10)
    assert cache.stats.entries == 3 and "a" not in cache  # the entry bound
    cache.put("big", "y" * 90)
    assert cache.stats.size <= 100 and "big" in cache  # the byte bound evicts the oldest
    assert not LRUCache(100, max_entries=0).enabled


def test_stats_show_every_cache_and_the_image_memory_budget(server) -> None:
    httpx.post(f"{server.url}/v1/chat/completions", json=good_body(), timeout=60)
    stats = httpx.get(f"{server.url}/stats").json()
    for name in ("preprocess_cache", "encoder_cache", "response_cache"):
        assert stats[name]["budget"] > 0 and 0 <= stats[name]["size"] <= stats[name]["budget"], name
    assert stats["response_cache"]["budget"] == ServerSettings().response_cache_bytes
    memory = stats["image_memory"]
    assert memory["budget_bytes"] > 0 and memory["in_use_bytes"] == 0
