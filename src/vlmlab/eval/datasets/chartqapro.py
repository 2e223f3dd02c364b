"""ChartQAPro test (DAM-QA key ``chartqapro_test``).

Hub: ``ahmed-masry/ChartQAPro`` split ``test``, 1,948 rows: ``image`` (PNG bytes in a binary
column, not a ``datasets.Image``), ``Question`` (list of turns), ``Answer`` (list, one per turn),
``Question Type`` (Factoid 1,081, Conversational 311, Fact Checking 244, Multi Choice 214,
Hypothetical 98), ``Year`` (list of ``YES``/``NO``), ``Paragraph``. ``answers`` is the whole
``Answer`` list; the scored gold is its last element (``evaluate_predictions_chartqapro``:
``x['Answer'][-1]``), which is what ``vlmlab.eval.metrics`` ``chartqapro`` reads.

Prompts:
- ``default`` / ``vlmevalkit``: the official "Direct" prompt per question type, as implemented in
  VLMEvalKit ``vlmeval/dataset/utils/chartqapro.py::prompt_context`` (the ChartQAPro README
  points to VLMEvalKit as the reference evaluation), byte for byte including the f-string's
  12-space indentation; the paragraph is a separate text chunk before it
  (``ChartQAPro.build_prompt``), omitted when empty.
- ``lmms_eval``: ``Context: {paragraph}\\n\\n`` + ``Q1:/A1:`` lines for conversational rows +
  ``\\nAnswer the question with a short phrase.`` (spec §a.1, lmms-eval Aug 2026), 128 tokens.
- ``damqa``: DAM-QA's prompt with the *first* question turn only (``vlms/run_inference.py``).
"""

from __future__ import annotations

from typing import Any

from vlmlab.eval.datasets.base import Benchmark, Row, as_list, as_rgb, text
from vlmlab.eval.datasets.prompts import DAMQA_TOKENS, damqa, profiles
from vlmlab.eval.types import EvalSample

HF_ID = "ahmed-masry/ChartQAPro"
SIZE = 1948

_UNITS = (
    "Your answer should be a single word, number, or phrase. If the question is unanswerable based on",
    "the information in the provided image, your answer should be unanswerable. Do not generate units.",
    "But if numerical units such as million, m, billion, B, or K are required, use the exact notation",
    "shown in the chart.",
)
_LIST = (
    "If there are multiple answers, put them in brackets using this format [’Answer1’, ’Answer2’]."
)
_ONLY = "Remember to generate the final answer only without any additional text!"

# The "Direct" prompt lines of VLMEvalKit prompt_context (its line breaks; quotes are U+2019).
# One source line per prompt line, even past 100 columns: the breaks are part of the prompt.
DIRECT_LINES: dict[str, tuple[str, ...]] = {
    "Factoid": (
        "You are given a factoid question that you need to answer based on the provided image.",
        *_UNITS, _LIST, _ONLY,
    ),
    "Multi Choice": (
        "You are given a question along with different possible answers. You need to select the correct answer",
        "from them based on the provided image.",
        "Your answer should be one of the options letters only: a, b, c or d (just the letter itself without any",
        "additional text). If the question is unanswerable based on the information in the provided image, your",
        "answer should be unanswerable.",
        _LIST, _ONLY,
    ),
    "Conversational": (
        "You are given a multi-turn conversation, and your job is to answer the final question based on the",
        "conversation history and the information in the provided image.",
        *_UNITS, _LIST, _ONLY,
    ),
    "Fact Checking": (
        "You are given a fact statement that you need to assess based on the provided image.",
        "Your answer should be either true or false (without any additional text). If the question is",
        "unanswerable based on the information in the provided image, your answer should be unanswerable.",
        _LIST, _ONLY,
    ),
    "Hypothetical": (
        "You are given a hypothetical question that you need to answer based on the provided image.",
        *_UNITS, _LIST, _ONLY,
    ),
}  # fmt: skip
_INDENT = " " * 12  # the f-string body is indented by 12 spaces in prompt_context

# spec §a.1: lmms-eval's ChartQAPro post_prompt at the Aug 2026 snapshot
LMMS_EVAL_SUFFIX = "\nAnswer the question with a short phrase."


def direct_prompt(sample: EvalSample) -> str:
    """The official Direct prompt text for one sample (``prompt_context(..., "Direct")``)."""
    qtype = sample.fields["question_type"]
    turns: list[str] = sample.fields["question_turns"]
    if qtype not in DIRECT_LINES:
        raise KeyError(f"unknown ChartQAPro question type {qtype!r}")
    if qtype == "Conversational":
        answers: list[str] = sample.fields["answer_turns"]
        history = [x for qa in zip(turns[:-1], answers[:-1]) for x in qa]
        last = f"Conversation: {history} Question: {turns[-1]}"
    else:
        last = f"Question: {turns[0]}"
    lines = [*DIRECT_LINES[qtype], last]
    return "\n" + "\n".join(_INDENT + line for line in lines) + "\n" + _INDENT


def _official(sample: EvalSample) -> list[str | int]:
    paragraph = sample.fields.get("paragraph") or ""
    return [0, *([paragraph] if paragraph else []), direct_prompt(sample)]


def _lmms_eval(sample: EvalSample) -> list[str | int]:
    """lmms-eval ``chartqapro_doc_to_text``: context, Q/A history, last question, suffix."""
    turns: list[str] = sample.fields["question_turns"]
    answers: list[str] = sample.fields["answer_turns"]
    if sample.fields["question_type"] == "Conversational" and len(turns) > 1:
        lines = []
        for i in range(len(turns) - 1):
            lines.append(f"Q{i + 1}: {turns[i].strip()}")
            if i < len(answers):
                lines.append(f"A{i + 1}: {str(answers[i]).strip()}")
        lines.append(f"Q{len(turns)}: {turns[-1].strip()}")
        question = "\n".join(lines)
    else:
        question = turns[-1].strip()
    paragraph = (sample.fields.get("paragraph") or "").strip()
    if paragraph:
        question = f"Context: {paragraph}\n\n{question}"
    return [0, f"{question}{LMMS_EVAL_SUFFIX}"]


def from_row(row: Row, index: int) -> EvalSample:
    turns = [str(q) for q in as_list(row["Question"])]
    answers = [str(a) for a in as_list(row["Answer"])]
    sample_id = str(row.get("question_id", index))
    qtype = text(row["Question Type"])
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row["image"], f"chartqapro {sample_id} image")],
        question=turns[-1] if turns else "",
        answers=answers or [""],
        fields={
            "question_type": qtype,
            "category": qtype,
            "year": [str(y) for y in as_list(row.get("Year"), parse_repr=True)],
            "paragraph": text(row.get("Paragraph")),
            "question_turns": turns,
            "answer_turns": answers,
            "history": list(zip(turns[:-1], answers[:-1])),
        },
    )


def _from_damqa(row: Row) -> dict[str, Any]:
    """DAM-QA ``data/chartqapro/test.jsonl``: question/answer lists, question_type, year."""
    return {
        "question_id": row["question_id"],
        "Question": as_list(row["question"]),
        "Answer": as_list(row["answer"]),
        "Question Type": row.get("question_type", ""),
        "Year": as_list(row.get("year"), parse_repr=True),
        "Paragraph": row.get("paragraph", ""),
        "image": row["image"],
    }


SPEC = Benchmark(
    key="chartqapro_test",
    hf_id=HF_ID,
    split="test",
    expected_rows=SIZE,
    metric="chartqapro",
    default_mode="official",
    max_tokens=128,  # spec §a.1 (lmms-eval ChartQAPro task)
    from_row=from_row,
    damqa_file="chartqapro/test.jsonl",
    from_damqa=_from_damqa,
    prompts=profiles(
        default=_official,
        vlmevalkit=_official,
        lmms_eval=_lmms_eval,
        damqa=damqa(lambda s: s.fields["question_turns"][0]),
    ),
    profile_max_tokens={"damqa": DAMQA_TOKENS},
    source=(
        "ahmed-masry/ChartQAPro test; prompts: VLMEvalKit vlmeval/dataset/utils/chartqapro.py "
        "prompt_context (Direct), lmms-eval chartqapro utils.py, DAM-QA vlms/run_inference.py"
    ),
)
