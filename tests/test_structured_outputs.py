"""Structured outputs on a real server (nano, official openai client): every answer to a
``json_schema`` request parses and validates against its schema, whatever the schema, streamed
or not, alone or batched with other schemas; ``json_object``, vLLM's ``structured_outputs`` and
``guided_*`` fields; a schema xgrammar cannot compile is a 400 naming the field.

nano never learned JSON: what it writes inside the grammar's choices is its own guess, so the
checks are about the constraint (parses, validates, ends), not about the values."""

from __future__ import annotations

import concurrent.futures
import json
import re
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings

RED = image_message("What colour is the shape?", data_url(png_bytes(96, 64, "red", "square")))
MAX_TOKENS = 320


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu", max_batch_size=16),), default_max_tokens=MAX_TOKENS)
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


# -- random schemas: every type bounded, so a complete answer always fits in MAX_TOKENS ----------

NAMES = st.sampled_from(["a", "b", "name", "colour", "n", "items", "x_1", "total"])
LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-50, 50), st.integers(0, 500)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.builds(lambda n, m: {"type": "string", "minLength": n, "maxLength": n + m}, st.integers(1, 3), st.integers(0, 4)),
    st.lists(st.sampled_from(["red", "green", "blue", "yes", "no", "4"]), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10}, st.integers(-5, 5)),
)


def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, dict[str, Any]], required: list[bool]) -> dict[str, Any]:
        names = list(props)
        return {
            "type": "object",
            "properties": props,
            "required": [n for n, r in zip(names, required) if r],
            "additionalProperties": False,
        }

    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(lambda req: build(props, req))
    )


def arrays(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda item, lo, span: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + span}, children, st.integers(0, 2), st.integers(0, 2))


def longest(schema: dict[str, Any]) -> int:
    """Characters of the longest answer ``schema`` allows (a token covers at least one character,
    so also a bound on its tokens); numbers count 24 (xgrammar bounds their value, not their digits)."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema["type"]
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "number":
        return 24
    if kind == "string":
        return 2 + 6 * schema["maxLength"]  # every character may be an escape (\u0000)
    if kind in ("boolean", "null"):
        return 5
    if kind == "array":
        return 2 + schema["maxItems"] * (longest(schema["items"]) + 1)
    return 2 + sum(len(json.dumps(name)) + 2 + longest(child) for name, child in schema["properties"].items())


SCHEMAS = st.recursive(LEAVES, lambda inner: st.one_of(objects(inner), arrays(inner)), max_leaves=6).filter(
    # a document, as structured outputs are used, whose every answer fits in the token budget
    lambda s: s.get("type") in ("object", "array") and longest(s) <= MAX_TOKENS - 8
)


def response_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def check(schema: dict[str, Any], text: str, finish: str | None) -> None:
    assert finish == "stop", f"did not end within {MAX_TOKENS} tokens: {text!r} for {schema}"
    jsonschema.validate(json.loads(text), schema)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=SCHEMAS, temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**31))
def test_random_schemas_always_validate(client: openai.OpenAI, schema: dict[str, Any], temperature: float, seed: int) -> None:
    reply = client.chat.completions.create(
        model="nano", messages=RED, max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, response_format=response_format(schema)
    )
    check(schema, reply.choices[0].message.content, reply.choices[0].finish_reason)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**31))
def test_random_schemas_validate_when_streamed(client: openai.OpenAI, schema: dict[str, Any], seed: int) -> None:
    text, finish = "", None
    stream = client.chat.completions.create(
        model="nano", messages=RED, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, stream=True, response_format=response_format(schema)
    )
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    check(schema, text, finish)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=st.lists(SCHEMAS, min_size=40, max_size=40))
def test_mixed_schemas_in_one_batch(client: openai.OpenAI, drawn: list[dict[str, Any]]) -> None:
    """50 requests at once, each with its own schema (or none): each row of the batch keeps
    its own grammar."""
    schemas: list[dict[str, Any] | None] = [*drawn, *[None] * 10]

    def ask(index: int) -> tuple[dict[str, Any] | None, str, str | None]:
        schema = schemas[index]
        extra = {"response_format": response_format(schema)} if schema else {}
        reply = client.chat.completions.create(model="nano", messages=RED, max_tokens=MAX_TOKENS, temperature=1.0, seed=index, **extra)
        return schema, reply.choices[0].message.content, reply.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(len(schemas))))
    for schema, text, finish in answers:
        if schema is None:
            assert text and not text.startswith(("{", "["))  # free text, untouched by the others' grammars
        else:
            check(schema, text, finish)


class Shape(pydantic.BaseModel):
    colour: Literal["red", "green", "blue"]
    sides: int = pydantic.Field(ge=0, le=8)
    filled: bool


def test_openai_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(model="nano", messages=RED, temperature=0, max_tokens=40, response_format=Shape)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Shape)
    assert parsed.colour == "red"  # the one field nano knows: its greedy answer survives the grammar


def test_json_object_is_an_object(client: openai.OpenAI) -> None:
    for seed in range(5):
        reply = client.chat.completions.create(model="nano", messages=RED, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, response_format={"type": "json_object"})
        content = reply.choices[0].message.content
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
        else:  # an unbounded object may run out of tokens; what there is still starts as one
            assert content.startswith("{")


@pytest.mark.parametrize(
    ("extra", "valid"),
    [
        ({"guided_choice": ["circle", "square", "triangle"]}, lambda t: t in ("circle", "square", "triangle")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
        ({"structured_outputs": {"regex": "(red|blue) [0-9]"}}, lambda t: re.fullmatch("(red|blue) [0-9]", t)),
        ({"guided_grammar": 'root ::= "colour: " ("red" | "green")'}, lambda t: t in ("colour: red", "colour: green")),
        ({"guided_json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}},
         lambda t: len(json.loads(t)) == 2),
        ({"structured_outputs": {"json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}},
         lambda t: isinstance(json.loads(t)["ok"], bool)),
    ],
)
def test_vllm_fields(client: openai.OpenAI, extra: dict[str, Any], valid: Any) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(model="nano", messages=RED, temperature=1.0, seed=seed, max_tokens=40, extra_body=extra)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and valid(text), text


def test_greedy_answer_inside_a_choice_keeps_the_models_pick(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model="nano", messages=RED, temperature=0, max_tokens=8)
    assert free.choices[0].message.content == "red"
    chosen = client.chat.completions.create(model="nano", messages=RED, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2,
                                            extra_body={"guided_choice": ["green", "red", "blue"]})  # fmt: skip
    assert chosen.choices[0].message.content == "red"
    first = chosen.choices[0].logprobs.content[0]
    assert first.top_logprobs[0].token == first.token  # logprobs report the constrained distribution


def test_cached_answers_keep_their_schema(server, client: openai.OpenAI) -> None:
    """The response cache keys on the constraint: the same request is a hit, another schema not."""
    a = {"type": "object", "properties": {"k": {"enum": ["p", "q"]}}, "required": ["k"], "additionalProperties": False}
    b = {"type": "array", "items": {"enum": ["p", "q"]}, "minItems": 1, "maxItems": 1}
    first = client.chat.completions.create(model="nano", messages=RED, temperature=0, max_tokens=20, response_format=response_format(a))
    again = client.chat.completions.create(model="nano", messages=RED, temperature=0, max_tokens=20, response_format=response_format(a))
    other = client.chat.completions.create(model="nano", messages=RED, temperature=0, max_tokens=20, response_format=response_format(b))
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.model_extra["timings"]["response_cache_hit"] is True
    assert other.model_extra["timings"]["response_cache_hit"] is False
    jsonschema.validate(json.loads(other.choices[0].message.content), b)


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}}, "response_format", "objec"),
        ({"guided_regex": "a(b"}, "guided_regex", "a(b"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar", "cannot be compiled"),
        ({"structured_outputs": {"json": {"type": "string", "pattern": "("}}}, "structured_outputs", "cannot be compiled"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
    ],
)
def test_a_spec_that_cannot_compile_is_a_400_naming_it(server, extra: dict[str, Any], param: str, says: str) -> None:
    body = {"model": "nano", "messages": RED, "max_tokens": 8, **extra}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
