"""ChartQAPro relaxed correctness: per list element, numbers within 5%, years and (sometimes)
fact-checking / multiple-choice answers exactly, other text by ANLS; averaged over elements.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.1, §a.3):

- ``official``: vis-nlp/ChartQAPro ``evaluate_predictions.py`` (``4b422c6``; stored copy
  ``8911d1b``). Gold = last answer; gold and prediction get ``.`` then newlines stripped from both
  ends (``str.strip(".").strip("\\n")``). A ``[...]`` gold is re-quoted and parsed as a list
  (``fix_list_format``), a prediction that is a Python list literal is split too; missing or extra
  elements score 0. Per element: ``Year`` flag ``YES`` -> lower/strip exact match; else, after
  stripping ``%``, two numbers must be within 5% (gold 0 needs exactly 0); else ``anls`` (PyPI)
  with threshold 0.5 on lower-cased strings. The script computes an exact-match flag for Fact
  Checking / Multi Choice and **never passes it**, so ``"Tru"`` vs ``"True"`` scores 0.75.
  Conversational questions use only the last turn's ``Year`` flag. Short flag lists are repeated.
- ``vlmevalkit``: ``vlmeval/dataset/utils/chartqapro.py``, a copy of the official script (same
  unused flag); identical results.
- ``lmms-eval``: ``lmms_eval/tasks/chartqapro/utils.py``: also strips whitespace first, passes the
  exact-match flag (``"Tru"`` vs ``"True"`` -> 0), and treats missing ``Year`` flags as ``NO``.
- ``damqa``: DAM-QA ``evaluation/metrics.py::evaluate_predictions_chartqapro``: Conversational
  rows are dropped from scoring (we return NaN), the gold is the CSV text of the whole answer
  list (so a list-valued answer ``"[a, b]"`` sits inside ``"['[a, b]']"`` and never splits into
  items), ``strip(".\\n")`` is applied to that text and to the prediction, the exact-match flag is
  passed, and the text branch uses DAM-QA's own ANLS (punctuation and number-word normalisation,
  NL 0.5 kept) instead of the ``anls`` package.
"""

from __future__ import annotations

import math
import re
from typing import Any

from vlmlab.eval.metrics._text import literal_eval_quiet
from vlmlab.eval.metrics.anls import damqa_anls, pypi_anls
from vlmlab.eval.metrics.modes import DAMQA, LMMS_EVAL, OFFICIAL, VLMEVALKIT
from vlmlab.protocol.errors import BadRequestError

MAX_RELATIVE_CHANGE = 0.05  # evaluate_predictions.py evaluate_single_answer default
EXACT_TYPES = ("Fact Checking", "Multi Choice")
_LIST = re.compile(r"^\[(.*)\]$")
_UNQUOTED_ITEM = re.compile(r"(?<!['\w])(\w[^,]*?)(?!['\w])")


def fix_list_format(item: str) -> Any:
    """``fix_list_format``: quote bare items of a ``[...]`` string and parse it as a list.

    Returns the parsed list, or ``item`` unchanged when it is no list or does not parse. The
    official script only catches SyntaxError/ValueError (other parse errors crash it, DAM-QA's
    copy catches everything); we return ``item`` for any parse error.
    """
    match = _LIST.match(item.strip())
    if not match:
        return item
    corrected = _UNQUOTED_ITEM.sub(r"'\1'", match.group(1))
    try:
        return literal_eval_quiet(f"[{corrected}]")
    except Exception:  # noqa: BLE001 - see docstring
        return item


def parse_to_list(text: str) -> list[str] | None:
    """``parse_to_list``: the items of a Python list literal, stripped of spaces and quotes."""
    try:
        parsed = literal_eval_quiet(text)
    except Exception:  # noqa: BLE001 - the reference catches everything
        return None
    if isinstance(parsed, list):
        return [str(x).strip(" '") for x in parsed]
    return None


def _to_float(text: str) -> float | None:
    try:
        return float(text.strip().strip("%"))
    except ValueError:
        return None


def _single_answer(target: str, prediction: str, damqa_text: bool) -> float:
    """``evaluate_single_answer``: numbers within 5% (gold 0 needs 0), else ANLS."""
    t = target.strip().strip("%").strip()
    p = prediction.strip().strip("%").strip()
    t_value, p_value = _to_float(t), _to_float(p)
    if t_value is not None and p_value is not None:
        if t_value == 0.0:
            return 1.0 if p_value == 0.0 else 0.0
        return 1.0 if abs(p_value - t_value) / abs(t_value) <= MAX_RELATIVE_CHANGE else 0.0
    if damqa_text:
        return damqa_anls(p.lower(), [t.lower()])
    return pypi_anls(p.lower(), [t.lower()])


def _is_yes(flag: object) -> bool:
    return isinstance(flag, str) and flag.upper() == "YES"


def relaxed_correctness_chartqapro(
    target: str,
    prediction: str,
    year_flags: list[str] | None,
    always_use_exact_match: bool,
    mode: str,
) -> float:
    """``relaxed_correctness_chartqapro`` of the mode's script, averaged over list elements."""
    fixed = fix_list_format(target)
    t_list = parse_to_list(str(fixed)) or [str(target)]
    p_list = parse_to_list(str(prediction)) or [str(prediction)]
    n = len(t_list)
    if mode == LMMS_EVAL:
        if year_flags is None:
            year_flags = ["NO"] * max(n, len(p_list))
        elif len(year_flags) < n:
            year_flags = list(year_flags) * n
    elif year_flags and len(year_flags) < n:
        year_flags = list(year_flags) * n
    scores = []
    for idx in range(max(len(t_list), len(p_list))):
        if idx >= len(t_list) or idx >= len(p_list):
            scores.append(0.0)  # a missing or an extra element
            continue
        t_item, p_item = t_list[idx], p_list[idx]
        flag = year_flags[idx] if year_flags and idx < len(year_flags) else "NO"
        if _is_yes(flag) or always_use_exact_match:
            scores.append(1.0 if t_item.strip().lower() == p_item.strip().lower() else 0.0)
        else:
            scores.append(_single_answer(t_item, p_item, damqa_text=mode == DAMQA))
    return sum(scores) / len(scores) if scores else 0.0


def chartqapro(
    prediction: str,
    answers: list[str],
    mode: str,
    question_type: str = "Factoid",
    year: list[str] | str | None = None,
) -> float:
    """ChartQAPro score of one row.

    Args:
        prediction: the model's answer.
        answers: the row's ``Answer`` list (one per turn; the last one is the gold).
        mode: ``official``, ``vlmevalkit``, ``lmms-eval`` or ``damqa``.
        question_type: the row's ``Question Type`` (``Factoid``, ``Conversational``,
            ``Fact Checking``, ``Multi Choice``, ``Hypothetical``).
        year: the row's ``Year`` flags (``YES``/``NO`` per answer element, or per turn for
            Conversational); None means all ``NO``.

    Returns:
        The score in [0, 1], or NaN for a Conversational row in ``damqa`` mode (DAM-QA leaves
        those rows out of its mean; callers must skip NaN).

    Raises:
        BadRequestError: if a ``year`` flag is not a string.
    """
    flags = [year] if isinstance(year, str) else (list(year) if year is not None else None)
    if flags is not None and not all(isinstance(f, str) for f in flags):
        raise BadRequestError(
            f"ChartQAPro year flags must be strings like 'YES'/'NO', got {year!r}"
        )
    if mode == DAMQA:
        if question_type == "Conversational":
            return math.nan
        # DAM-QA's CSV holds str(answer list); strip(".\n") removes both characters in any order.
        gold = str(list(answers)).strip(".\n")
        pred = prediction.strip(".\n")
        exact = question_type in EXACT_TYPES
        return relaxed_correctness_chartqapro(gold, pred, flags, exact, mode)
    if question_type == "Conversational" and flags:
        flags = flags[-1:]
    if mode in (OFFICIAL, VLMEVALKIT):
        gold = answers[-1].strip(".").strip("\n")
        pred = prediction.strip(".").strip("\n")
        # The official script never passes its Fact Checking / Multi Choice exact-match flag.
        return relaxed_correctness_chartqapro(gold, pred, flags or ["NO"], False, mode)
    if mode == LMMS_EVAL:
        gold = str(answers[-1]).strip().strip(".").strip("\n")
        pred = prediction.strip().strip(".").strip("\n")
        exact = question_type in EXACT_TYPES
        return relaxed_correctness_chartqapro(gold, pred, flags, exact, mode)
    raise AssertionError(f"unhandled chartqapro mode {mode!r}")  # guarded by check_mode
