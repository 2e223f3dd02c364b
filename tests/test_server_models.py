"""Several models in one server (issue 19, first part): each with its own engine chain and
caches, picked by the request's ``model`` field; ``/v1/models`` lists them all; an unknown model
is a 404 naming the served ones; one ``/metrics`` with a label per model; a single model works
as before."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

from serverutil import data_url, free_port, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServedModel, ServerSettings, server_settings

RED = image_message("What colour is the shape?", data_url(png_bytes(96, 64, "red", "square")))


@pytest.fixture(scope="module")
def upstream():
    """A plain one-model server, reached by the two-model one as ``URL#nano`` (remote engine)."""
    with running_server(ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),))) as running:
        yield running


@pytest.fixture(scope="module")
def server(upstream):
    settings = ServerSettings(
        engines=(EngineSpec(model="nano", device="cpu"),),
        served_model_name="local",
        models=(ServedModel("far", (EngineSpec(model="nano", engine="remote", extra={"base_url": upstream.base_url}),)),),
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_models_lists_every_served_model(client: openai.OpenAI) -> None:
    cards = {card.id: card.model_extra for card in client.models.list().data}
    assert set(cards) == {"local", "far"}
    assert cards["local"]["engine"] == "hf" and cards["far"]["engine"] == "remote"


def test_requests_go_to_the_model_they_name(server, client: openai.OpenAI) -> None:
    near = client.chat.completions.create(model="local", messages=RED, temperature=0, max_tokens=8)
    far = client.chat.completions.create(model="far", messages=RED, temperature=0, max_tokens=8)
    assert near.model == "local" and far.model == "far"
    assert near.choices[0].message.content == far.choices[0].message.content == "red"
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["models"]["far"]["engine"] == "remote" and stats["models"]["local"]["engine"] == "hf"
    assert stats["models"]["far"]["totals"]["requests"] >= 1 and stats["models"]["local"]["totals"]["requests"] >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model="far", messages=RED, temperature=0, max_tokens=8, stream=True) if c.choices)
    assert streamed == "red"


def test_no_model_field_means_the_first_model(server) -> None:
    reply = httpx.post(f"{server.base_url}/chat/completions", json={"messages": RED, "max_tokens": 4, "temperature": 0}, timeout=60)
    assert reply.status_code == 200 and reply.json()["model"] == "local"


def test_an_unknown_model_is_a_404_naming_the_served_ones(client: openai.OpenAI, server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nanoo", messages=RED)
    error = info.value.body
    assert error["param"] == "model" and "'local'" in error["message"] and "'far'" in error["message"]
    count = httpx.post(f"{server.url}/tokenize", json={"model": "far", "messages": RED}).json()
    assert count["image_tokens"] > 0


def test_one_metrics_page_with_a_label_per_model(server, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="far", messages=RED, temperature=0, max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    assert text.count("# HELP vllm:num_requests_running") == 1  # one family, not one per model
    assert 'vllm:num_requests_running{model_name="local"}' in text and 'vllm:num_requests_running{model_name="far"}' in text
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_config_and_flags_name_the_models() -> None:
    settings = server_settings(
        {"models": ["http://gpu1:8000/v1#mistralai/Pixtral-12B-2409", {"model": "nano", "name": "nano-int8", "extra": {"quantization": "int8"}}]},
        model="nano",
    )  # fmt: skip
    names = [m.model_name for m in settings.each_model()]
    assert names == ["nano", "mistralai/Pixtral-12B-2409", "nano-int8"]
    assert settings.models[0].engines[0].engine == "remote" and settings.models[0].engines[0].extra["base_url"] == "http://gpu1:8000/v1"
    assert settings.models[1].engines[0].extra == {"quantization": "int8"}
    with pytest.raises(Exception, match="given more than once"):
        server_settings({"models": ["nano"]}, model="nano")


def test_serve_with_two_models_from_the_command_line() -> None:
    port = free_port()
    command = [sys.executable, "-m", "vlmlab", "serve", "--port", str(port), "--model", "nano", "--model", "vllm:nano"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    # The second one cannot load here (no GPU): one line naming it, nothing served.
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "vLLM" in done.stderr, done.stderr
    command = [sys.executable, "-m", "vlmlab", "serve", "--port", str(port), "--model", "nano", "--model", "hf:nano", "--served-model-name", "a"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        ids: list[str] = []
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()["data"]]
                break
            except (httpx.HTTPError, KeyError, ValueError):
                time.sleep(0.3)
        assert ids == ["a", "hf:nano"], ids
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "a, hf:nano on http://127.0.0.1" in output, output
