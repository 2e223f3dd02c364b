"""Relaxed accuracy (ChartQA): numbers within 5% of the gold value, text by exact match.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.1, §a.3):

- ``official``: pix2struct ``pix2struct/metrics.py::relaxed_correctness`` (max over answers).
  ``float()`` parse, a trailing ``%`` is stripped (all of them, ``rstrip``) and the value divided by
  100; when both parse *and the target is non-zero* the prediction is right iff
  ``|p - t| / |t| <= 0.05``; otherwise case-insensitive string equality. Consequences: years are
  within 5% of each other (2015 vs 2016 right), ``"5%"`` vs ``"5"`` wrong (0.05 vs 5), target
  ``"0"`` needs the string ``"0"``, ``"1,000"`` never parses, and float rounding decides the
  boundary: prediction 0.315 for gold 0.3 gives 0.050000000000000044 > 0.05 (wrong), prediction 0.7
  for gold 0.735 gives 0.0476 (right); note prediction 0.735 for gold 0.7 is *also*
  0.050000000000000044 (wrong). No stripping: a text answer with a trailing space fails, numbers
  tolerate whitespace because ``float()`` does.
- ``lmms-eval``: ``lmms_eval/tasks/chartqa/utils.py::relaxed_correctness`` = the pix2struct rule
  with arguments named (prediction, target); identical results.
- ``vlmevalkit``: ``vlmeval/dataset/utils/vqa_eval.py::process_line`` (``relaxed_accuracy``) strips
  the prediction, then the pix2struct rule; max over answers (``hit_calculate``).
- ``mistral`` / ``mistral-explicit`` / ``mistral-anywhere``: see :mod:`.mistral`.
- ``damqa``: DAM-QA ``evaluation/metrics.py::relaxed_correctness`` after its prediction cleanup
  (``"the answer is"`` and trailing dots removed) and CSV round trip of the gold (see
  :mod:`.damqa`); both sides stripped for the text comparison, any parse error means "not a number".
"""

from __future__ import annotations

from vlmlab.eval.metrics import damqa, mistral
from vlmlab.eval.metrics.modes import (
    DAMQA,
    LMMS_EVAL,
    MISTRAL,
    MISTRAL_ANYWHERE,
    MISTRAL_EXPLICIT,
    OFFICIAL,
    VLMEVALKIT,
)

MAX_RELATIVE_CHANGE = 0.05  # pix2struct metrics.py relaxed_correctness default


def _pix2struct_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def pix2struct_correct(target: str, prediction: str) -> bool:
    """pix2struct ``relaxed_correctness(target, prediction)`` (lmms-eval's, VLMEvalKit's too)."""
    prediction_value = _pix2struct_float(prediction)
    target_value = _pix2struct_float(target)
    if prediction_value is not None and target_value:
        return abs(prediction_value - target_value) / abs(target_value) <= MAX_RELATIVE_CHANGE
    return prediction.lower() == target.lower()


def _damqa_float(text: str) -> float | None:
    try:
        text = text.strip()
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except Exception:  # noqa: BLE001 - DAM-QA uses a bare except
        return None


def damqa_correct(target: str, prediction: str) -> bool:
    """DAM-QA ``relaxed_correctness(target, prediction)``."""
    prediction_value, target_value = _damqa_float(prediction), _damqa_float(target)
    if prediction_value is not None and target_value:
        return abs(prediction_value - target_value) / abs(target_value) <= MAX_RELATIVE_CHANGE
    return prediction.lower().strip() == target.lower().strip()


def relaxed_accuracy(prediction: str, answers: list[str], mode: str) -> float:
    """Relaxed accuracy of ``prediction`` against ``answers`` in ``mode`` (1.0 or 0.0)."""
    if mode in (OFFICIAL, LMMS_EVAL):
        return float(any(pix2struct_correct(answer, prediction) for answer in answers))
    if mode == VLMEVALKIT:
        stripped = prediction.strip()
        return float(any(pix2struct_correct(answer, stripped) for answer in answers))
    if mode in (MISTRAL, MISTRAL_EXPLICIT, MISTRAL_ANYWHERE):
        return mistral.score(prediction, answers, mode)
    if mode == DAMQA:
        cleaned = damqa.clean_prediction(prediction)
        golds = [gold for answer in answers for gold in damqa.csv_round_trip(answer)]
        return float(any(damqa_correct(gold, cleaned) for gold in golds))
    raise AssertionError(f"unhandled relaxed_accuracy mode {mode!r}")  # guarded by check_mode
