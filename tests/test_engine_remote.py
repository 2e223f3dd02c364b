"""The remote engine against real servers on loopback: a nano vlmlab server as the upstream, a
small fault server (starlette) that fails in scripted ways and otherwise proxies to it, and a TCP
proxy that can be killed mid-stream. Nothing is mocked: every request crosses a real socket."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from PIL import Image
from serverutil import data_url, file_server, free_port, image_message, png_bytes, running_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.engines import GenerationRequest, load_engine
from vlmlab.engines.remote.engine import RemoteEngine
from vlmlab.media import MediaPolicy, load_image
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult, ImagePart, SamplingParams
from vlmlab.protocol.errors import (
    AuthenticationError,
    ConfigError,
    ContextLengthError,
    EngineError,
    EngineUnavailableError,
    NotFoundError,
    OverloadedError,
)

KEY = "upstream-key"
IMAGE_FILE = "shape.png"
QUESTION = "What colour is the shape?"


# -- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote-media")
    (root / IMAGE_FILE).write_bytes(png_bytes(120, 90, "blue", "circle"))
    return root


@pytest.fixture(scope="module")
def image_host(media_dir: Path) -> Iterator[str]:
    with file_server(media_dir) as url:
        yield url


@pytest.fixture(scope="module")
def upstream(media_dir: Path):
    """The real nano server every remote engine talks to (behind an API key)."""
    settings = ServerSettings(
        engines=(EngineSpec(model="nano", device="cpu"),),
        api_key=KEY,
        trusted_media_hosts=("127.0.0.1",),
        max_images=3,
        default_max_tokens=16,
        response_cache_entries=0,  # every answer is really generated
    )
    with running_server(settings) as running:
        yield running


def serve_app(app: Any) -> tuple[uvicorn.Server, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the fault server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


class FaultServer:
    """An OpenAI-shaped server that plays ``plan`` (one behaviour per chat request, in order) and
    proxies to the nano upstream once the plan is used up. Records every chat request."""

    def __init__(self, upstream_url: str):
        self.upstream_url = upstream_url
        self.plan: list[str] = []
        self.hits: list[tuple[float, str, dict[str, Any]]] = []
        app = Starlette(routes=[Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat, methods=["POST"])])
        self.server, self.url = serve_app(app)
        self.base_url = f"{self.url}/v1"

    def reset(self, *plan: str) -> None:
        self.plan, self.hits = list(plan), []

    async def models(self, request: Request) -> Response:
        # Not a vlmlab card: no owned_by "vlmlab", no max_model_len, no /tokenize behind it.
        return JSONResponse({"object": "list", "data": [{"id": "nano", "object": "model", "owned_by": "faults"}]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        behaviour = self.plan.pop(0) if self.plan else "proxy"
        self.hits.append((time.perf_counter(), behaviour, body))
        if behaviour == "500":
            return JSONResponse({"error": {"message": "upstream exploded", "type": "InternalServerError", "code": 500}}, 500)
        if behaviour.startswith("429"):
            wait = behaviour.partition(":")[2] or "1"
            return JSONResponse({"error": {"message": "slow down", "type": "RateLimitError", "code": 429}}, 429, headers={"Retry-After": wait})
        if behaviour == "slow":
            await asyncio.sleep(2.0)  # beyond the engine's timeout, before any byte
            return JSONResponse({"error": {"message": "too late"}}, 500)
        if behaviour in SCRIPTED:
            return StreamingResponse(iter(SCRIPTED[behaviour]), media_type="text/event-stream")
        return await self.proxy(request, body)

    async def proxy(self, request: Request, body: dict[str, Any]) -> Response:
        client = httpx.AsyncClient(timeout=60)
        headers = {"authorization": request.headers.get("authorization", "")}
        upstream = await client.send(client.build_request("POST", f"{self.upstream_url}/v1/chat/completions", json=body, headers=headers), stream=True)

        async def relay() -> Any:
            try:
                async for raw in upstream.aiter_raw():
                    yield raw
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(relay(), status_code=upstream.status_code, media_type=upstream.headers.get("content-type"))


def sse(*events: Any) -> list[str]:
    """SSE frames: dicts as JSON ``data:``, other strings verbatim after ``data:``, ``:...`` as comments."""
    return [e + "\n\n" if isinstance(e, str) and e.startswith(":") else f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]


def delta(text: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
    return {"id": "x", "object": "chat.completion.chunk", "model": "nano", "choices": [choice], **extra}


SCRIPTED = {
    "garbage": sse(delta(""), "this is not json", "[DONE]"),
    "inband": sse(delta("Hel"), {"error": {"message": "engine exploded mid-way", "type": "InternalServerError", "code": 500}}, "[DONE]"),
    "usage_mlx": sse(delta("re"), delta("d", "stop"), {"choices": [], "usage": {"input_tokens": 40, "output_tokens": 2}}, "[DONE]"),
    "usage_ollama": sse(delta("red", "stop", prompt_eval_count=41, eval_count=3), "[DONE]"),
    "no_usage": sse(": keep-alive", delta("a"), delta("b"), delta("c", "length"), "[DONE]"),
    "cut_early": sse(delta("")),  # the role chunk, then the connection ends
}


@pytest.fixture(scope="module")
def faults(upstream) -> Iterator[FaultServer]:
    server = FaultServer(upstream.url)
    yield server
    server.server.should_exit = True


class TcpProxy:
    """A byte-level proxy to ``port`` whose :meth:`kill` aborts every connection (both sides)."""

    def __init__(self, port: int):
        self.target = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.AbstractServer | None = None
        self.transports: set[asyncio.BaseTransport] = set()
        self.port = 0
        self.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
            self.port = self.server.sockets[0].getsockname()[1]

        self.call(start())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.transports |= {writer.transport, up_writer.transport}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def kill(self) -> None:
        async def kill() -> None:
            assert self.server is not None
            self.server.close()
            for transport in self.transports:
                transport.abort()  # RST to both sides, as a crashed host
            self.transports.clear()

        self.call(kill())

    def close(self) -> None:
        self.kill()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def engines() -> Iterator[Any]:
    """``make(base_url, **extra)`` loads a remote engine for model nano; all closed afterwards."""
    made: list[RemoteEngine] = []

    def make(base_url: str, model: str = "nano", **extra: Any) -> RemoteEngine:
        engine = RemoteEngine.load(EngineSpec(engine="remote", model=model, extra={"base_url": base_url, "api_key": KEY, **extra}))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def loaded(ref: str, media_dir: Path | None = None) -> ImagePart:
    policy = MediaPolicy(trusted_hosts=frozenset({"127.0.0.1"}), allowed_local_root=media_dir)
    return ImagePart(ref=ref, data=load_image(ref, policy))


def request(images: list[ImagePart], max_tokens: int = 12, ignore_eos: bool = False, question: str = QUESTION) -> GenerationRequest:
    return GenerationRequest(Chat.single(question, images), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos))


def collect(engine: RemoteEngine, req: GenerationRequest) -> tuple[list[str], GenerationResult]:
    async def run() -> tuple[list[str], GenerationResult]:
        chunks: list[str] = []
        result = None
        async for item in engine.generate(req):
            if isinstance(item, GenerationChunk):
                chunks.append(item.text)
            else:
                result = item
        assert result is not None
        return chunks, result

    return asyncio.run(run())


def direct(upstream, messages: list[dict], **params: Any) -> dict[str, Any]:
    body = {"model": "nano", "messages": messages, "temperature": 0, "max_tokens": 12, **params}
    response = httpx.post(f"{upstream.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def direct_stream_texts(upstream, messages: list[dict], **params: Any) -> list[str]:
    body = {"model": "nano", "messages": messages, "temperature": 0, "max_tokens": 12, "stream": True, **params}
    texts = []
    with httpx.stream("POST", f"{upstream.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if choice["delta"].get("content"):
                        texts.append(choice["delta"]["content"])
    return texts


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- loading -------------------------------------------------------------------------------------


def test_load_reads_the_listing_and_refuses_clearly(upstream, engines) -> None:
    engine = engines(upstream.base_url)
    info = engine.info()
    assert (info.engine, info.model, info.family, info.max_model_len, info.max_images) == ("remote", "nano", "nano", 1024, 3)
    assert info.details["remote_engine"] == "hf" and engine.capabilities.exact_token_counts
    assert type(engine).capabilities.exact_token_counts is False  # the class default is unchanged
    # The registry's aliases and a bare host:port (``/v1`` added) reach the same server.
    via_alias = load_engine(EngineSpec(engine="openai-compatible", model="nano", extra={"base_url": upstream.url, "api_key": KEY}))
    assert via_alias.settings.base_url == upstream.base_url
    via_alias.close()

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EngineUnavailableError, match=dead.replace(".", r"\.")):
        engines(dead)
    with pytest.raises(NotFoundError, match=r"does not serve 'llava'.*it serves: nano"):
        engines(upstream.base_url, model="llava")
    with pytest.raises(AuthenticationError, match="refused the request \\(401\\).*API key"):
        engines(upstream.base_url, api_key="wrong")
    with pytest.raises(ConfigError, match="--base-url"):
        RemoteEngine.load(EngineSpec(engine="remote", model="nano"))
    with pytest.raises(ConfigError, match="send_images_as"):
        engines(upstream.base_url, send_images_as="files")


# -- answers ---------------------------------------------------------------------------------------


def test_answers_and_usage_equal_the_upstream_directly(upstream, engines) -> None:
    image = data_url(png_bytes())
    messages = image_message(QUESTION, image)
    expected = direct(upstream, messages, ignore_eos=True)
    expected_chunks = direct_stream_texts(upstream, messages, ignore_eos=True)
    req = request([loaded(image)], ignore_eos=True)
    for stream in (True, False):
        engine = engines(upstream.base_url, stream=stream)
        chunks, result = collect(engine, req)
        assert result.text == expected["choices"][0]["message"]["content"]
        assert result.finish_reason == expected["choices"][0]["finish_reason"] == "length"
        usage = expected["usage"]
        assert (result.prompt_tokens, result.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert result.image_tokens == usage["prompt_tokens_details"]["image_tokens"] > 0
        assert (result.engine, result.model) == ("remote", "nano")
        assert result.timings.ttft_s is not None and result.timings.total_s >= result.timings.ttft_s
        if stream:  # chunk boundaries depend on the upstream's timing; the text does not
            assert "".join(chunks) == "".join(expected_chunks) and len(chunks) > 1
    # Exact counts come from the upstream's /tokenize.
    count = engine.count_prompt_tokens(req.chat)
    assert (count.prompt_tokens, count.image_tokens) == (expected["usage"]["prompt_tokens"], result.image_tokens)
    # A client error keeps the remote's class and words, and is not retried.
    with pytest.raises(ContextLengthError, match="maximum context length is 1024"):
        collect(engine, request([loaded(image)], max_tokens=5000))
    assert engine.counters["retries"] == 0 and engine.health() == (True, "ok")


def test_a_vlmlab_server_on_the_remote_engine_answers_like_the_upstream(upstream) -> None:
    spec = EngineSpec(engine="remote", model="nano", extra={"base_url": upstream.base_url, "api_key": KEY})
    messages = image_message(QUESTION, data_url(png_bytes(80, 80, "green")))
    params = {"model": "nano", "messages": messages, "temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    with (
        running_server(ServerSettings(engines=(spec,), response_cache_entries=0)) as front,
        openai.OpenAI(base_url=front.base_url, api_key="unused", max_retries=0) as client,
        openai.OpenAI(base_url=upstream.base_url, api_key=KEY, max_retries=0) as reference,
    ):
        ours, theirs = client.chat.completions.create(**params), reference.chat.completions.create(**params)
        assert ours.choices[0].message.content == theirs.choices[0].message.content
        details = ours.usage.model_dump()["prompt_tokens_details"], theirs.usage.model_dump()["prompt_tokens_details"]
        assert details[0]["image_tokens"] == details[1]["image_tokens"] > 0
        assert (ours.usage.prompt_tokens, ours.usage.completion_tokens) == (theirs.usage.prompt_tokens, theirs.usage.completion_tokens)
        stream = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == theirs.choices[0].message.content
        assert stream[-1].usage.prompt_tokens == theirs.usage.prompt_tokens
        card = client.models.list().data[0].model_dump()
        assert (card["engine"], card["max_model_len"], card["max_images"]) == ("remote", 1024, 3)
        tokens = httpx.post(f"{front.url}/tokenize", json={"messages": messages}).json()
        upstream_tokens = httpx.post(f"{upstream.url}/tokenize", json={"messages": messages}, headers={"Authorization": f"Bearer {KEY}"}).json()
        assert tokens == upstream_tokens


def test_estimated_counts_without_a_vlmlab_upstream(upstream, faults, engines) -> None:
    engine = engines(faults.base_url)
    assert engine.capabilities.exact_token_counts is False and engine.info().max_model_len == 1024  # family default
    image = data_url(png_bytes(200, 120))
    chat = Chat.single(QUESTION, [loaded(image)])
    estimate = engine.count_prompt_tokens(chat)
    exact = httpx.post(f"{upstream.url}/tokenize", json={"messages": image_message(QUESTION, image)}, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert estimate.image_tokens == exact["image_tokens"] and list(estimate.per_image) == exact["per_image_tokens"]
    assert abs(estimate.prompt_tokens - exact["prompt_tokens"]) <= 0.25 * exact["prompt_tokens"]


# -- cancellation and dying upstreams --------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "aclose"])
def test_cancelling_the_consumer_stops_the_upstream_generation(upstream, engines, how: str) -> None:
    engine = engines(upstream.base_url)

    async def stop_after_three() -> bool:
        three = asyncio.Event()
        stream = engine.generate(request([loaded(data_url(png_bytes()))], max_tokens=800, ignore_eos=True))

        async def consume() -> None:
            received = 0
            async for _ in stream:
                received += 1
                if received == 3:
                    three.set()
                    if how == "aclose":
                        break  # a consumer that stops reading and closes the stream

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(three.wait(), 30)
        if how == "cancel":
            assert upstream.service.in_engine == 1
            task.cancel()  # as the server does when its client disconnects
        await asyncio.gather(task, return_exceptions=True)
        if how == "aclose":
            await stream.aclose()
        for _ in range(100):  # the loop (and its connection pool) is still alive here
            if upstream.service.in_engine == 0 and upstream.service.active == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(stop_after_three()), "the upstream kept generating after the consumer stopped"
    assert engine.counters["cancelled"] == 1 and engine.health() == (True, "ok")


def test_upstream_killed_mid_stream_is_an_engine_error(upstream, engines) -> None:
    proxy = TcpProxy(int(upstream.url.rsplit(":", 1)[1]))
    try:
        engine = engines(f"{proxy.url}/v1", max_retries=2, backoff_s=0.05)

        async def run() -> list[str]:
            received: list[str] = []
            async for item in engine.generate(request([loaded(data_url(png_bytes()))], max_tokens=800, ignore_eos=True)):
                received.append(item.text)  # type: ignore[union-attr]
                if len(received) == 3:
                    proxy.kill()
            return received

        with pytest.raises(EngineError, match=r"dropped the connection.*after \d+ chunk"):
            asyncio.run(run())
        assert engine.counters["retries"] == 0  # text had reached the caller: never replayed
        assert wait_until(lambda: upstream.service.in_engine == 0, 10)  # the upstream saw the drop
    finally:
        proxy.close()


# -- retries, backoff and bad streams --------------------------------------------------------------


def test_5xx_are_retried_with_backoff_then_given_up(upstream, faults, engines) -> None:
    image = data_url(png_bytes())
    expected = direct(upstream, image_message(QUESTION, image))
    engine = engines(faults.base_url, max_retries=3, backoff_s=0.1, circuit_failures=1)
    faults.reset("500", "500")
    _, result = collect(engine, request([loaded(image)]))
    assert [h[1] for h in faults.hits] == ["500", "500", "proxy"] and engine.counters["retries"] == 2
    assert result.text == expected["choices"][0]["message"]["content"]
    assert result.prompt_tokens == expected["usage"]["prompt_tokens"]
    gaps = [b[0] - a[0] for a, b in zip(faults.hits, faults.hits[1:])]
    assert gaps[0] >= 0.08 and gaps[1] >= 0.16  # 0.1 then 0.2 s, +-20 % jitter

    faults.reset("500", "500", "500", "500")
    with pytest.raises(EngineError, match=r"failed \(500\): upstream exploded \(gave up after 4 attempt"):
        collect(engine, request([loaded(image)]))
    assert len(faults.hits) == 4
    healthy, reason = engine.health()
    assert not healthy and faults.base_url in reason  # circuit_failures=1: open now
    with pytest.raises(EngineUnavailableError, match="not trying again"):
        collect(engine, request([loaded(image)]))
    assert len(faults.hits) == 4  # failed fast, no request sent


def test_429_honours_retry_after(faults, engines) -> None:
    engine = engines(faults.base_url, max_retries=2, backoff_s=0.01)
    faults.reset("429:1")
    started = time.perf_counter()
    _, result = collect(engine, request([loaded(data_url(png_bytes()))]))
    assert result.text and [h[1] for h in faults.hits] == ["429:1", "proxy"]
    assert faults.hits[1][0] - faults.hits[0][0] >= 0.95 and time.perf_counter() - started < 5
    faults.reset("429:120")  # longer than max_retry_wait_s: hand the 429 back at once
    with pytest.raises(OverloadedError, match="slow down") as caught:
        collect(engine, request([loaded(data_url(png_bytes()))]))
    assert caught.value.retry_after == 120 and len(faults.hits) == 1
    assert engine.health()[0]  # a rate limit is not a dead server


def test_slow_first_byte_times_out_and_is_retried(faults, engines) -> None:
    engine = engines(faults.base_url, timeout_s=0.3, max_retries=1, backoff_s=0.01)
    faults.reset("slow", "slow")
    started = time.perf_counter()
    with pytest.raises(EngineError, match=r"sent nothing for 0.3 s.*gave up after 2"):
        collect(engine, request([loaded(data_url(png_bytes()))]))
    assert len(faults.hits) == 2 and time.perf_counter() - started < 1.8  # not 2 x 2 s


def test_malformed_truncated_and_in_band_error_streams(faults, engines) -> None:
    engine = engines(faults.base_url, max_retries=1, backoff_s=0.01)
    req = request([loaded(data_url(png_bytes()))])
    faults.reset("garbage")
    with pytest.raises(EngineError, match="malformed stream event: 'this is not json'"):
        collect(engine, req)
    assert len(faults.hits) == 1  # a protocol error is not retried

    faults.reset("inband")
    received: list[str] = []

    async def run() -> None:
        async for item in engine.generate(req):
            received.append(item.text)  # type: ignore[union-attr]

    with pytest.raises(EngineError, match="engine exploded mid-way"):
        asyncio.run(run())
    assert received == ["Hel"]

    faults.reset("cut_early")  # the stream ended before any text: safe to ask again
    _, result = collect(engine, req)
    assert [h[1] for h in faults.hits] == ["cut_early", "proxy"] and result.text


def test_usage_under_other_names_or_missing(faults, engines) -> None:
    engine = engines(faults.base_url)
    image = loaded(data_url(png_bytes()))
    faults.reset("usage_mlx", "usage_ollama", "no_usage")
    _, mlx = collect(engine, request([image]))
    _, ollama = collect(engine, request([image]))
    _, missing = collect(engine, request([image]))
    assert (mlx.text, mlx.prompt_tokens, mlx.completion_tokens) == ("red", 40, 2)
    assert (ollama.text, ollama.prompt_tokens, ollama.completion_tokens) == ("red", 41, 3)
    assert (missing.text, missing.finish_reason, missing.completion_tokens) == ("abc", "length", 3)
    estimate = engine.count_prompt_tokens(Chat.single(QUESTION, [image]))
    assert missing.prompt_tokens == estimate.prompt_tokens and missing.image_tokens == estimate.image_tokens == 28
    assert mlx.image_tokens == 28  # the family rule fills what the server does not report
    sent = faults.hits[0][2]
    assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 12
    assert sent["temperature"] == 0.0 and "top_k" not in sent and "ignore_eos" not in sent and "seed" not in sent
    # Vendor fields go out only when set (OpenAI's API rejects arguments it does not know).
    faults.reset("usage_mlx")
    sampling = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=("x",), ignore_eos=True)
    collect(engine, GenerationRequest(Chat.single(QUESTION, [image]), sampling, {"longest_edge": 64}))
    sent = faults.hits[0][2]
    assert {k: sent[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")} == {
        "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3, "stop": ["x"], "ignore_eos": True,
    }
    assert sent["mm_processor_kwargs"] == {"longest_edge": 64} and sent["model"] == "nano"


def test_settings_urls_keys_and_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    from email.utils import formatdate

    from vlmlab.engines.remote.wire import default_api_key, normalize_base_url, retry_after_s

    assert normalize_base_url("http://gpu:8000/") == "http://gpu:8000/v1"
    assert normalize_base_url("https://api.mistral.ai/v1") == "https://api.mistral.ai/v1"
    assert normalize_base_url("http://h/openai/v1/") == "http://h/openai/v1"
    with pytest.raises(ConfigError, match="http"):
        normalize_base_url("localhost:8000")
    monkeypatch.setenv("MISTRAL_API_KEY", "m-key")
    monkeypatch.setenv("OPENAI_API_KEY", "o-key")
    assert default_api_key("https://api.mistral.ai/v1", None) == "m-key"
    assert default_api_key("https://api.openai.com/v1", None) == "o-key"
    assert default_api_key("http://127.0.0.1:8000/v1", None) is None  # a key only goes to its issuer
    assert default_api_key("https://api.mistral.ai/v1", "explicit") == "explicit"
    assert retry_after_s("2") == 2.0 and retry_after_s("soon") is None and retry_after_s(None) is None
    assert 3.0 <= retry_after_s(formatdate(time.time() + 5, usegmt=True)) <= 5.0  # an HTTP date


# -- images ----------------------------------------------------------------------------------------


def test_images_forwarded_as_urls_or_data_urls(upstream, faults, engines, image_host, media_dir) -> None:
    http_ref = f"{image_host}/{IMAGE_FILE}"
    original = (media_dir / IMAGE_FILE).read_bytes()
    inline = data_url(png_bytes(64, 64, "green"))
    expected = direct(upstream, image_message(QUESTION, http_ref))["choices"][0]["message"]["content"]
    answers = {}
    for mode in ("url", "data_url"):
        engine = engines(faults.base_url, send_images_as=mode)
        faults.reset()
        _, result = collect(engine, request([loaded(http_ref), loaded(inline)]))
        answers[mode] = result.text
        urls = [p["image_url"]["url"] for p in faults.hits[0][2]["messages"][0]["content"] if p["type"] == "image_url"]
        assert urls[1] == inline  # a data URL keeps the user's original bytes in both modes
        if mode == "url":
            assert urls[0] == http_ref  # the upstream fetched it itself (trusted 127.0.0.1)
        else:
            assert urls[0].startswith("data:image/png;base64,")
            sent = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
            assert sent.tobytes() == Image.open(io.BytesIO(original)).convert("RGB").tobytes()  # lossless
    assert answers["url"] == answers["data_url"]
    # A local file is never forwarded by path: it becomes a data URL even in url mode.
    engine = engines(faults.base_url, send_images_as="url")
    faults.reset()
    _, by_file = collect(engine, request([loaded(str(media_dir / IMAGE_FILE), media_dir)]))
    assert faults.hits[0][2]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert by_file.text == expected


# -- the server's fallback chain -------------------------------------------------------------------


def test_chain_falls_back_to_hf_at_start_and_at_run_time(upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    chain = (EngineSpec(engine="remote", model="nano", extra={"base_url": dead}), EngineSpec(model="nano", device="cpu"))
    body = {"model": "nano", "messages": image_message(QUESTION, data_url(png_bytes())), "max_tokens": 4, "temperature": 0}
    with running_server(ServerSettings(engines=chain)) as server:
        stats = httpx.get(f"{server.url}/stats").json()
        assert stats["engine"] == "hf" and stats["engines_skipped"][0]["engine"] == "remote"
        assert dead in stats["engines_skipped"][0]["reason"]
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200

    proxy = TcpProxy(int(upstream.url.rsplit(":", 1)[1]))
    remote = EngineSpec(engine="remote", model="nano", extra={"base_url": f"{proxy.url}/v1", "api_key": KEY, "max_retries": 1, "backoff_s": 0.02})
    settings = ServerSettings(engines=(remote, EngineSpec(model="nano", device="cpu")), engine_failures_before_fallback=2, response_cache_entries=0)
    try:
        with running_server(settings) as server:
            post = functools.partial(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=60)
            assert post().status_code == 200 and httpx.get(f"{server.url}/stats").json()["engine"] == "remote"
            proxy.kill()
            failed = [post() for _ in range(2)]
            assert [r.status_code for r in failed] == [500, 500]
            assert f"the remote server {proxy.url}/v1 cannot be reached" in failed[0].json()["error"]["message"]
            answer = post()
            assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
            stats = httpx.get(f"{server.url}/stats").json()
            assert stats["engine"] == "hf" and "2 consecutive failures" in stats["engines_skipped"][-1]["reason"]
    finally:
        proxy.close()


# -- the CLI ---------------------------------------------------------------------------------------


def test_vlmlab_chat_with_the_remote_engine(upstream, media_dir) -> None:
    import os
    import subprocess
    import sys

    from vlmlab.cli import remote_extra

    image = media_dir / IMAGE_FILE
    expected = direct(upstream, image_message(QUESTION, data_url(image.read_bytes())), max_tokens=8)
    base = [sys.executable, "-m", "vlmlab", "chat", QUESTION, "-i", str(image), "--engine", "remote", "--model", "nano", "--max-tokens", "8"]
    env = {**os.environ, "VLMLAB_REMOTE_API_KEY": KEY}  # the flag's environment variable
    out = subprocess.run([*base, "--base-url", upstream.url], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected["choices"][0]["message"]["content"]
    missing = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--base-url" in missing.stderr and "Traceback" not in missing.stderr
    # `vlmlab serve` lays the flags over a config file's extra settings.
    assert remote_extra("http://h/v1", None, {"max_retries": 1, "base_url": "x"}) == {"max_retries": 1, "base_url": "http://h/v1"}
    assert remote_extra(None, None, {"max_retries": 1}) is None
