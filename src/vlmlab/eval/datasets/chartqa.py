"""ChartQA test, human and augmented halves (DAM-QA keys ``chartqa_test_human/_augmented``).

Hub: ``lmms-lab/ChartQA`` split ``test`` (2,500 rows: ``question``, ``answer`` (str), ``type`` in
{``human_test``, ``augmented_test``}, ``image``), 1,250 per half; lmms-eval reads it in
``lmms_eval/tasks/chartqa/chartqa.yaml`` (max_new_tokens 16) + ``utils.py``. DAM-QA ships one
jsonl per half (``data/chartqa/test_human.jsonl``: ``question_id``, ``question``, ``image``,
``answer``). Metric: relaxed accuracy (pix2struct), reported per half and as their mean.
"""

from __future__ import annotations

from typing import Any

from vlmlab.eval.datasets.base import Benchmark, Row, as_rgb, text
from vlmlab.eval.datasets.prompts import (
    DAMQA_TOKENS,
    MISTRAL_CHARTQA_COT,
    MISTRAL_COT_TOKENS,
    SINGLE_WORD_OR_PHRASE,
    damqa,
    profiles,
    question_plus,
)
from vlmlab.eval.types import EvalSample

HF_ID = "lmms-lab/ChartQA"
SIZE = 1250  # each half of the 2,500-row test split (vis-nlp/ChartQA test_human/augmented.json)
# lmms-eval chartqa.yaml lmms_eval_specific_kwargs.default.post_prompt
LMMS_EVAL_SUFFIX = "\nAnswer the question with a single word."


def _from_row(half: str):
    def from_row(row: Row, index: int) -> EvalSample | None:
        kind = row.get("type")
        if kind is not None and kind != half:
            return None
        sample_id = str(row.get("question_id", index))
        return EvalSample(
            id=sample_id,
            images=[as_rgb(row["image"], f"chartqa {sample_id} image")],
            question=text(row["question"]),
            answers=[text(row["answer"])],
            fields={"type": half, "category": half.removesuffix("_test")},
        )

    return from_row


def _keep(half: str):
    # DAM-QA's per-half files carry no ``type``: every row belongs to the half it was read for.
    return lambda row: row.get("type") in (None, half)


def _from_damqa(row: Row) -> dict[str, Any]:
    answer = row["answer"]
    if isinstance(answer, list):  # not in DAM-QA's files, tolerated for hand-made copies
        answer = answer[0] if answer else ""
    return {
        "question_id": row["question_id"],
        "question": row["question"],
        "answer": answer,
        "type": None,
        "image": row["image"],
    }


def _spec(key: str, half: str, damqa_file: str) -> Benchmark:
    return Benchmark(
        key=key,
        hf_id=HF_ID,
        split="test",
        expected_rows=SIZE,
        metric="relaxed_accuracy",
        default_mode="official",
        max_tokens=16,  # lmms-eval chartqa.yaml generation_kwargs.max_new_tokens
        from_row=_from_row(half),
        keep_row=_keep(half),
        damqa_file=damqa_file,
        from_damqa=_from_damqa,
        prompts=profiles(
            default=question_plus(LMMS_EVAL_SUFFIX),
            vlmevalkit=question_plus(SINGLE_WORD_OR_PHRASE),
            mistral=question_plus("\n" + MISTRAL_CHARTQA_COT),
            damqa=damqa(),
        ),
        profile_max_tokens={"mistral": MISTRAL_COT_TOKENS, "damqa": DAMQA_TOKENS},
        source=(
            "lmms-lab/ChartQA test filtered by type; prompts: lmms-eval chartqa.yaml, VLMEvalKit "
            "ImageVQADataset, mistral-evals eval/tasks/chartqa.py, DAM-QA src/config.py"
        ),
    )


HUMAN = _spec("chartqa_test_human", "human_test", "chartqa/test_human.jsonl")
AUGMENTED = _spec("chartqa_test_augmented", "augmented_test", "chartqa/test_augmented.jsonl")
