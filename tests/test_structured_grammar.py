"""Structured outputs on the hf engine (engines/hf/structured.py): real xgrammar grammars over
nano's real tokenizer, driven token by token as the engine drives them."""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("xgrammar")
transformers = pytest.importorskip("transformers")

from vlmlab.engines.hf.structured import Grammars, TokenConstraint, choice_grammar, mask_rows
from vlmlab.nano import checkpoint_path
from vlmlab.protocol.core import StructuredOutput
from vlmlab.protocol.errors import BadRequestError, ConfigError

EOS = 2  # nano's </s> (checkpoint config.json, text_config.eos_token_id)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["name", "count", "tags", "ok", "note"],
    "additionalProperties": False,
}
ANSWER = {"name": "a b", "count": 42, "tags": ["red", "blue"], "ok": True, "note": "x"}
CHOICES = ["red", "green", "blue", 'say "hi"\\n', "tab\tand\nnewline", "émoji 😀", "réd"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoProcessor.from_pretrained(checkpoint_path()).tokenizer


@pytest.fixture(scope="module")
def vocab_size() -> int:
    config = json.loads((checkpoint_path() / "config.json").read_text())
    return config["text_config"]["vocab_size"]


@pytest.fixture(scope="module")
def grammars(tokenizer, vocab_size) -> Grammars:
    return Grammars(tokenizer, vocab_size)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def feed(constraint: TokenConstraint, tokens: list[int]) -> list[bool]:
    return [constraint.accept(t) for t in tokens]


def allowed_after_mask(constraint: TokenConstraint, width: int, dtype=torch.float32) -> set[int]:
    logits = torch.zeros(width, dtype=dtype)
    constraint.mask(logits)
    return {i for i in range(width) if torch.isfinite(logits[i])}


# --- each kind accepts a valid answer, ends it, and rejects what does not fit -------------------


def test_json_schema_accepts_a_valid_answer_and_is_done(tokenizer, grammars):
    compiled = grammars.compile(StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True))
    constraint = grammars.constraint(compiled)
    tokens = ids(tokenizer, compact(ANSWER))
    assert feed(constraint, tokens[:-1]) == [True] * (len(tokens) - 1)
    assert not constraint.done and not constraint.allows_eos
    assert constraint.accept(tokens[-1])
    assert constraint.done and constraint.allows_eos
    assert allowed_after_mask(constraint, 448) == {EOS}  # only the end is left
    assert constraint.accept(EOS) and constraint.done
    assert not constraint.accept(ids(tokenizer, "x")[0])  # nothing after the end
    assert allowed_after_mask(constraint, 448) == {EOS}


def test_json_schema_rejects_what_the_schema_forbids(tokenizer, grammars):
    compiled = grammars.compile(StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True))
    for bad in [
        '{"nmae',
        '{"name":"a","count":1000',
        '{"name":"a","count":4,"tags":[]',
        '{ "name"',
    ]:
        constraint = grammars.constraint(compiled)
        results = feed(constraint, ids(tokenizer, bad))
        assert not all(results), bad
    # a rejected token leaves the state as it was: the valid answer still goes through after it
    constraint = grammars.constraint(compiled)
    prefix, rest = '{"name":"a b","count":4', ',"tags":["red"],"ok":false,"note":""}'
    assert all(feed(constraint, ids(tokenizer, prefix)))
    assert not constraint.accept(ids(tokenizer, "x")[0])
    assert all(feed(constraint, ids(tokenizer, rest))) and constraint.done


def test_json_schema_strict_decides_extra_properties(tokenizer, grammars):
    schema = json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    )
    text = ids(tokenizer, '{"a":1,"b":2}')
    strict = grammars.constraint(
        grammars.compile(StructuredOutput("json_schema", schema, strict=True))
    )
    loose = grammars.constraint(
        grammars.compile(StructuredOutput("json_schema", schema, strict=False))
    )
    assert not all(feed(strict, text))
    assert all(feed(loose, text)) and loose.done


def test_json_object_is_any_object_but_only_an_object(tokenizer, grammars):
    compiled = grammars.compile(StructuredOutput("json_object"))
    constraint = grammars.constraint(compiled)
    assert all(feed(constraint, ids(tokenizer, '{"a":[1,2.5,{"b":null}],"c":"d"}')))
    assert constraint.done
    for not_object in ["[1]", '"a"', "1", "null", '{"a": 1}']:  # compact: no free whitespace
        assert not all(feed(grammars.constraint(compiled), ids(tokenizer, not_object))), not_object


def test_regex_accepts_matches_and_knows_when_more_may_follow(tokenizer, grammars):
    compiled = grammars.compile(
        StructuredOutput("regex", r"\d{3}-[a-z]+", param="structured_outputs")
    )
    constraint = grammars.constraint(compiled)
    assert all(feed(constraint, ids(tokenizer, "123-abc")))
    assert constraint.allows_eos and not constraint.done  # more letters may follow
    assert EOS in allowed_after_mask(constraint, 448)
    assert not all(feed(grammars.constraint(compiled), ids(tokenizer, "12a")))
    closed = grammars.constraint(grammars.compile(StructuredOutput("regex", "(yes|no)!")))
    assert all(feed(closed, ids(tokenizer, "no!"))) and closed.done


def test_choice_accepts_each_literal_exactly(tokenizer, grammars):
    compiled = grammars.compile(StructuredOutput("choice", json.dumps(CHOICES)))
    for choice in CHOICES:
        constraint = grammars.constraint(compiled)
        assert all(feed(constraint, ids(tokenizer, choice))), choice
        assert constraint.done, choice
    partial = grammars.constraint(compiled)
    assert all(feed(partial, ids(tokenizer, "gre"))) and not partial.allows_eos
    assert not partial.accept(ids(tokenizer, "x")[0])
    for other in ["Red", "redd", 'say "hi"\n', "purple"]:
        assert not all(feed(grammars.constraint(compiled), ids(tokenizer, other))), other


def test_choice_grammar_escapes_literals():
    assert choice_grammar(['a"b', "c\\d", "e\nf"]) == r'root ::= "a\"b" | "c\\d" | "e\nf"'


def test_grammar_kind_takes_ebnf(tokenizer, grammars):
    ebnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9]+'
    compiled = grammars.compile(StructuredOutput("grammar", ebnf))
    constraint = grammars.constraint(compiled)
    assert all(feed(constraint, ids(tokenizer, "(1+23+456)"))) and constraint.done
    assert not all(feed(grammars.constraint(compiled), ids(tokenizer, "(1+)")))


# --- the mask ----------------------------------------------------------------------------------


def test_mask_leaves_exactly_the_accepted_tokens(tokenizer, grammars, vocab_size):
    """At every step of a valid answer, the finite entries are the tokens accept() takes."""
    compiled = grammars.compile(StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True))
    answer = ids(
        tokenizer, compact({"name": "é", "count": 7, "tags": ["blue"], "ok": False, "note": ""})
    )
    for step in range(len(answer) + 1):
        constraint = grammars.constraint(compiled)
        assert all(feed(constraint, answer[:step]))
        masked = allowed_after_mask(constraint, vocab_size)
        assert masked == allowed_after_mask(constraint, vocab_size, torch.float64)  # torch path
        accepted = set()
        for token in range(vocab_size):
            probe = grammars.constraint(compiled)
            feed(probe, answer[:step])
            if probe.accept(token):
                accepted.add(token)
        assert masked == accepted, step
        assert step == len(answer) or answer[step] in masked


def test_mask_never_allows_special_tokens_inside_strings(tokenizer, grammars):
    constraint = grammars.constraint(grammars.compile(StructuredOutput("json_object")))
    assert all(feed(constraint, ids(tokenizer, '{"a":"')))
    allowed = allowed_after_mask(constraint, 448)
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    assert allowed and not allowed & special


def test_mask_covers_logits_wider_than_the_vocabulary(tokenizer, vocab_size):
    wide = Grammars(tokenizer, vocab_size + 40, stop_token_ids=[EOS])  # a padded lm_head
    constraint = wide.constraint(wide.compile(StructuredOutput("regex", "[a-z]+")))
    allowed = allowed_after_mask(constraint, vocab_size + 64)  # and logits wider still
    assert allowed and max(allowed) < vocab_size
    assert all(constraint.accept(t) for t in ids(tokenizer, "abc"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_rows_equals_masking_row_by_row(tokenizer, grammars, vocab_size, dtype):
    """The batched mask: unconstrained rows untouched, every state (fresh, midway, complete,
    terminated), logits wider than the vocabulary."""
    json_schema = grammars.compile(StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True))
    regex = grammars.compile(StructuredOutput("regex", r"\d+"))
    states = [
        (json_schema, '{"name":"a'),
        (regex, ""),
        (regex, "12"),
        (json_schema, compact(ANSWER)),
    ]
    constraints: list[TokenConstraint | None] = []
    for compiled, prefix in states:
        constraint = grammars.constraint(compiled)
        assert all(feed(constraint, ids(tokenizer, prefix)))
        constraints += [constraint, None]
    constraints.append(grammars.constraint(json_schema))
    assert constraints[6].accept(EOS)  # terminated
    logits = torch.randn(
        len(constraints), vocab_size + 16, generator=torch.Generator().manual_seed(3), dtype=dtype
    )
    expected = logits.clone()
    for row, constraint in enumerate(constraints):
        if constraint is not None:
            constraint.mask(expected[row])
    mask_rows(logits, constraints)
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[1]).all()  # a row without a constraint
    mask_rows(logits, [None] * len(constraints))  # nothing to do
    assert torch.equal(logits, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masks_on_cuda_equal_masks_on_cpu(tokenizer, grammars, vocab_size):
    compiled = grammars.compile(StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True))
    constraints = [grammars.constraint(compiled), None, grammars.constraint(compiled)]
    assert all(feed(constraints[2], ids(tokenizer, '{"name":"a","count":1')))
    generator = torch.Generator().manual_seed(4)
    for _ in range(20):
        logits = torch.randn(3, vocab_size + 8, generator=generator)
        expected = logits.clone()
        mask_rows(expected, constraints)
        for dtype in (torch.float32, torch.bfloat16):
            batched = logits.to("cuda", dtype)
            mask_rows(batched, constraints)
            single = logits[0].to("cuda", dtype)
            constraints[0].mask(single)
            assert torch.equal(torch.isfinite(batched.cpu()), torch.isfinite(expected))
            assert torch.equal(torch.isfinite(single.cpu()), torch.isfinite(expected[0]))
        for constraint, row in zip(constraints, expected):
            if constraint is not None and not constraint.done:
                assert constraint.accept(int(row.argmax()))


def test_random_walks_end_in_answers_the_schema_validates(tokenizer, grammars, vocab_size):
    """Argmax of masked random logits, step after step, always yields valid JSON for the schema
    (float32 and float64 rows: xgrammar's CPU kernel and the torch path)."""
    # in the lock through mistral-common, on Python >= 3.11 only
    jsonschema = pytest.importorskip("jsonschema")

    compiled = grammars.compile(StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True))
    generator = torch.Generator().manual_seed(0)
    for walk in range(40):
        constraint = grammars.constraint(compiled)
        tokens: list[int] = []
        dtype = torch.float32 if walk % 2 else torch.float64
        for _ in range(400):
            logits = torch.randn(vocab_size, generator=generator, dtype=dtype)
            constraint.mask(logits)
            token = int(logits.argmax())
            assert constraint.accept(token), (walk, tokens, token)
            if token == EOS:
                break
            tokens.append(token)
            if constraint.done:
                break
        assert constraint.done, tokenizer.decode(tokens)
        answer = json.loads(tokenizer.decode(tokens))  # strict JSON: no raw control characters
        jsonschema.validate(answer, SCHEMA)


def test_random_walks_on_choices_and_regex_end_in_a_match(tokenizer, grammars, vocab_size):
    import re

    cases = [
        (StructuredOutput("choice", json.dumps(CHOICES)), lambda text: text in CHOICES),
        (
            StructuredOutput("regex", r"[A-C]{2}-\d{1,4}"),
            lambda text: re.fullmatch(r"[A-C]{2}-\d{1,4}", text),
        ),
    ]
    generator = torch.Generator().manual_seed(1)
    for structured, matches in cases:
        compiled = grammars.compile(structured)
        for _ in range(20):
            constraint = grammars.constraint(compiled)
            tokens: list[int] = []
            while not constraint.done:
                logits = torch.randn(vocab_size, generator=generator)
                constraint.mask(logits)
                token = int(logits.argmax())
                assert constraint.accept(token)
                if token == EOS:
                    break
                tokens.append(token)
            assert matches(tokenizer.decode(tokens)), tokenizer.decode(tokens)


# --- errors, cache, threads, missing library ---------------------------------------------------


@pytest.mark.parametrize(
    ("structured", "words"),
    [
        (
            StructuredOutput("json_schema", '{"type": "objec"}'),
            ["response_format.json_schema.schema cannot be compiled", "objec"],
        ),
        (
            StructuredOutput("json_schema", "{not json"),
            ["response_format.json_schema.schema is not valid JSON"],
        ),
        (StructuredOutput("json_schema", "[1, 2]"), ["must be a JSON object"]),
        (StructuredOutput("json_schema", '{"properties": {"a": {"$ref": "#/nope"}}}'), ["nope"]),
        (
            StructuredOutput("regex", "a(b", param="structured_outputs"),
            ["structured_outputs", "regex 'a(b' cannot be compiled", "parenthesis"],
        ),
        (
            StructuredOutput("grammar", "root ::= foo", param="guided_grammar"),
            ["guided_grammar: grammar cannot be compiled", '"foo" is not defined', "root ::="],
        ),
        (StructuredOutput("choice", "[]", param="guided_choice"), ["non-empty list of strings"]),
        (
            StructuredOutput("choice", '["a", 1]', param="guided_choice"),
            ["non-empty list of strings"],
        ),
        (
            StructuredOutput("choice", "red", param="guided_choice"),
            ["non-empty list of strings", "'red'"],
        ),
        (StructuredOutput("xml", "<a/>"), ["unknown structured output kind 'xml'", "json_schema"]),  # type: ignore[arg-type]
    ],
)
def test_bad_specs_are_400s_naming_the_field(grammars, structured, words):
    with pytest.raises(BadRequestError) as caught:
        grammars.compile(structured)
    error = caught.value
    assert error.param == structured.param and error.status_code == 400
    for word in words:
        assert word in error.message, error.message
    assert "/project/cpp" not in error.message and "\n" not in error.message


def test_cache_returns_the_same_compiled_grammar(tokenizer, vocab_size):
    grammars = Grammars(tokenizer, vocab_size, cache_entries=2)
    schema = json.dumps(SCHEMA)
    first = grammars.compile(StructuredOutput("json_schema", schema, strict=True))
    assert (
        grammars.compile(StructuredOutput("json_schema", schema, strict=True, param="guided_json"))
        is first
    )
    assert grammars.compile(StructuredOutput("json_schema", schema, strict=False)) is not first
    assert grammars.compile(StructuredOutput("json_object")) is grammars.compile(
        StructuredOutput("json_object")
    )
    # the cache holds two: the schema was dropped least recently used
    assert grammars.compile(StructuredOutput("json_schema", schema, strict=True)) is not first


def test_compile_from_eight_threads_at_once(tokenizer, vocab_size):
    grammars = Grammars(tokenizer, vocab_size)
    specs = [StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True)] * 4 + [
        StructuredOutput("regex", f"[a-z]{{{n}}}") for n in range(1, 5)
    ]
    start = threading.Barrier(len(specs))

    def compile_one(structured: StructuredOutput):
        start.wait()
        return grammars.compile(structured)

    with ThreadPoolExecutor(len(specs)) as pool:
        compiled = list(pool.map(compile_one, specs))
    assert len({id(c) for c in compiled[:4]}) == 1  # one shared grammar for the same schema
    for structured, grammar in zip(specs[4:], compiled[4:]):
        constraint = grammars.constraint(grammar)
        length = int(structured.spec[len("[a-z]{") : -1])
        assert (
            all(feed(constraint, [tokenizer.convert_tokens_to_ids("a")] * length))
            and constraint.done
        )


def test_missing_xgrammar_is_a_config_error_with_the_fix(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'xgrammar>=0.2.9'.*vlmlab\[hf\]"):
        Grammars(tokenizer, 448)
