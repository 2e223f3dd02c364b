"""DocVQA validation (DAM-QA key ``docvqa_val``).

Hub: ``lmms-lab/DocVQA`` config ``DocVQA`` split ``validation``, 5,349 rows: ``questionId``,
``question``, ``question_types`` (list), ``image``, ``docId``, ``ucsf_document_id``,
``ucsf_document_page_no``, ``answers`` (list, ~1.5 per question), ``data_split``. The test split
(5,188) has no answers (RRC server only). Prompt: question + ``\\nAnswer the question using a
single word or phrase.`` in lmms-eval (``_default_template_docvqa_yaml``), VLMEvalKit
(``ImageVQADataset``) and mistral-evals (``eval/tasks/docvqa.py``, joined with ``\\n``, 10 tokens).
Metric: ANLS (tau 0.5). lmms-eval's generation budget is 32 tokens (spec §a.1).
DAM-QA: ``data/docvqa/val.jsonl`` (``question_id``, ``question``, ``image``, ``answer`` list).
"""

from __future__ import annotations

from typing import Any

from vlmlab.eval.datasets.base import Benchmark, Row, answer_strings, as_list, as_rgb, text
from vlmlab.eval.datasets.prompts import (
    DAMQA_TOKENS,
    MISTRAL_DOCVQA,
    MISTRAL_SHORT_TOKENS,
    SINGLE_WORD_OR_PHRASE,
    damqa,
    profiles,
    question_plus,
)
from vlmlab.eval.types import EvalSample


def from_row(row: Row, index: int) -> EvalSample:
    sample_id = str(row.get("questionId", index))
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row["image"], f"docvqa {sample_id} image")],
        question=text(row["question"]),
        answers=answer_strings(row["answers"]),
        fields={
            "question_types": [str(t) for t in as_list(row.get("question_types"))],
            "doc_id": row.get("docId"),
        },
    )


def from_damqa(row: Row) -> dict[str, Any]:
    """DAM-QA rows -> the Hub schema (DocVQA and InfographicVQA share it)."""
    return {
        "questionId": row["question_id"],
        "question": row["question"],
        "answers": answer_strings(row["answer"]),
        "image": row["image"],
    }


SPEC = Benchmark(
    key="docvqa_val",
    hf_id="lmms-lab/DocVQA",
    hf_config="DocVQA",
    split="validation",
    expected_rows=5349,
    metric="anls",
    default_mode="official",
    max_tokens=32,  # spec §a.1: lmms-eval 32, mistral-evals 10, DAM-QA 100
    from_row=from_row,
    damqa_file="docvqa/val.jsonl",
    from_damqa=from_damqa,
    prompts=profiles(
        default=question_plus(SINGLE_WORD_OR_PHRASE),
        vlmevalkit=question_plus(SINGLE_WORD_OR_PHRASE),
        mistral=question_plus("\n" + MISTRAL_DOCVQA),
        damqa=damqa(),
    ),
    profile_max_tokens={"mistral": MISTRAL_SHORT_TOKENS, "damqa": DAMQA_TOKENS},
    source=(
        "lmms-lab/DocVQA DocVQA validation; prompts: lmms-eval docvqa template, VLMEvalKit "
        "ImageVQADataset, mistral-evals eval/tasks/docvqa.py, DAM-QA src/config.py"
    ),
)
