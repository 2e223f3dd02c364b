"""ANLS (DocVQA, InfographicVQA): 1 - normalised Levenshtein distance to the closest answer.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.1, §a.3):

- ``official`` / ``lmms-eval`` / ``vlmevalkit``: the Robust Reading Competition rule as copied in
  ``lmms_eval/api/metrics.py::anls`` and ``vlmeval/dataset/utils/vqa_eval.py::anls_compute`` +
  ``hit_calculate``. Both strings are lower-cased, stripped and have inner whitespace collapsed;
  the distance is taken on those, but the denominator is ``max(len(gt.upper()),
  len(pred.upper()))`` of the *raw* strings (so surrounding spaces lengthen it and ``"ß"`` counts
  as two). Score = ``1 - min(NL)``; below 0.5 it becomes 0, so NL exactly 0.5 keeps 0.5.
- ``anls-pypi``: the ``anls`` package (0.0.2, ``anls/metrics/score.py::anls_score``): the
  denominator is the *normalised* length and the cutoff is strict (``1 - NL`` only if ``NL < 0.5``,
  so NL exactly 0.5 gives 0); best over answers.
- ``mistral``: mistral-evals ``eval/metrics.py::ANLS``: normalise as above, then also strip
  trailing punctuation/whitespace (``%`` kept) on both sides, normalised-length denominator and
  threshold 0 (no cutoff).
- ``damqa``: DAM-QA ``evaluation/metrics.py::anls_score`` after its prediction cleanup:
  ``normalize_infovqa_answer`` on both sides (punctuation removed, number words to digits),
  normalised-length denominator, two empty strings score 0, best answer kept if ``>= 0.5``.
"""

from __future__ import annotations

from vlmlab.eval.metrics import damqa
from vlmlab.eval.metrics._text import levenshtein
from vlmlab.eval.metrics.mistral import remove_end_punctuation
from vlmlab.eval.metrics.modes import ANLS_PYPI, DAMQA, LMMS_EVAL, MISTRAL, OFFICIAL, VLMEVALKIT

THRESHOLD = 0.5  # RRC / lmms-eval thresh_hold / anls package default


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def rrc_anls(prediction: str, answers: list[str], threshold: float = THRESHOLD) -> float:
    """The RRC rule (lmms-eval ``anls``; VLMEvalKit ``anls_compute`` + ``hit_calculate``)."""
    det = _normalise(prediction)
    values = []
    for answer in answers:
        distance = levenshtein(_normalise(answer), det)
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else distance / length)
    result = 1 - min(values)
    return 0.0 if result < threshold else result


def pypi_anls(prediction: str, answers: list[str], threshold: float = THRESHOLD) -> float:
    """``anls.anls_score(prediction, gold_labels, threshold)`` from the ``anls`` package."""
    pred = _normalise(prediction)
    scores = []
    for answer in answers:
        gold = _normalise(answer)
        length = max(len(pred.upper()), len(gold.upper()))
        nl = 0.0 if length == 0 else levenshtein(pred, gold) / length
        scores.append(1 - nl if nl < threshold else 0.0)
    return max(scores)


def mistral_anls(prediction: str, answers: list[str]) -> float:
    """mistral-evals ``ANLS.score`` (threshold 0)."""
    pred = remove_end_punctuation(_normalise(prediction))
    best = float("inf")
    for answer in answers:
        gold = remove_end_punctuation(_normalise(answer))
        length = max(len(gold), len(pred))
        best = min(best, 0.0 if length == 0 else levenshtein(gold, pred) / length)
    return max(1 - best, 0.0)  # threshold 0: never below 0


def damqa_anls(prediction: str, answers: list[str], threshold: float = THRESHOLD) -> float:
    """DAM-QA ``anls_score`` (no prediction cleanup here; callers apply it where DAM-QA does)."""
    pred = damqa.normalize_infovqa_answer(prediction)
    scores = []
    for answer in answers:
        gold = damqa.normalize_infovqa_answer(answer)
        length = max(len(pred), len(gold))
        scores.append(1.0 - levenshtein(pred, gold) / length if length > 0 else 0.0)
    best = max(scores) if scores else 0.0
    return best if best >= threshold else 0.0


def anls(prediction: str, answers: list[str], mode: str) -> float:
    """ANLS of ``prediction`` against ``answers`` in ``mode``, in [0, 1]."""
    if mode in (OFFICIAL, LMMS_EVAL, VLMEVALKIT):
        return rrc_anls(prediction, answers)
    if mode == ANLS_PYPI:
        return pypi_anls(prediction, answers)
    if mode == MISTRAL:
        return mistral_anls(prediction, answers)
    if mode == DAMQA:
        return damqa_anls(damqa.clean_prediction(prediction), answers)
    raise AssertionError(f"unhandled anls mode {mode!r}")  # guarded by check_mode
