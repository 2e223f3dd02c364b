"""OCRBench v1 (key ``ocrbench``).

Hub: ``echo840/OCRBench`` split ``test``, 1,000 rows: ``dataset`` (source set, e.g. ``HME100k``),
``question``, ``question_type`` (one of 10 categories: 300 recognition, 200 scene-text VQA, 200
doc VQA, 200 key information extraction, 100 handwritten math), ``answer`` (list), ``image``.

Prompts: the question only -- lmms-eval ``ocrbench/utils.py::ocrbench_doc_to_text`` strips it
(``default``, 128 tokens from ``ocrbench.yaml``); VLMEvalKit ``OCRBench`` sends it as is.
Metric: any answer contained in the prediction (HME100k: spaces removed, case kept); the score is
the sum out of 1,000, per category too.
"""

from __future__ import annotations

from vlmlab.eval.datasets.base import Benchmark, Row, answer_strings, as_rgb, text
from vlmlab.eval.datasets.prompts import image_then, profiles
from vlmlab.eval.types import EvalSample


def from_row(row: Row, index: int) -> EvalSample:
    sample_id = str(row.get("id", index))
    qtype = text(row.get("question_type"))
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row["image"], f"ocrbench {sample_id} image")],
        question=text(row["question"]),
        answers=answer_strings(row["answer"]),
        fields={"dataset": text(row.get("dataset")), "question_type": qtype, "category": qtype},
    )


SPEC = Benchmark(
    key="ocrbench",
    hf_id="echo840/OCRBench",
    split="test",
    expected_rows=1000,
    metric="ocrbench",
    default_mode="official",
    max_tokens=128,  # lmms-eval ocrbench.yaml max_new_tokens
    from_row=from_row,
    prompts=profiles(
        default=image_then(lambda s: s.question.strip()),
        vlmevalkit=image_then(lambda s: s.question),
    ),
    source="echo840/OCRBench test; prompts: lmms-eval ocrbench/utils.py, VLMEvalKit OCRBench",
)
