"""The chat request's fields that shape the answer beyond the basic sampling ones: structured
outputs (OpenAI's ``response_format``, vLLM's ``structured_outputs`` and older ``guided_*``
fields), log probabilities, penalties, ``logit_bias``, ``min_tokens``; and the fields vlmlab
knows but does not honour, which are refused by name rather than dropped (STYLE habit 7).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from vlmlab.protocol.core import StructuredOutput
from vlmlab.protocol.errors import BadRequestError


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class JSONSchemaFormat(_Wire):
    """``response_format.json_schema``: OpenAI's structured-outputs object."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsOptions(_Wire):
    """vLLM's ``structured_outputs`` request field (one of its members)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None


def structured_output(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputsOptions | None,
    guided: Mapping[str, Any],
) -> StructuredOutput | None:
    """The one constraint a request asks for, from whichever field carries it.

    Raises:
        BadRequestError: more than one constraint, or an incomplete one (``param`` names it).
    """
    found: list[StructuredOutput] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(StructuredOutput("json_object", param="response_format"))
        else:
            spec = response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise BadRequestError(
                    "response_format type 'json_schema' needs json_schema.schema (a JSON schema object)",
                    param="response_format",
                )
            found.append(StructuredOutput("json_schema", _json_text(spec.schema_), bool(spec.strict), "response_format"))
    if structured_outputs is not None:
        members = {
            "json": structured_outputs.json_, "regex": structured_outputs.regex,
            "choice": structured_outputs.choice, "grammar": structured_outputs.grammar,
            "json_object": structured_outputs.json_object or None,
        }  # fmt: skip
        for unknown in sorted(structured_outputs.model_extra or {}):  # structural_tag, whitespace_pattern, ...
            raise BadRequestError(f"structured_outputs.{unknown} is not supported", param=f"structured_outputs.{unknown}")
        found += [_constraint(name, value, "structured_outputs") for name, value in members.items() if value is not None]
    for field_name, value in guided.items():
        if value is not None:
            found.append(_constraint(field_name.removeprefix("guided_"), value, field_name))
    if len(found) > 1:
        raise BadRequestError(
            "ask for one output constraint at a time, got " + ", ".join(f"{c.param} ({c.kind})" for c in found),
            param=found[1].param,
        )
    return found[0] if found else None


def _constraint(name: str, value: Any, param: str) -> StructuredOutput:
    if name == "json":  # strict, as vLLM's xgrammar backend compiles it
        return StructuredOutput("json_schema", value if isinstance(value, str) else _json_text(value), True, param)
    if name == "json_object":
        return StructuredOutput("json_object", param=param)
    if name == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise BadRequestError(f"{param} must be a non-empty list of non-empty strings", param=param)
        return StructuredOutput("choice", json.dumps(value), False, param)
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"{param} must be a non-empty string", param=param)
    return StructuredOutput("regex" if name == "regex" else "grammar", value, False, param)


def _json_text(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def logit_bias_items(logit_bias: Mapping[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted ``(id, bias)`` pairs; a key that is not a
    token id is a 400 naming it."""
    items = []
    for key, bias in (logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequestError(f"logit_bias keys are token ids, got {key!r}", param="logit_bias") from None
        if token < 0:
            raise BadRequestError(f"logit_bias keys are token ids (>= 0), got {key!r}", param="logit_bias")
        items.append((token, float(bias)))
    return tuple(sorted(items))


# Fields of OpenAI's chat request, or vLLM's extras, that would change the answer and that
# vlmlab does not honour: a request that sets one to anything but its harmless value is a 400
# naming it. (Fields that change nothing about the answer, such as ``store``, ``metadata``,
# ``service_tier`` or ``user``, are accepted; unknown vendor fields are logged as ignored.)
def _unset(value: Any) -> bool:
    return value is None or value == [] or value == {}


REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_unset, "the legacy functions field is not supported; send tools"),
    "function_call": (lambda v: v in (None, "none", "auto"), "the legacy function_call field is not supported; send tool_choice"),
    "audio": (_unset, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is supported: modalities ['text']"),
    "prediction": (_unset, "predicted outputs are not supported"),
    "web_search_options": (_unset, "web search is not supported"),
    "reasoning_effort": (_unset, "reasoning_effort is not supported by these models"),
    "verbosity": (_unset, "verbosity is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported; send n requests"),
    "use_beam_search": (lambda v: v in (None, False), "beam search is not supported"),
    "length_penalty": (lambda v: v in (None, 1, 1.0), "length_penalty (beam search) is not supported"),
    "stop_token_ids": (_unset, "stop_token_ids is not supported; use stop strings"),
    "bad_words": (_unset, "bad_words is not supported; use logit_bias with -100"),
    "allowed_token_ids": (_unset, "allowed_token_ids is not supported; use logit_bias or structured outputs"),
    "prompt_logprobs": (_unset, "prompt_logprobs is not supported"),
    "echo": (lambda v: v in (None, False), "echo is not supported"),
    "include_stop_str_in_output": (lambda v: v in (None, False), "include_stop_str_in_output is not supported"),
    "skip_special_tokens": (lambda v: v in (None, True), "special tokens are always skipped"),
    "add_generation_prompt": (lambda v: v in (None, True), "the generation prompt is always added"),
    "continue_final_message": (lambda v: v in (None, False), "continue_final_message is not supported"),
    "chat_template": (_unset, "the checkpoint's own chat template is always used"),
    "chat_template_kwargs": (_unset, "chat_template_kwargs is not supported"),
    "truncate_prompt_tokens": (_unset, "prompts are never truncated; shorten the prompt"),
    "return_tokens_as_token_ids": (lambda v: v in (None, False), "return_tokens_as_token_ids is not supported"),
    "guided_decoding_backend": (lambda v: v in (None, "auto", "xgrammar"), "the structured-output backend is xgrammar"),
    "guided_whitespace_pattern": (_unset, "guided_whitespace_pattern is not supported"),
    "structured_outputs.structural_tag": (_unset, "structural tags are not supported"),
}


def refuse_unhonoured(extra: Mapping[str, Any]) -> None:
    """Raises BadRequestError for the first field of ``extra`` (the request's fields beyond the
    model's) that :data:`REFUSED` lists with a value that would change the answer."""
    for name in sorted(extra):
        rule = REFUSED.get(name)
        if rule is not None and not rule[0](extra[name]):
            raise BadRequestError(f"{name}: {rule[1]}", param=name)
