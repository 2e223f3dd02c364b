"""TextVQA validation (DAM-QA key ``textvqa_val``).

Hub: ``lmms-lab/textvqa`` split ``validation``, 5,000 rows: ``image_id``, ``question_id``,
``question``, ``question_tokens``, ``image``, ``image_width``, ``image_height``, ``answers``
(10 strings), ``image_classes``, ``set_name``, ``ocr_tokens``, flickr URLs. Test (5,734) -> EvalAI.

Prompts (lmms-eval ``textvqa/utils.py::textvqa_doc_to_text`` + ``_default_template_textvqa_yaml``):
``question.capitalize()`` (which lower-cases the rest: "'NASA'" -> "'nasa'") + the optional
``\\nReference OCR token: a, b`` (off by default; profile ``default_ocr`` turns it on, as LLaVA's
published numbers do) + ``\\nAnswer the question using a single word or phrase.``. VLMEvalKit
sends the question unchanged + the same suffix. DAM-QA: ``data/textvqa/textvqa_val_updated.jsonl``
(answers as ``{"answer": ...}`` dicts), 10 tokens. Metric: VQA accuracy (10 answers).
"""

from __future__ import annotations

from typing import Any

from vlmlab.eval.datasets.base import Benchmark, Row, answer_strings, as_list, as_rgb, text
from vlmlab.eval.datasets.prompts import (
    SINGLE_WORD_OR_PHRASE,
    damqa,
    image_then,
    profiles,
    question_plus,
)
from vlmlab.eval.types import EvalSample


def _lmms_eval(ocr: bool):
    def question(sample: EvalSample) -> str:
        reference = ""
        if ocr:
            reference = f"\nReference OCR token: {', '.join(sample.fields['ocr_tokens'])}"
        return f"{sample.question.capitalize()}{reference}{SINGLE_WORD_OR_PHRASE}"

    return image_then(question)


def from_row(row: Row, index: int) -> EvalSample:
    sample_id = str(row.get("question_id", index))
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row["image"], f"textvqa {sample_id} image")],
        question=text(row["question"]),
        answers=answer_strings(row["answers"]),
        fields={
            "ocr_tokens": [str(t) for t in as_list(row.get("ocr_tokens"))],
            "image_id": row.get("image_id"),
            "dataset": "textvqa",  # vlmlab.eval.metrics vqa_accuracy: lmms-eval's TextVQA path
        },
    )


def _from_damqa(row: Row) -> dict[str, Any]:
    return {
        "question_id": row["question_id"],
        "question": row["question"],
        "answers": answer_strings(row["answer"]),
        "ocr_tokens": row.get("ocr_tokens", []),
        "image": row["image"],
    }


SPEC = Benchmark(
    key="textvqa_val",
    hf_id="lmms-lab/textvqa",
    split="validation",
    expected_rows=5000,
    metric="vqa_accuracy",
    default_mode="official",
    # lmms-eval's textvqa template sets only ``until`` (the model wrapper's default applies);
    # 16 is its budget for the same single-word answers in vqav2 and chartqa.
    max_tokens=16,
    from_row=from_row,
    damqa_file="textvqa/textvqa_val_updated.jsonl",
    from_damqa=_from_damqa,
    prompts=profiles(
        default=_lmms_eval(ocr=False),
        default_ocr=_lmms_eval(ocr=True),
        vlmevalkit=question_plus(SINGLE_WORD_OR_PHRASE),
        damqa=damqa(),
    ),
    profile_max_tokens={"damqa": 10},  # DAM-QA vlms/config.py textvqa_val max_new_tokens
    source=(
        "lmms-lab/textvqa validation; prompts: lmms-eval textvqa utils.py, VLMEvalKit "
        "ImageVQADataset, DAM-QA src/config.py"
    ),
)
