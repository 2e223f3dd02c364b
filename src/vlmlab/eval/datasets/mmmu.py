"""MMMU validation (key ``mmmu_val``).

Hub: ``lmms-lab/MMMU`` split ``validation``, 900 rows: ``id`` (``validation_<Subject>_<n>``),
``question``, ``options`` (a *string* holding a Python list), ``explanation``, ``image_1`` ..
``image_7`` (None when unused), ``img_type``, ``answer`` (a letter, a string, or a list repr for
some open questions), ``topic_difficulty``, ``question_type`` (``multiple-choice`` / ``open``),
``subfield``. ``sample.images`` holds the present ``image_k`` in order; ``fields["image_names"]``
says which is which, and ``<image k>`` placeholders in the text become image positions.

Prompts:
- ``default``: lmms-eval ``mmmu/utils.py::construct_prompt`` -- ``{question}\\n{A. ...}\\n\\nAnswer
  with the option's letter from the given choices directly.`` or ``{question}\\n\\nAnswer the
  question using a single word or phrase.``; each ``<image k>`` (in options too) is replaced by
  that image, interleaved (spec §a.2). lmms-eval sends each referenced image once; here every
  occurrence is an image position, as in VLMEvalKit and mistral-evals. A prompt with no
  placeholder gets all images first (VLMEvalKit ``split_MMMU`` does the same). 128 tokens.
- ``vlmevalkit``: ``ImageMCQDataset.build_prompt`` template then ``MMMUDataset.split_MMMU``.
- ``mistral``: ``eval/tasks/mmmu.py`` -- question (+ ``\\n`` + options for multiple choice) split
  on ``<image k>``, whitespace-only chunks dropped, ``\\n`` + CoT prompt appended to the last text
  chunk (or as its own chunk after a trailing image). 2,048 tokens.
Metric: the official MMMU parser (MC letter / open-answer matching), per subject and discipline.
"""

from __future__ import annotations

import re

from vlmlab.eval.datasets.base import Benchmark, Row, as_list, as_rgb, letters, text
from vlmlab.eval.datasets.prompts import (
    MISTRAL_COT_TOKENS,
    MISTRAL_MC_COT,
    profiles,
    vlmevalkit_mcq,
)
from vlmlab.eval.types import EvalSample

IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))
PLACEHOLDER = re.compile(r"<image (\d+)>")
MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_ENDED_PROMPT = "Answer the question using a single word or phrase."  # mmmu/utils.py


def _is_mc(sample: EvalSample) -> bool:
    return sample.fields["question_type"] == "multiple-choice"


def _options_block(sample: EvalSample) -> str:
    options = sample.fields["choices"]
    return "\n".join(
        f"{letter}. {option}" for letter, option in zip(letters(len(options)), options)
    )


def interleave(sample: EvalSample, prompt: str, drop_blank: bool = False) -> list[str | int]:
    """Split ``prompt`` at ``<image k>`` into text pieces and positions in ``sample.images``.

    Args:
        drop_blank: drop whitespace-only text chunks (mistral-evals); otherwise only empty ones.
    """
    names: list[str] = sample.fields["image_names"]
    pieces: list[str | int] = []
    last = 0
    for match in PLACEHOLDER.finditer(prompt):
        name = f"image_{match.group(1)}"
        if name not in names:  # a placeholder without its image stays text
            continue
        pieces.append(prompt[last : match.start()])
        pieces.append(names.index(name))
        last = match.end()
    pieces.append(prompt[last:])
    keep = [p for p in pieces if isinstance(p, int) or (p.strip() if drop_blank else p)]
    if not any(isinstance(p, int) for p in keep):
        keep = [*range(len(sample.images)), *keep]
    return keep


def _default(sample: EvalSample) -> list[str | int]:
    if _is_mc(sample):
        prompt = f"{sample.question}\n{_options_block(sample)}\n\n{MULTI_CHOICE_PROMPT}"
    else:
        prompt = f"{sample.question}\n\n{OPEN_ENDED_PROMPT}"
    return interleave(sample, prompt)


def _vlmevalkit(sample: EvalSample) -> list[str | int]:
    options = dict(zip(letters(len(sample.fields["choices"])), sample.fields["choices"]))
    return interleave(
        sample, vlmevalkit_mcq(sample.question, options if _is_mc(sample) else {}, None)
    )


def _mistral(sample: EvalSample) -> list[str | int]:
    question = sample.question
    if _is_mc(sample):
        question = f"{question}\n{_options_block(sample)}"
    pieces = interleave(sample, question, drop_blank=True)
    if isinstance(pieces[-1], str):
        pieces[-1] = pieces[-1] + "\n" + MISTRAL_MC_COT
    else:
        pieces.append(MISTRAL_MC_COT)
    return pieces


def subject(sample_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory`` (lmms-eval ``extract_subset_name``)."""
    match = re.match(r"^[^_]+_(.+?)_\d+$", sample_id)
    return match.group(1) if match else ""


def from_row(row: Row, index: int) -> EvalSample:
    sample_id = str(row.get("id", index))
    names = [c for c in IMAGE_COLUMNS if row.get(c) is not None]
    raw_answer = text(row["answer"])
    # mistral-evals: literal_eval when "[" is in the answer; a list means any of them is right
    answers = (
        [str(a) for a in as_list(raw_answer, parse_repr=True)]
        if "[" in raw_answer
        else [raw_answer]
    )
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row[c], f"mmmu {sample_id} {c}") for c in names],
        question=text(row["question"]),
        answers=answers,
        fields={
            "question_type": text(row["question_type"]),
            "choices": [str(o) for o in as_list(row.get("options"), parse_repr=True)],
            "image_names": names,
            "subject": subject(sample_id),
            "category": subject(sample_id),
            "subfield": text(row.get("subfield")),
            "topic_difficulty": text(row.get("topic_difficulty")),
            "img_type": text(row.get("img_type")),
        },
    )


SPEC = Benchmark(
    key="mmmu_val",
    hf_id="lmms-lab/MMMU",
    split="validation",
    expected_rows=900,
    # dataset-specific scorer: multiple-choice rows by the MMMU letter parser (metrics ``mcq``),
    # open rows by ``mmmu_open_match``; accuracy per subject / discipline
    metric="mmmu",
    default_mode="official",
    max_tokens=128,  # spec §a.2 (lmms-eval mmmu_val)
    from_row=from_row,
    image_columns=IMAGE_COLUMNS,
    prompts=profiles(default=_default, vlmevalkit=_vlmevalkit, mistral=_mistral),
    profile_max_tokens={"mistral": MISTRAL_COT_TOKENS},
    source=(
        "lmms-lab/MMMU validation; prompts: lmms-eval mmmu/utils.py, VLMEvalKit image_mcq.py "
        "MMMUDataset, mistral-evals eval/tasks/mmmu.py"
    ),
)
