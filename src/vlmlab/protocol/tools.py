"""Tool calling, engine-neutral: the constraint of a forced call, the plain rendering of tools
and tool turns for chat templates that know none, and reading calls out of an answer.

Answers are read in the formats the families use (vLLM's tool parsers read the same):

* Mistral / Pixtral: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}``;
* Qwen2.5 / Hermes: one ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` block per call;
* the plain form: the answer is exactly that JSON list (or one such object). This is what a
  forced call writes (its grammar is :func:`forced_call`) and what :func:`plain_chat` asks for.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from vlmlab.protocol.core import Chat, Message, StructuredOutput, TextPart, Tool, ToolCall
from vlmlab.protocol.errors import BadRequestError

_HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
_MISTRAL = "[TOOL_CALLS]"
MAX_PARALLEL_CALLS = 8


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_choice(tools: Sequence[Tool], choice: str) -> None:
    """Raises BadRequestError for a ``tool_choice`` that names no offered tool, or that asks for
    a call without tools."""
    if choice in ("auto", "none"):
        return
    if not tools:
        raise BadRequestError(f"tool_choice {choice!r} needs tools", param="tool_choice")
    if choice != "required" and choice not in {t.name for t in tools}:
        names = ", ".join(t.name for t in tools)
        raise BadRequestError(f"tool_choice names function {choice!r}, which is not among the tools ({names})", param="tool_choice")


def forced_call(tools: Sequence[Tool], choice: str, parallel: bool) -> StructuredOutput | None:
    """The constraint for ``tool_choice`` ``required`` or a function's name: a JSON list of calls,
    each ``{"name": <a tool>, "arguments": <its schema>}``."""
    if choice in ("auto", "none") or not tools:
        return None
    chosen = [t for t in tools if choice == "required" or t.name == choice]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    item = variants[0] if len(variants) == 1 else {"anyOf": variants}
    # A named function is one call (OpenAI: "forces the model to call that function"); with
    # "required" and parallel calls, up to MAX_PARALLEL_CALLS, so that a model that never
    # learned to stop listing calls still ends.
    most = MAX_PARALLEL_CALLS if parallel and choice == "required" else 1
    schema = {"type": "array", "items": item, "minItems": 1, "maxItems": most}
    return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True), True, "tool_choice")


def tools_text(tools: Sequence[Tool]) -> str:
    """The tools and how to call them, for a system prompt."""
    listing = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": json.loads(t.parameters)} for t in tools],
        ensure_ascii=False,
    )
    return (
        f"You can call these functions: {listing}\n"
        'To call functions, answer with only a JSON list: [{"name": "<function>", "arguments": {...}}]'
    )


def calls_text(calls: Sequence[ToolCall]) -> str:
    return json.dumps([{"name": c.name, "arguments": _arguments(c.arguments)} for c in calls], ensure_ascii=False)


def plain_chat(chat: Chat) -> Chat:
    """``chat`` for a template that knows no tools: the tools in the system prompt, each call an
    assistant turn in the plain form, each result a user turn that names its call."""
    names = {c.id: c.name for m in chat.messages for c in m.tool_calls}
    messages: list[Message] = []
    if chat.tools:
        system = [m for m in chat.messages if m.role == "system"]
        text = tools_text(chat.tools)
        if system:  # the tools join the first system message
            first = system[0]
            text = f"{first.text}\n\n{text}" if first.text else text
        messages.append(Message.of("system", text))
    for message in chat.messages:
        if message.role == "system" and chat.tools and message is next(m for m in chat.messages if m.role == "system"):
            continue
        if message.tool_calls:
            text = (message.text + "\n" if message.text else "") + calls_text(message.tool_calls)
            messages.append(Message.of("assistant", text))
        elif message.role == "tool":
            name = names.get(message.tool_call_id or "", "")
            label = f"Result of {name}" if name else "Tool result"
            messages.append(Message("user", (TextPart(f"{label} ({message.tool_call_id}): "), *message.content)))
        else:
            messages.append(message)
    return Chat(tuple(_merge_turns(messages)))


def _merge_turns(messages: list[Message]) -> list[Message]:
    """Consecutive user turns (several tool results) as one: templates alternate roles."""
    merged: list[Message] = []
    for message in messages:
        if merged and message.role == "user" and merged[-1].role == "user":
            merged[-1] = Message("user", (*merged[-1].content, TextPart("\n"), *message.content))
        else:
            merged.append(message)
    return merged


def parse_tool_calls(text: str, tools: Sequence[Tool]) -> tuple[str, tuple[ToolCall, ...]] | None:
    """``(content before the calls, calls)`` when ``text`` calls offered tools, else None.

    A call must name an offered tool and carry a JSON object as arguments; an answer that looks
    like a call but is not one stays text."""
    names = {t.name for t in tools}
    stripped = text.strip()
    found: list[Any] = []
    content = ""
    if _MISTRAL in stripped:
        content, _, rest = stripped.partition(_MISTRAL)
        found = _json_calls(rest)
    elif _HERMES.search(stripped):
        content = stripped[: _HERMES.search(stripped).start()]  # type: ignore[union-attr]
        found = [_loads(m) for m in _HERMES.findall(stripped)]
    elif stripped.startswith(("[", "{")):
        found = _json_calls(stripped)
    calls = []
    for item in found:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _loads(arguments)
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False)))
    return (content.strip(), tuple(calls)) if calls else None


def _json_calls(text: str) -> list[Any]:
    value = _loads(text.strip())
    if isinstance(value, dict):
        return [value]
    return value if isinstance(value, list) else []


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _arguments(text: str) -> Any:
    value = _loads(text)
    return value if value is not None else text


def might_be_calls(prefix: str) -> bool:
    """Whether an answer starting with ``prefix`` may turn out to be tool calls (a stream then
    holds its text back until the end)."""
    head = prefix.lstrip()
    if not head:
        return True
    return any(head.startswith(p) or p.startswith(head) for p in ("[", "{", "<tool_call>", _MISTRAL))
