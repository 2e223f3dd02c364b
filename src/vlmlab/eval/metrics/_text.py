"""Small text helpers shared by several metrics."""

from __future__ import annotations

import ast
import warnings
from typing import Any

from rapidfuzz.distance import Levenshtein

# The VQA number-word table: GT-Vision-Lab vqaEval.py ``manualMap`` (same in lmms-eval's
# EvalAIAnswerProcessor.NUMBER_MAP, VLMEvalKit and DAM-QA's MANUAL_MAP). Iteration order matters
# for DAM-QA's word-by-word substitutions.
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}


def levenshtein(a: str, b: str) -> int:
    """Unit-cost edit distance between two strings, counted in code points.

    Every reference harness uses the same unit-cost insert/delete/substitute distance on Python
    ``str`` (code points), which is what ``rapidfuzz`` computes (no processor, no score cutoff).
    """
    return Levenshtein.distance(a, b)


def strip_one_quote_pair(text: str) -> str:
    """Drop one pair of matching outer quotes (``"x"`` or ``'x'``), else return ``text``.

    mistral-evals ``eval/metrics.py::_normalize_string``. A lone quote counts as a pair, so
    ``'"'`` becomes ``''``, as in the reference.
    """
    if (text.startswith('"') and text.endswith('"')) or (
        text.startswith("'") and text.endswith("'")
    ):
        return text[1:-1]
    return text


def literal_eval_quiet(text: str) -> Any:
    """``ast.literal_eval`` without the SyntaxWarnings Python prints for inputs like ``"2.x"``.

    The reference harnesses call ``ast.literal_eval`` on model output and gold answers; the
    warnings they would print are noise, the value (or exception) is what matters.

    Raises:
        Whatever ``ast.literal_eval`` raises (SyntaxError, ValueError, TypeError, ...).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.literal_eval(text)
