"""Tool calling on a real server (nano, official openai client): forced calls follow the
function's schema, a call round trip ends in an answer, auto leaves nano's plain answers alone,
calls stream as deltas, the remote engine forwards tools to an upstream server and brings its
calls back; answers in the families' own call formats are read; a template with its own tool
format gets the tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.engines import load_engine
from vlmlab.nano import checkpoint_path
from vlmlab.protocol.core import Chat, Message, TextPart, Tool, ToolCall
from vlmlab.protocol.tools import parse_tool_calls, plain_chat

RED = image_message("What colour is the shape?", data_url(png_bytes(96, 64, "red", "square")))
COLOUR = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"], "additionalProperties": False}
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "hex_of", "description": "A colour's hex code", "parameters": COLOUR}},
    {"type": "function", "function": {"name": "count_sides", "description": "Sides of a shape", "parameters": COUNT}},
]
SCHEMAS = {"hex_of": COLOUR, "count_sides": COUNT}


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), default_max_tokens=64, response_cache_entries=0)
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def check_calls(message, names: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.function.name in names and call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(4))
def test_required_call_follows_the_schema(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(model="nano", messages=RED, temperature=1.0, seed=seed, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert reply.choices[0].finish_reason == "tool_calls"
    check_calls(reply.choices[0].message, {"hex_of", "count_sides"})
    assert len(reply.choices[0].message.tool_calls) == 1  # parallel_tool_calls false


def test_named_call_calls_that_function(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "count_sides"}}
    reply = client.chat.completions.create(model="nano", messages=RED, temperature=0, tools=TOOLS, tool_choice=choice)
    check_calls(reply.choices[0].message, {"count_sides"})
    assert all(c.function.name == "count_sides" for c in reply.choices[0].message.tool_calls)


def test_a_call_round_trip_ends_in_an_answer(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="nano", messages=RED, temperature=0, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "hex_of"}}, parallel_tool_calls=False)
    message = first.choices[0].message
    call = message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), COLOUR)  # (nano, lost in the tool list, guesses)
    history = [*RED, message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "#ff0000"}]
    final = client.chat.completions.create(model="nano", messages=history, temperature=0, max_tokens=8, tools=TOOLS)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_auto_leaves_a_plain_answer_alone(client: openai.OpenAI) -> None:
    """nano never learned to call: with tools offered (auto) it answers in text, streamed as text."""
    reply = client.chat.completions.create(model="nano", messages=RED, temperature=0, max_tokens=8, tools=TOOLS)
    text = reply.choices[0].message.content
    assert text and not text.startswith(("[", "{")) and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = [
        c.choices[0].delta.content for c in client.chat.completions.create(model="nano", messages=RED, temperature=0, max_tokens=8, tools=TOOLS, stream=True)
        if c.choices and c.choices[0].delta.content
    ]  # fmt: skip
    assert "".join(chunks) == text and len(chunks) > 1  # streamed piece by piece, not held back


def test_calls_stream_as_deltas(client: openai.OpenAI) -> None:
    calls, finish, content = {}, None, ""
    stream = client.chat.completions.create(model="nano", messages=RED, temperature=0, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stream=True)
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == ""  # the call's JSON is not streamed as text
    assert len(calls) == 1
    call = calls[0]
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ],
)
def test_bad_tool_requests_are_400s(server, fields: dict, param: str | None) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", json={"model": "nano", "messages": RED, **fields}, timeout=30)
    assert response.status_code == 400, response.text
    if param:
        assert response.json()["error"]["param"] == param


def test_a_tool_message_needs_its_call_id(server) -> None:
    messages = [*RED, {"role": "tool", "content": "#ff0000"}]
    response = httpx.post(f"{server.base_url}/chat/completions", json={"model": "nano", "messages": messages}, timeout=30)
    assert response.status_code == 400 and "tool_call_id" in response.json()["error"]["message"]


def test_the_remote_engine_forwards_tools_and_returns_the_calls(server) -> None:
    settings = ServerSettings(engines=(EngineSpec(model="nano", engine="remote", extra={"base_url": server.base_url}),))
    with running_server(settings) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="nano", messages=RED, temperature=0, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "hex_of"}}, parallel_tool_calls=False)
        assert reply.choices[0].finish_reason == "tool_calls"
        check_calls(reply.choices[0].message, {"hex_of"})
        text = ""
        calls = []
        for chunk in client.chat.completions.create(model="nano", messages=RED, temperature=0, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                calls += chunk.choices[0].delta.tool_calls or []
        assert text == "" and len(calls) == 1


def test_the_families_call_formats_are_read() -> None:
    tools = [Tool("hex_of", parameters=json.dumps(COLOUR))]
    mistral = parse_tool_calls('[TOOL_CALLS][{"name": "hex_of", "arguments": {"colour": "red"}}]', tools)
    hermes = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "hex_of", "arguments": {"colour": "blue"}}\n</tool_call>', tools)
    plain = parse_tool_calls('{"name": "hex_of", "arguments": "{\\"colour\\": \\"green\\"}"}', tools)
    assert mistral and [json.loads(c.arguments) for c in mistral[1]] == [{"colour": "red"}]
    assert hermes and hermes[0] == "Let me check." and json.loads(hermes[1][0].arguments) == {"colour": "blue"}
    assert plain and json.loads(plain[1][0].arguments) == {"colour": "green"}
    assert parse_tool_calls('[{"name": "other", "arguments": {}}]', tools) is None  # not an offered tool
    assert parse_tool_calls('[{"name": "hex_of", "arguments": 3}]', tools) is None  # arguments not an object
    assert parse_tool_calls("[1, 2, 3]", tools) is None and parse_tool_calls("red", tools) is None


def test_plain_rendering_for_templates_without_tools() -> None:
    call = ToolCall("call_1", "hex_of", '{"colour": "red"}')
    chat = Chat(
        (Message.of("system", "Be brief."), Message.of("user", "Colour?"), Message("assistant", (), (call,)),
         Message("tool", (TextPart("#ff0000"),), tool_call_id="call_1")),
        (Tool("hex_of", "A colour's hex code", json.dumps(COLOUR)),),
    )  # fmt: skip
    plain = plain_chat(chat)
    roles = [m.role for m in plain.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert plain.messages[0].text.startswith("Be brief.") and '"hex_of"' in plain.messages[0].text
    assert json.loads(plain.messages[2].text) == [{"name": "hex_of", "arguments": {"colour": "red"}}]
    assert plain.messages[3].text == "Result of hex_of (call_1): #ff0000"


def test_a_template_with_its_own_tool_format_gets_the_tools(tmp_path: Path) -> None:
    """A checkpoint whose chat template renders tools (as Mistral's and Qwen2.5's do) is handed
    them, and its tool turns, in transformers' format instead of the plain rendering."""
    path = tmp_path / "nano-tools"
    shutil.copytree(checkpoint_path(), path)
    template = (path / "chat_template.jinja").read_text()
    tools_block = "{%- if tools -%}[AVAILABLE_TOOLS]{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}[/AVAILABLE_TOOLS]{%- endif -%}"
    calls = "{%- if message.tool_calls -%}[TOOL_CALLS]{{ message.tool_calls[0].function.name }}{%- endif -%}"
    template = template.replace("<s>{%- for message in messages -%}", "<s>" + tools_block + "{%- for message in messages -%}")
    template = template.replace("{%- elif message.role == 'assistant' -%}", "{%- elif message.role == 'assistant' -%}" + calls)
    template = template.replace("{%- endif -%}{%- endfor -%}", "{%- elif message.role == 'tool' -%}[TOOL_RESULTS]{{ body(message.content) }}[/TOOL_RESULTS]{%- endif -%}{%- endfor -%}")
    (path / "chat_template.jinja").write_text(template)
    for name in ("tokenizer_config.json", "processor_config.json"):
        config_path = path / name
        if config_path.exists():
            config = json.loads(config_path.read_text())
            config.pop("chat_template", None)
            config_path.write_text(json.dumps(config))
    engine = load_engine(EngineSpec(model=str(path), device="cpu"))
    try:
        chat = Chat(
            (Message.of("user", "Colour?"), Message("assistant", (), (ToolCall("c1", "hex_of", '{"colour":"red"}'),)),
             Message("tool", (TextPart("#ff0000"),), tool_call_id="c1")),
            (Tool("hex_of", parameters=json.dumps(COLOUR)), Tool("count_sides", parameters=json.dumps(COUNT))),
        )  # fmt: skip
        prompt = engine.render(chat)
    finally:
        engine.close()
    assert "[AVAILABLE_TOOLS]hex_of,count_sides[/AVAILABLE_TOOLS]" in prompt, prompt
    assert "[TOOL_CALLS]hex_of" in prompt and "[TOOL_RESULTS]#ff0000[/TOOL_RESULTS]" in prompt, prompt
    assert "You can call these functions" not in prompt  # not the plain rendering
