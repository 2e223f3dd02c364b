"""DAM-QA's shared scoring steps (``damqa`` mode).

Reference: Linvyl/DAM-QA ``evaluation/metrics.py`` (snapshot ``cf49b72``; the stored copy read was
``aa9c40e``): ``calculate_metric_scores`` cleans every prediction the same way before the metric
runs, ``parse_gt_field`` turns the CSV ``gt`` column back into Python with ``ast.literal_eval``,
and ``normalize_infovqa_answer`` is the ANLS normaliser (also used for ChartQAPro's text branch).
"""

from __future__ import annotations

import re

from vlmlab.eval.metrics._text import NUMBER_WORDS, literal_eval_quiet

_NUMBER_WORD_PATTERNS = [
    (re.compile(r"\b" + re.escape(k) + r"\b"), v) for k, v in NUMBER_WORDS.items()
]
_INFOVQA_PUNCT = re.compile(r"[\.,;:!?\"'\[\](){}]")
_SPACES = re.compile(r"\s+")


def clean_prediction(prediction: str) -> str:
    """DAM-QA's per-row prediction cleanup (``calculate_metric_scores``).

    Only the exact spellings ``"the answer is"`` / ``"The answer is"`` are removed (anywhere in the
    text), then trailing dots, then surrounding whitespace; so ``"yes. "`` keeps its dot because the
    dot is not last until after the strip.
    """
    text = prediction.replace("the answer is", "").replace("The answer is", "")
    return text.rstrip(".").strip()


def csv_round_trip(answer: str) -> list[str]:
    """The ground truth as DAM-QA sees it after its CSV round trip (``parse_gt_field``).

    The CSV cell holds the raw answer string, which ``ast.literal_eval`` turns back into Python
    where it can: ``"1,000"`` becomes the tuple ``(1, 0)`` (so it can never match), ``"0.50"``
    becomes ``0.5``, ``"[1, 2]"`` becomes two answers. Anything that does not parse stays as it is.
    """
    try:
        value = literal_eval_quiet(answer)
    except Exception:  # noqa: BLE001 - the reference catches everything (SyntaxError, ...)
        return [answer]
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)]


def normalize_infovqa_answer(answer: str) -> str:
    """DAM-QA ``normalize_infovqa_answer``: lower, strip, collapse whitespace, drop punctuation,
    number words to digits.

    Whitespace is collapsed *before* punctuation is removed, so ``"a . b"`` keeps two spaces.
    """
    text = answer.lower().strip()
    text = _SPACES.sub(" ", text)
    text = _INFOVQA_PUNCT.sub("", text)
    for pattern, digit in _NUMBER_WORD_PATTERNS:
        text = pattern.sub(digit, text)
    return text
