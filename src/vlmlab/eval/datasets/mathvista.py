"""MathVista testmini (key ``mathvista_testmini``).

Hub: ``AI4Math/MathVista`` split ``testmini``, 1,000 rows: ``pid``, ``question``, ``image`` (a
file name), ``decoded_image`` (the image), ``choices`` (list or None), ``unit``, ``precision``,
``answer``, ``question_type`` (``multi_choice`` / ``free_form``), ``answer_type`` (``text``,
``integer``, ``float``, ``list``), ``metadata`` (``category``, ``task``, ``context``, ``grade``,
``skills``, ``source``, ``language``, ``split``, ...), ``query`` (question with the official
"Hint: ..." instruction already in it).

Prompts:
- ``default``: lmms-eval ``mathvista_testmini_format`` (``shot_type: format-prompt``):
  ``mathvista_evals.py::create_one_query`` joins with ``\\n`` the question (+ `` (Unit: u)``),
  the choices as ``A. c`` lines and a type-specific hint; 1,024 tokens.
- ``vlmevalkit``: the ``query`` as-is (VLMEvalKit ``MathVista_MINI`` sends the TSV question).
- ``mistral``: ``eval/tasks/mathvista.py`` -- ``query + "\\n" + PROMPT``; 2,048 tokens. Its gold
  for multiple choice is the option letter (``fields["answer_letter"]``).
Metric: answer extraction + the official normaliser (choice text / int / float at ``precision``).
"""

from __future__ import annotations

from typing import Any

from vlmlab.eval.datasets.base import Benchmark, Row, as_list, as_rgb, letters, text
from vlmlab.eval.datasets.prompts import MISTRAL_COT_TOKENS, MISTRAL_MC_COT, image_then, profiles
from vlmlab.eval.types import EvalSample

# mathvista_evals.py create_one_query, shot_type "format-prompt"
MC_HINT = "Answer with the option's letter from the given choices directly."
INTEGER_HINT = "Answer the question using a single integer number."
FLOAT_HINTS = {
    1: "Answer the question using a single floating-point number with one decimal place.",
    2: "Answer the question using a single floating-point number with two decimal places.",
}
LIST_HINT = "Answer the question using a Python list."
_NUMBER_WORDS = {3: "three", 4: "four", 5: "five"}


def format_hint(question_type: str, answer_type: str, precision: Any) -> str:
    """The format-prompt hint. lmms-eval only words precision 1 and 2 (other precisions leave
    its ``hint_text`` unset and raise); here they get the same sentence with the digit count."""
    if question_type == "multi_choice":
        return MC_HINT
    if answer_type == "integer":
        return INTEGER_HINT
    if answer_type == "float":
        digits = int(float(precision)) if precision is not None else 2
        if digits in FLOAT_HINTS:
            return FLOAT_HINTS[digits]
        word = _NUMBER_WORDS.get(digits, str(digits))
        return (
            f"Answer the question using a single floating-point number with {word} decimal places."
        )
    if answer_type == "list":
        return LIST_HINT
    return ""


def _format_prompt(sample: EvalSample) -> str:
    f = sample.fields
    question = sample.question + (f" (Unit: {f['unit']})" if f["unit"] else "")
    choices = "\n".join(f"{k}. {c}" for k, c in zip(letters(len(f["choices"])), f["choices"]))
    hint = format_hint(f["question_type"], f["answer_type"], f["precision"])
    return "\n".join(e for e in (question, choices, hint) if e != "").strip()


def from_row(row: Row, index: int) -> EvalSample:
    pid = str(row.get("pid", index))
    choices = [str(c) for c in as_list(row.get("choices"))]
    answer = text(row["answer"])
    metadata = row.get("metadata") or {}
    fields: dict[str, Any] = {
        "question_type": text(row["question_type"]),
        "answer_type": text(row["answer_type"]),
        "precision": row.get("precision"),
        "unit": text(row.get("unit")),
        "choices": choices,
        "query": text(row.get("query")),
        "metadata": dict(metadata),
        "category": text(metadata.get("category")) if isinstance(metadata, dict) else "",
    }
    if choices and answer in choices:
        fields["answer_letter"] = letters(len(choices))[choices.index(answer)]
    return EvalSample(
        id=pid,
        images=[as_rgb(row["decoded_image"], f"mathvista {pid} decoded_image")],
        question=text(row["question"]),
        answers=[answer],
        fields=fields,
    )


SPEC = Benchmark(
    key="mathvista_testmini",
    hf_id="AI4Math/MathVista",
    split="testmini",
    expected_rows=1000,
    metric="mathvista",  # dataset-specific scorer: vlmlab.eval.metrics.mathvista_correct
    default_mode="official",
    # lmms-eval mathvista_testmini_format.yaml max_new_tokens (later versions raised it to 16384)
    max_tokens=1024,
    from_row=from_row,
    image_columns=("decoded_image",),
    prompts=profiles(
        default=image_then(_format_prompt),
        vlmevalkit=image_then(lambda s: s.fields["query"]),
        mistral=image_then(lambda s: f"{s.fields['query']}\n{MISTRAL_MC_COT}"),
    ),
    profile_max_tokens={"mistral": MISTRAL_COT_TOKENS},
    source=(
        "AI4Math/MathVista testmini; prompts: lmms-eval mathvista_evals.py create_one_query "
        "(format-prompt), VLMEvalKit MathVista_MINI, mistral-evals eval/tasks/mathvista.py"
    ),
)
