"""InfographicVQA validation (DAM-QA key ``infographicvqa_val``).

Hub: ``lmms-lab/DocVQA`` config ``InfographicVQA`` split ``validation``, 2,801 rows:
``questionId``, ``question``, ``answers`` (list; comma lists give every permutation as an
alternative), ``answer_type``, ``image``, ``image_url``, ``operation/reasoning``, ``ocr``,
``data_split``. Prompt: question + ``\\nAnswer the question using a single word or phrase.``
(lmms-eval ``_default_template_infovqa_yaml``, max_new_tokens 32; VLMEvalKit ``InfoVQA_VAL``).
mistral-evals has no InfographicVQA task. Metric: ANLS (tau 0.5).
DAM-QA: ``data/infographicvqa/infographicvqa_val.jsonl``.
"""

from __future__ import annotations

from vlmlab.eval.datasets.base import Benchmark, Row, answer_strings, as_list, as_rgb, text
from vlmlab.eval.datasets.docvqa import from_damqa
from vlmlab.eval.datasets.prompts import (
    DAMQA_TOKENS,
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
        images=[as_rgb(row["image"], f"infographicvqa {sample_id} image")],
        question=text(row["question"]),
        answers=answer_strings(row["answers"]),
        fields={"answer_type": [str(t) for t in as_list(row.get("answer_type"))]},
    )


SPEC = Benchmark(
    key="infographicvqa_val",
    hf_id="lmms-lab/DocVQA",
    hf_config="InfographicVQA",
    split="validation",
    expected_rows=2801,
    metric="anls",
    default_mode="official",
    max_tokens=32,  # lmms-eval _default_template_infovqa_yaml max_new_tokens
    from_row=from_row,
    damqa_file="infographicvqa/infographicvqa_val.jsonl",
    from_damqa=from_damqa,
    prompts=profiles(
        default=question_plus(SINGLE_WORD_OR_PHRASE),
        vlmevalkit=question_plus(SINGLE_WORD_OR_PHRASE),
        damqa=damqa(),
    ),
    profile_max_tokens={"damqa": DAMQA_TOKENS},
    source=(
        "lmms-lab/DocVQA InfographicVQA validation; prompts: lmms-eval infovqa template, "
        "VLMEvalKit ImageVQADataset, DAM-QA src/config.py"
    ),
)
