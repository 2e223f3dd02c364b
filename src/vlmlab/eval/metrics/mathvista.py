"""MathVista (testmini): rule-based answer extraction, normalisation and the final comparison.

The harnesses extract the answer with a GPT judge when their quick rules fail; we have no judge by
default, so such replies are *unparsed* (None), reported separately and never guessed.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.2):

- ``official``: lupantech/MathVista ``evaluation/extract_answer.py::extract_answer`` quick rules (an
  empty reply extracts as ``""``; a reply that is exactly one of the choices; for integer answers
  ``int(reply)``; for float answers ``str(float(reply))``; else the judge), then
  ``calculate_score.py::normalize_extracted_answer``: multiple choice -> a ``(X)`` letter is
  pulled out, a letter maps to its choice text, anything else to the *nearest choice by edit
  distance* (first on ties; an empty extraction therefore picks the shortest choice unless
  ``ignore_empty_extractions``); integer -> ``str(int(float(x)))``; float ->
  ``str(round(float(x), precision))``; list -> ``str(x)``; then ``prediction == answer``.
- ``lmms-eval``: ``lmms_eval/tasks/mathvista/mathvista_evals.py``: the same rules; equality is
  ``str(pred).strip() == str(answer).strip()``.
- ``vlmevalkit``: ``vlmeval/dataset/utils/mathvista.py::post_check``: multiple choice -> the
  letter matcher (:func:`..mcq.vlmevalkit_can_infer`) against ``answer_option``; integer ->
  ``int(reply) == int(answer)`` (so ``"3.0"`` does not parse); float -> ``float(reply) ==
  float(answer)`` **without rounding to the precision**; list -> compares ``str(None)`` with the
  answer, so a list answer can never be right. A non-MC reply that does not match is handed to
  the judge there (unparsed here), except for lists, which are wrong either way.
- ``mistral-explicit`` / ``mistral-anywhere``: mistral-evals converts a multiple-choice gold to its
  letter and applies its relaxed metric (see :mod:`.mistral`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlmlab.eval.metrics import mistral
from vlmlab.eval.metrics._text import levenshtein
from vlmlab.eval.metrics.mcq import option_letters, vlmevalkit_can_infer
from vlmlab.eval.metrics.modes import (
    LMMS_EVAL,
    MISTRAL_ANYWHERE,
    MISTRAL_EXPLICIT,
    OFFICIAL,
    VLMEVALKIT,
    require_mode,
)
from vlmlab.protocol.errors import BadRequestError

MATHVISTA_MODES = (OFFICIAL, LMMS_EVAL, VLMEVALKIT, MISTRAL_EXPLICIT, MISTRAL_ANYWHERE)
MULTI_CHOICE = "multi_choice"
_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")


def mathvista_extract(
    response: str, *, question_type: str, answer_type: str, choices: Sequence[str] = ()
) -> str | None:
    """The official quick extraction rules (also lmms-eval's); None when a judge would be needed."""
    if response == "":
        return ""
    if question_type == MULTI_CHOICE and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    return None


def nearest_choice(extraction: str, choices: Sequence[str]) -> str:
    """``get_most_similar``: the choice with the smallest edit distance (first one on ties)."""
    distances = [levenshtein(extraction, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def mathvista_normalize(
    extraction: object,
    *,
    choices: Sequence[str],
    question_type: str,
    answer_type: str,
    precision: float | None = None,
    ignore_empty_extractions: bool = False,
) -> str | None:
    """``normalize_extracted_answer``: the extraction in the gold answer's format.

    Returns:
        The normalised answer, or None when it cannot be converted (the official code's None).

    Raises:
        BadRequestError: for a multiple-choice question without choices.
    """
    if question_type == MULTI_CHOICE:
        if not choices:
            raise BadRequestError("a MathVista multi_choice question needs its choices")
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        if ignore_empty_extractions and not text:
            return None
        letters = _PAREN_LETTER.findall(text)
        if letters:
            text = letters[0].upper()
        sequential = option_letters(len(choices))
        if text in sequential:
            return choices[sequential.index(text)]
        return nearest_choice(text, choices)
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))  # type: ignore[arg-type]
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))  # type: ignore[arg-type]
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def mathvista_correct(
    prediction: str,
    answer: str,
    *,
    question_type: str,
    answer_type: str,
    choices: Sequence[str] = (),
    precision: float | None = None,
    mode: str = OFFICIAL,
) -> bool | None:
    """Is ``prediction`` right for a MathVista question, as ``mode`` scores it?

    Args:
        prediction: the raw model reply.
        answer: the gold answer as stored in the dataset (for multiple choice: the choice text).
        question_type: ``multi_choice`` or ``free_form``.
        answer_type: ``text``, ``integer``, ``float`` or ``list``.
        choices: the option texts (multiple choice only).
        precision: decimal places of a float answer.
        mode: ``official``, ``lmms-eval``, ``vlmevalkit``, ``mistral-explicit`` or
            ``mistral-anywhere``.

    Returns:
        True/False, or None when the reply needs the harness's GPT judge (unparsed).

    Raises:
        ConfigError: for any other mode.
    """
    require_mode(mode, MATHVISTA_MODES, "mathvista_correct")
    is_mc = question_type == MULTI_CHOICE
    if mode in (OFFICIAL, LMMS_EVAL):
        extraction = mathvista_extract(
            prediction, question_type=question_type, answer_type=answer_type, choices=choices
        )
        if extraction is None:
            return None
        normalized = mathvista_normalize(
            extraction,
            choices=choices,
            question_type=question_type,
            answer_type=answer_type,
            precision=precision,
        )
        if mode == OFFICIAL:
            return normalized == answer
        return str(normalized).strip() == str(answer).strip()
    if mode == VLMEVALKIT:
        if is_mc:
            letter = vlmevalkit_can_infer(prediction, choices)
            if letter is None:
                return None
            return letter == option_letters(len(choices))[list(choices).index(answer)]
        if answer_type == "list":
            return False  # post_check compares str(None) with the answer
        try:
            if answer_type == "integer":
                right = int(prediction) == int(answer)
            else:
                right = float(prediction) == float(answer)
        except (ValueError, OverflowError):
            return None
        return True if right else None
    gold = option_letters(len(choices))[list(choices).index(answer)] if is_mc else answer
    return mistral.score(prediction, [gold], mode) == 1.0
