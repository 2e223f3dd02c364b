"""VQAv2 "restval" subset of DAM-QA (key ``vqav2_restval``).

5,077 questions over 1,000 COCO val2014 images, 10 answers each, in DAM-QA's
``data/vqav2/vqav2_restval.jsonl`` (``question_id``, ``question``, ``image``
(``COCO_val2014_000000xxxxxx.jpg``), ``answer`` = list of ``{"answer": ...}`` dicts); the
annotations are mirrored at ``VLAI-AIVN/DAM-QA-annotations`` without images (licensing), so this
dataset is read from ``--data-dir`` only. A local copy in the ``lmms-lab/VQAv2`` Hub schema
(``question_id``, ``question``, ``answers`` dicts, ``multiple_choice_answer``, ``image``) is read
too. The full validation split is ``lmms-lab/VQAv2`` ``validation`` (214,354 rows).

Prompts: lmms-eval ``vqav2`` template (question + ``\\nAnswer the question using a single word or
phrase.``, 16 tokens); mistral-evals ``eval/tasks/vqav2.py`` (question + ``\\n`` + four rules,
10 tokens); DAM-QA (10 tokens). VLMEvalKit has no VQAv2 task. Metric: VQA accuracy.
"""

from __future__ import annotations

from typing import Any

from vlmlab.eval.datasets.base import Benchmark, Row, answer_strings, as_rgb, text
from vlmlab.eval.datasets.prompts import (
    MISTRAL_SHORT_TOKENS,
    MISTRAL_VQAV2,
    SINGLE_WORD_OR_PHRASE,
    damqa,
    profiles,
    question_plus,
)
from vlmlab.eval.types import EvalSample


def from_row(row: Row, index: int) -> EvalSample:
    sample_id = str(row.get("question_id", index))
    # "dataset" picks lmms-eval's VQAv2 scoring path in vlmlab.eval.metrics vqa_accuracy
    fields: dict[str, Any] = {"image_id": row.get("image_id"), "dataset": "vqav2"}
    if row.get("question_type") is not None:
        fields["question_type"] = row["question_type"]
    if row.get("answer_type") is not None:
        fields["answer_type"] = row["answer_type"]
        fields["category"] = row["answer_type"]  # yes/no, number, other
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row["image"], f"vqav2 {sample_id} image")],
        question=text(row["question"]),
        answers=answer_strings(row["answers"]),
        fields=fields,
    )


def _from_damqa(row: Row) -> dict[str, Any]:
    return {
        "question_id": row["question_id"],
        "question": row["question"],
        "answers": row["answer"],
        "image": row["image"],
    }


SPEC = Benchmark(
    key="vqav2_restval",
    hf_id="VLAI-AIVN/DAM-QA-annotations",
    split="vqav2_restval",
    expected_rows=5077,
    metric="vqa_accuracy",
    default_mode="official",
    max_tokens=16,  # lmms-eval _default_template_vqav2_yaml max_new_tokens
    from_row=from_row,
    damqa_file="vqav2/vqav2_restval.jsonl",
    from_damqa=_from_damqa,
    hub_available=False,
    prompts=profiles(
        default=question_plus(SINGLE_WORD_OR_PHRASE),
        mistral=question_plus("\n" + MISTRAL_VQAV2),
        damqa=damqa(),
    ),
    profile_max_tokens={"mistral": MISTRAL_SHORT_TOKENS, "damqa": 10},  # DAM-QA vlms/config.py
    source=(
        "DAM-QA data/vqav2/vqav2_restval.jsonl (annotations also at VLAI-AIVN/DAM-QA-annotations) "
        "+ COCO val2014 images; prompts: lmms-eval vqav2 template, mistral-evals vqav2.py"
    ),
)
