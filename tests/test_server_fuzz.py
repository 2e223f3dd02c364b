"""Fuzzing the API: schemathesis against the app's own OpenAPI schema, and hypothesis-generated
message lists (text, good and broken images, hostile URLs). The server must never answer 5xx to
client input, and every 4xx must be an OpenAI error object."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serverutil import data_url, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings

schemathesis = pytest.importorskip("schemathesis")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def server():
    settings_ = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), default_max_tokens=4, max_images=3)
    with running_server(settings_) as running:
        yield running


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def clamp_lengths(body: object) -> None:
    """Fuzz the structure, not the length: long generations would only make the run slow."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 8:
                body[key] = 8


def test_schemathesis_finds_no_server_errors(server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("GET", "/v1/models")}
    for operation in operations:
        seen: list[int] = []

        @FUZZ
        @given(case=operation.as_strategy())
        def call(case) -> None:
            clamp_lengths(case.body)
            response = case.call(base_url=server.url, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text)

        call()
        assert seen


IMAGES = st.sampled_from(
    [
        data_url(png_bytes(64, 48)),
        data_url(png_bytes(300, 20, "blue", "circle")),
        data_url(b"GIF89a not really"),
        "data:image/png;base64,!!!!",
        "data:text/plain;base64,aGVsbG8=",
        "http://127.0.0.1:1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a.png",
        "file:///etc/shadow",
        "javascript:alert(1)",
        "",
    ]
)
TEXT = st.text(min_size=0, max_size=40)
PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, IMAGES),
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot"]),
        "content": st.one_of(TEXT, st.lists(PART, max_size=4), st.none()),
    }
)
EXTRAS = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.one_of(st.floats(-1, 3), st.none()),
        "top_p": st.floats(-0.5, 1.5),
        "top_k": st.integers(-5, 100),
        "seed": st.integers(-(2**40), 2**40),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20)),
        "stream": st.booleans(),
        "n": st.integers(0, 3),
        "mm_processor_kwargs": st.dictionaries(st.sampled_from(["num_crops", "max_pixels", "foo"]), st.integers(-3, 99), max_size=2),
    },
)


@FUZZ
@given(messages=st.lists(MESSAGE, min_size=0, max_size=5), extras=EXTRAS)
def test_generated_message_lists_never_cause_5xx(server, messages, extras) -> None:
    body = {"model": "nano", "messages": messages, "max_tokens": 4, **extras}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    check(response)
    if response.status_code == 200 and not extras.get("stream"):
        usage = response.json()["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 <= usage["prompt_tokens_details"]["image_tokens"] <= usage["prompt_tokens"]
    tokenized = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=60)
    check(tokenized)
