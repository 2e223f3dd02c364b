"""Exact match, as the harnesses define it (max over the gold answers).

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.3):

- ``lmms-eval``: ``lmms_eval/api/metrics.py::exact_match_hf_evaluate`` with ``ignore_case`` and
  ``ignore_punctuation`` (the task YAML flags), one prediction/reference pair per call. It works on
  numpy unicode arrays: trailing NUL characters vanish (numpy's ``str_`` drops them),
  ``np.char.lower`` lower-cases into an array of the *input* width (numpy 1.x), so a character whose
  lower-case form is longer is cut (``"İ"`` -> ``"i"``), then every ASCII punctuation character is
  deleted (``"3.5"`` == ``"35"``, ``"-5"`` == ``"5"``). Whitespace is not stripped.
- ``vlmevalkit``: ``vlmeval/dataset/utils/vqa_eval.py::process_line`` method ``accuracy``:
  ``gt.strip().lower() == pred.strip().lower()``.
- ``official``: no benchmark ships an official exact-match scorer; we use the plain rule
  (strip both sides, Python ``lower()``, compare), which is VLMEvalKit's.
"""

from __future__ import annotations

import string

from vlmlab.eval.metrics.modes import LMMS_EVAL, OFFICIAL, VLMEVALKIT

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def numpy_lower(text: str) -> str:
    """``np.char.lower`` on a one-element array holding ``text`` (numpy 1.x semantics).

    The result keeps the array's item width (the input length, trailing NULs included) and numpy
    hides trailing NULs on read-out.
    """
    width = len(text)
    return text.rstrip("\x00").lower()[:width].rstrip("\x00")


def lmms_eval_normalize(text: str) -> str:
    """What ``exact_match_hf_evaluate(ignore_case=True, ignore_punctuation=True)`` compares."""
    return numpy_lower(text).translate(_DELETE_PUNCTUATION).rstrip("\x00")


def exact_match(prediction: str, answers: list[str], mode: str) -> float:
    """1.0 when ``prediction`` equals any of ``answers`` under ``mode``'s rule, else 0.0."""
    if mode == LMMS_EVAL:
        pred = lmms_eval_normalize(prediction)
        return float(any(lmms_eval_normalize(a) == pred for a in answers))
    if mode in (OFFICIAL, VLMEVALKIT):
        pred = prediction.strip().lower()
        return float(any(a.strip().lower() == pred for a in answers))
    raise AssertionError(f"unhandled exact_match mode {mode!r}")  # guarded by check_mode
