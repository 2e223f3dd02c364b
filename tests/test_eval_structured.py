"""Structured answers outside the server: ``vlmlab chat --json-schema`` and ``vlmlab eval
--response-format json``, run for real on nano (answers enforced by xgrammar in the hf engine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from vlmlab.eval.answer_format import parse_answer
from vlmlab.eval.datasets import get_dataset
from vlmlab.eval.runner import EvalConfig, rescore, run_eval
from vlmlab.eval.scoring import read_records, score_record
from vlmlab.protocol.errors import ConfigError

RED_SQUARE = Path(__file__).resolve().parents[1] / "src" / "vlmlab" / "nano" / "samples" / "red_square.png"
COLOUR = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}},
    "required": ["colour"],
    "additionalProperties": False,
}


def vlmlab(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as users run it (HF_HUB_OFFLINE=1 comes from conftest's environment)."""
    return subprocess.run([sys.executable, "-m", "vlmlab", *args], capture_output=True, text=True, timeout=300)


def test_chat_json_schema_prints_json_matching_the_schema(tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(COLOUR))
    out = vlmlab("chat", "--device", "cpu", "--image", str(RED_SQUARE), "--json-schema", str(schema), "What colour is the shape?")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    jsonschema.validate(answer, COLOUR)
    assert answer == {"colour": "red"}


def test_chat_bad_constraints_are_one_line_and_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "object",')
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    cases = [
        (["--json-schema", str(tmp_path / "missing.json")], f"--json-schema {tmp_path / 'missing.json'}: no such file"),
        (["--json-schema", str(broken)], f"--json-schema {broken}: not valid JSON"),
        (["--json-schema", str(listed)], "a JSON Schema is a JSON object, got a list"),
        (["--regex", "a+", "--choice", "a,b"], "give only one of --json-schema, --json, --regex, --choice"),
    ]
    for flags, message in cases:
        out = vlmlab("chat", "--device", "cpu", "--image", str(RED_SQUARE), *flags, "What colour is the shape?")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (flags, out.stderr)
        assert message in lines[0] and "Traceback" not in out.stderr, (flags, out.stderr)
        assert out.stdout == ""


def test_eval_json_on_synth_records_json_answers_and_keeps_formats_apart(tmp_path: Path) -> None:
    out = vlmlab("eval", "--model", "nano", "--dataset", "synth", "--limit", "12", "--output-dir", str(tmp_path),
                 "--device", "cpu", "--no-progress", "--response-format", "json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    path = tmp_path / "nano" / "synth.jsonl"
    records = read_records(path)
    assert len(records) == 12
    for record in records:
        assert record["response_format"] == "json" and 'Answer in JSON: {"answer": ' in record["prompt"]
        structured = record["generation"]["structured"]
        assert structured["kind"] == "json_schema" and structured["strict"]
        schema = json.loads(structured["spec"])
        assert schema["properties"]["answer"] == {"type": "string", "maxLength": 64}  # synth answers are free text
        if record["answer_parsed"]:  # the stored answer is the JSON's "answer", the model's text is kept
            reply = json.loads(record["raw_prediction"])
            jsonschema.validate(reply, schema)
            assert record["prediction"] == reply["answer"]
        else:
            assert record["prediction"] == "" and parse_answer(record["raw_prediction"]) is None
    summary = json.loads((tmp_path / "nano" / "synth.summary.json").read_text())
    assert summary["settings"]["response_format"] == "json" and summary["response_format"] == "json"
    assert summary["n"] == 12 and summary["errors"] == 0
    assert summary["json_unparsed"] == sum(not r["answer_parsed"] for r in records)

    # The option off: other keys, so nothing of the JSON run is reused, and the summary scores
    # only the answers given as text.
    (text,) = run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, limit=12, device="cpu", progress=False))
    assert text["run"]["answered_now"] == 12 and text["run"]["resumed_from"] == 0
    assert text["n"] == 12 and text["response_format"] == "text" and text["settings"]["response_format"] == "text"
    both = read_records(path)
    plain = [r for r in both if "response_format" not in r]
    assert len(both) == 24 and len(plain) == 12
    assert not {r["key"] for r in plain} & {r["key"] for r in records}
    assert all("raw_prediction" not in r and "Answer in JSON" not in r["prompt"] for r in plain)
    assert rescore(tmp_path)[0]["response_format"] == "text"  # re-scoring keeps to the run's format

    # The option on again: every JSON answer is reused.
    (again,) = run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, limit=12, device="cpu", progress=False, response_format="json"))
    assert again["run"]["answered_now"] == 0 and again["run"]["resumed_from"] == 12
    assert again["score"] == summary["score"] and again["response_format"] == "json"


def test_multiple_choice_datasets_get_an_enum_and_only_letters_are_stored(tmp_path: Path) -> None:
    from fixtures_eval import write_all

    fixtures = write_all(tmp_path / "data")
    out = tmp_path / "out"
    for key in ("mmbench_en_dev", "realworldqa", "hallusionbench"):
        (summary,) = run_eval(EvalConfig(models=("nano",), datasets=(key,), output_dir=out, data_dir=fixtures.paths[key], device="cpu", progress=False, response_format="json"))
        assert summary["errors"] == 0 and summary["json_unparsed"] == 0, summary
        assert summary["settings"]["response_format"] == "json"
    for record in read_records(out / "nano" / "mmbench_en_dev.jsonl"):
        letters = list(record["fields"]["options"])
        schema = json.loads(record["generation"]["structured"]["spec"])
        assert schema["properties"]["answer"]["enum"] == letters
        assert record["prediction"] in letters and json.loads(record["raw_prediction"]) == {"answer": record["prediction"]}
        assert f'"<{", ".join(letters[:-1])} or {letters[-1]}>"' in record["prompt"]
    kinds = {}
    for record in read_records(out / "nano" / "realworldqa.jsonl"):
        answer = json.loads(record["generation"]["structured"]["spec"])["properties"]["answer"]
        kinds[record["answers"][0]] = answer.get("enum") or answer["type"]
        if "enum" in answer:
            assert record["prediction"] in answer["enum"]
    assert kinds == {"A": ["A", "B", "C"], "B": ["A", "B"], "2": "string"}  # the free-text row is free
    assert {r["prediction"] for r in read_records(out / "nano" / "hallusionbench.jsonl")} <= {"Yes", "No"}
    # Scores come from the stored letters (rescoring reads them the same way).
    assert [s["score"] for s in rescore(out)] == [json.loads((out / "nano" / f"{k}.summary.json").read_text())["score"] for k in ("hallusionbench", "mmbench_en_dev", "realworldqa")]


def test_a_reply_that_is_no_json_is_unparsed_never_guessed() -> None:
    spec = get_dataset("mmbench_en_dev")
    record = {
        "key": "k", "sample_id": "1", "answers": ["A"], "prediction": "", "raw_prediction": '{"answer":"',
        "fields": {"options": {"A": "cat", "B": "dog"}, "choices": ["cat", "dog"], "index": 1},
        "response_format": "json", "answer_parsed": False, "error": None,
    }  # fmt: skip
    scored = score_record(spec, record, "official")
    assert scored.score == 0.0 and not scored.parsed and not scored.error
    assert score_record(spec, {**record, "prediction": "A", "answer_parsed": True}, "official").score == 1.0
    assert parse_answer('{"answer":"A"}') == "A" and parse_answer('{"answer": 12.5}') == "12.5"
    assert parse_answer('{"answer":"4') is None and parse_answer("[1]") is None and parse_answer('{"a": 1}') is None


def test_answer_schema_mistakes_fail_before_any_answer(tmp_path: Path) -> None:
    bad = json.dumps({"type": "object", "properties": {"answer": {"type": "string", "pattern": "(("}}})
    with pytest.raises(ConfigError, match=r"--answer-schema \(synth\): cannot be compiled"):
        run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, limit=4, device="cpu", progress=False, response_format="json", answer_schemas={"*": bad}))
    assert read_records(tmp_path / "nano" / "synth.jsonl") == []
    with pytest.raises(ConfigError, match="needs --response-format json"):
        run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, answer_schemas={"*": bad}))
    with pytest.raises(ConfigError, match='"answer" property'):
        run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, response_format="json", answer_schemas={"synth": '{"type": "object"}'}))
