"""Fuzzing the API: schemathesis against the app's own OpenAPI schema, and hypothesis-generated
message lists (text, good and broken images, hostile URLs). The server must never answer 5xx to
client input, and every 4xx must be an OpenAI error object."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
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


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_all_checks(server, mode: str) -> None:
    """The documented contract matches behaviour: schemathesis' checks (status codes, content
    types, response schemas, negative data rejected, positive data accepted, ...) over every
    operation, with data that fits the schema and data that does not."""
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    for operation in [result.ok() for result in schema.get_all_operations()]:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy(generation_mode=generation))
        def call(case) -> None:
            clamp_lengths(case.body)
            # Every check but one: "schema-valid means accepted" cannot hold for an API whose
            # meaning goes beyond its schema (an unknown processor option, text past the
            # context, a lone surrogate). Those are 400s in OpenAI's shape, checked here.
            response = case.call_and_validate(
                base_url=server.url, timeout=60, excluded_checks=[positive_data_acceptance]
            )
            if mode == "positive":
                assert response.status_code in (200, 400, 404, 413, 429), response.text
            check(httpx.Response(response.status_code, content=response.content))

        try:
            call()
        except Unsatisfiable:
            # An operation with no parameters and no body (GET /health) has no negative data.
            assert mode == "negative" and operation.method.upper() == "GET", operation.path


JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec=None), max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "n", "stream", "stream_options", "mm_processor_kwargs", "ignore_eos", "user"]  # fmt: skip
BODY = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON_VALUE, max_size=6).map(
    lambda body: {"messages": [{"role": "user", "content": "hi"}], **body, "max_tokens": 2}
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=BODY)
def test_whole_bodies_of_any_shape_never_cause_5xx(server, body) -> None:
    """Strings of any code point (lone surrogates included), integers of any size, nested and
    wrong types in every field: a 4xx in OpenAI's shape or a 200, never a 5xx, and the engine
    serves the next request."""
    import json as json_module

    text = json_module.dumps(body)  # \\udXXX escapes reach the server as written
    for path in ("/v1/chat/completions", "/tokenize"):
        response = httpx.post(f"{server.url}{path}", content=text, headers={"content-type": "application/json"}, timeout=60)
        check(response)
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
