"""Answers as enforced JSON: ``vlmlab eval --response-format json``.

With ``json``, every sample asks for ``{"answer": ...}`` under a JSON Schema derived from its
dataset's answer type, which the engine enforces token by token (structured outputs, sent as
OpenAI's ``response_format``). The stored ``prediction`` is then the JSON's ``answer`` field, the
model's own text is kept as ``raw_prediction``, and scoring reads the answer directly instead of
extracting it from free text. A reply that is not such a JSON object (cut at ``max_tokens``) is
*unparsed*, never guessed.

Schemas (:func:`answer_schema`):

- multiple choice (``mcq`` rows with options, MMBench, MMMU and MathVista multiple-choice rows):
  ``{"answer": {"enum": <the option letters>}}``;
- HallusionBench: ``{"answer": {"enum": ["Yes", "No"]}}``;
- everything else (numbers, words, phrases, lists: ChartQA, DocVQA, TextVQA, synth, ...):
  ``{"answer": {"type": "string", "maxLength": 64}}``;
- or a schema of the user's (``--answer-schema [DATASET=]FILE``) with an ``answer`` property.

The prompt gets one line asking for that JSON (:func:`prompt_suffix`); with ``text`` (the
default) prompts, budgets and records are exactly those of a run without the option.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vlmlab.eval.types import DatasetSpec, EvalSample
from vlmlab.protocol.core import StructuredOutput
from vlmlab.protocol.errors import ConfigError

RESPONSE_FORMATS = ("text", "json")
ANSWER_MAX_CHARS = 64  # a short answer; longer ones are cut by the grammar, not by max_tokens
# Tokens added to a dataset's budget for the JSON around the answer (`{"answer":"` + `"}`: 13
# characters, so at most 13 tokens even for a character-level tokenizer, plus escapes).
JSON_OVERHEAD_TOKENS = 16
# OpenAI's field: the one OpenAI, Mistral, vLLM and vlmlab servers all take, so the remote
# engine forwards the schema to any of them (vlmlab.engines.remote.wire.structured_fields).
PARAM = "response_format"
ANY_DATASET = "*"


def yes_no(spec: DatasetSpec) -> bool:
    return spec.metric == "hallusion"


def option_letters(spec: DatasetSpec, sample: EvalSample) -> list[str] | None:
    """The letters a multiple-choice sample is answered with, or None for a free answer.

    Options come from ``fields["options"]`` (letter -> text: MMBench, RealWorldQA) or
    ``fields["choices"]`` (texts for A, B, ...: MMMU, MathVista); free-form rows of those
    datasets (RealWorldQA without options, MMMU ``open``, MathVista ``free_form``) get None.
    """
    fields = sample.fields
    options, choices = fields.get("options") or {}, fields.get("choices") or []
    if spec.metric in ("mcq", "mmbench_circular") and (options or choices):
        return list(options) if options else [chr(ord("A") + i) for i in range(len(choices))]
    if spec.metric == "mmmu" and fields.get("question_type") != "open" and choices:
        return [chr(ord("A") + i) for i in range(len(choices))]
    if spec.metric == "mathvista" and fields.get("question_type") == "multi_choice" and choices:
        return [chr(ord("A") + i) for i in range(len(choices))]
    return None


def answer_schema(spec: DatasetSpec, sample: EvalSample) -> dict[str, Any]:
    """The JSON Schema of one sample's answer (see the module docstring)."""
    values = ["Yes", "No"] if yes_no(spec) else option_letters(spec, sample)
    answer: dict[str, Any] = {"type": "string", "enum": values} if values else {"type": "string", "maxLength": ANSWER_MAX_CHARS}
    return {"type": "object", "properties": {"answer": answer}, "required": ["answer"], "additionalProperties": False}


def prompt_suffix(schema: Mapping[str, Any], custom: bool = False) -> str:
    """The line appended to the prompt asking for the JSON answer."""
    if custom:
        return f"\nAnswer in JSON matching this schema: {json.dumps(schema, separators=(', ', ': '))}"
    values = schema["properties"]["answer"].get("enum")
    if values:
        listed = ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]
        return f'\nAnswer in JSON: {{"answer": "<{listed}>"}}'
    return '\nAnswer in JSON: {"answer": "<a single word, number or phrase>"}'


def with_suffix(pieces: Sequence[str | int], suffix: str) -> list[str | int]:
    """A prompt's pieces with ``suffix`` at the end of its last text (after a trailing image,
    as its own text piece)."""
    out = list(pieces)
    if out and isinstance(out[-1], str):
        out[-1] = out[-1] + suffix
    else:
        out.append(suffix.lstrip("\n"))
    return out


def structured(schema: Mapping[str, Any]) -> StructuredOutput:
    """The engine-side constraint for ``schema`` (strict: no properties beyond it)."""
    return StructuredOutput("json_schema", json.dumps(schema), strict=True, param=PARAM)


def parse_answer(text: str) -> str | None:
    """The ``answer`` field of a JSON reply, as text; None when the reply is not a JSON object
    with an ``answer`` (e.g. cut at max_tokens). Non-string answers are kept as their JSON text."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(data, dict) or "answer" not in data:
        return None
    value = data["answer"]
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def check_custom_schema(schema: Mapping[str, Any], where: str) -> None:
    """A user's answer schema must describe an object with an ``answer`` property: that field
    is what gets scored.

    Raises:
        ConfigError: naming ``where`` (the flag and file) and the fix.
    """
    properties = schema.get("properties")
    if schema.get("type", "object") != "object" or not isinstance(properties, Mapping) or "answer" not in properties:
        raise ConfigError(
            f'{where}: the schema must describe a JSON object with an "answer" property (that field is '
            'what gets scored), e.g. {"type": "object", "properties": {"answer": {"type": "string"}}, '
            '"required": ["answer"]}'
        )


def read_answer_schemas(values: Sequence[str]) -> dict[str, str]:
    """``--answer-schema`` values (``FILE`` for every dataset, or ``DATASET=FILE``) -> dataset key
    (or ``"*"``) -> the schema as JSON text.

    Raises:
        ConfigError: an unreadable / invalid file, a schema without ``answer``, a key given twice.
        NotFoundError: an unknown dataset name (the message lists the valid ones).
    """
    from vlmlab.config import read_json_schema
    from vlmlab.eval.datasets import get_dataset

    schemas: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        key = get_dataset(name.strip()).key if sep and name.strip() else ANY_DATASET
        path = path if sep else value
        where = f"--answer-schema {value}"
        schema = read_json_schema(path.strip(), "--answer-schema")
        check_custom_schema(schema, where)
        if key in schemas:
            raise ConfigError(f"{where}: a schema for {'every dataset' if key == ANY_DATASET else key} is already given")
        schemas[key] = json.dumps(schema)
    return schemas


def max_tokens(spec: DatasetSpec, profile: str, response_format: str, override: int | None, custom: bool = False) -> int:
    """The generation budget: ``--max-tokens`` as given, else the dataset's budget for the profile.

    With ``json`` and a derived schema the schema bounds the reply instead: every token of a
    JSON string adds at least one character, so ``ANSWER_MAX_CHARS`` + the JSON around it always
    lets the grammar close the longest answer it allows (and the grammar ends the reply as soon
    as the JSON is complete). A custom schema gets the dataset's budget + the JSON around it.
    """
    if override:
        return override
    if response_format != "json":
        return spec.max_tokens_for(profile)
    return (spec.max_tokens_for(profile) if custom else ANSWER_MAX_CHARS) + JSON_OVERHEAD_TOKENS
