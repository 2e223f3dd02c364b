"""RealWorldQA (key ``realworldqa``).

Hub: ``lmms-lab/RealWorldQA`` split ``test`` (from ``xai-org/RealworldQA``), 765 rows:
``image``, ``question`` (with its options and its own instruction, e.g. "Please answer directly
with only the letter of the correct option and nothing else."), ``answer`` (a letter for the
multiple-choice questions, a word or number otherwise).

Prompt ``default``: lmms-eval ``realworldqa/utils.py::realworldqa_doc_to_text`` -- the question
stripped, nothing added (default ``post_prompt`` is empty); 16 tokens (``realworldqa.yaml``).
VLMEvalKit re-parses the options out of its own TSV into its MCQ template; that text cannot be
rebuilt exactly from the Hub rows, so no ``vlmevalkit`` profile is offered.
``fields["choices"]`` are the options found by lmms-eval's ``MultiChoiceRegexFilter`` pattern.
"""

from __future__ import annotations

import re

from vlmlab.eval.datasets.base import Benchmark, Row, as_rgb, text
from vlmlab.eval.datasets.prompts import image_then, profiles
from vlmlab.eval.types import EvalSample

# lmms-eval realworldqa/utils.py MultiChoiceRegexFilter: multiple_choices_regex
OPTION = re.compile(r"\b([A-Z])\.\s+([^\n]*)")


def from_row(row: Row, index: int) -> EvalSample:
    sample_id = str(row.get("id", index))
    question = text(row["question"])
    options = {letter: option.strip() for letter, option in OPTION.findall(question)}
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row["image"], f"realworldqa {sample_id} image")],
        question=question,
        answers=[text(row["answer"])],
        fields={"options": options, "choices": list(options.values())},
    )


SPEC = Benchmark(
    key="realworldqa",
    hf_id="lmms-lab/RealWorldQA",
    split="test",
    expected_rows=765,
    # RealWorldQA ships no scorer; lmms-eval's (extract_mcq_answer for A-D golds, else a
    # lower/strip/trailing-dot exact match) is the reference the spec describes.
    metric="mcq",
    default_mode="lmms-eval",
    max_tokens=16,  # lmms-eval realworldqa.yaml max_new_tokens
    from_row=from_row,
    prompts=profiles(default=image_then(lambda s: s.question.strip())),
    source="lmms-lab/RealWorldQA test; prompt: lmms-eval realworldqa/utils.py",
)
