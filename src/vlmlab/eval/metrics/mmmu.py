"""MMMU open (non-multiple-choice) answers.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.2, §c.4, §c.5):

- ``official``: ``MMMU/eval/utils/eval_utils.py`` (also copied into ``lmms_eval/tasks/mmmu/
  utils.py``): ``parse_open_response`` lower-cases the reply, splits it into sentences, keeps the
  shortest tail after an indicator word (``could be``, ``so``, ``is``, ``thus``, ``therefore``,
  ``final``, ``answer``, ``result``; and ``=`` in the last sentence), adds every number found in
  those tails (comma-grouped, scientific, plain), and normalises each candidate (numbers ->
  float rounded to 2 dp, text -> lower-case; a one-character text ``x`` becomes ``" x"``/``"x "``).
  ``eval_open`` accepts when a text candidate *contains* a normalised gold string, or a number
  candidate *equals* a normalised gold number.
- ``lmms-eval``: the snapshot's ``mmmu_process_results`` (bug from PR #724, fixed by PR #1471 after
  the snapshot, issue #1436): the candidate list is collapsed to ``str(candidates[0])`` and
  ``eval_open`` then iterates that string *character by character*, so only an empty gold answer
  can ever match: almost every open question scores 0. (The reference takes ``[0]`` of a set,
  whose order varies; the outcome does not depend on it.)
- ``vlmevalkit``: ``MMMU_preproc`` turns the open question into a fake MCQ after inference
  (A = the gold answer, B = ``"Other Answers"``) and the letter matcher decides (issues #110,
  #1617): correct when :func:`..mcq.vlmevalkit_can_infer` reads A.
- ``mistral-explicit`` / ``mistral-anywhere``: mistral-evals scores MMMU with its relaxed metric
  (see :mod:`.mistral`) against the gold answer list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlmlab.eval.metrics import mistral
from vlmlab.eval.metrics.mcq import vlmevalkit_can_infer
from vlmlab.eval.metrics.modes import (
    LMMS_EVAL,
    MISTRAL_ANYWHERE,
    MISTRAL_EXPLICIT,
    OFFICIAL,
    VLMEVALKIT,
    require_mode,
)

OPEN_MODES = (OFFICIAL, LMMS_EVAL, VLMEVALKIT, MISTRAL_EXPLICIT, MISTRAL_ANYWHERE)
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = (":", ",", ".", "!", "?", ";", ":", "'")
_SENTENCE_SPLIT = re.compile(r"\.\s(?=[A-Z])|\n")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")

Candidate = str | float


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list[Candidate]:
    """``normalize_str``: a number -> [float rounded to 2 dp]; text -> [lower-case text], a
    one-character text padded on either side to avoid trivial substring matches."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


def extract_numbers(text: str) -> list[str]:
    """``extract_numbers``: comma-grouped, then scientific, then plain numbers."""
    return (
        _NUMBER_WITH_COMMAS.findall(text)
        + _NUMBER_SCIENTIFIC.findall(text)
        + _NUMBER_SIMPLE.findall(text)
    )


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The reference splits the *lower-cased* text on ". " + capital letter, which therefore
    # never matches: only newlines split sentences.
    sentences = _SENTENCE_SPLIT.split(response)
    indicators = list(_INDICATORS)
    keys = []
    for index, sentence in enumerate(sentences):
        if index == len(sentences) - 1:
            indicators.append("=")
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[Candidate]:
    """``parse_open_response``: normalised answer candidates, duplicates removed.

    The reference removes duplicates with ``list(set(...))``; we keep first-seen order instead
    (same members, deterministic order).
    """
    keys = _key_subresponses(response)
    raw: list[str] = list(keys)
    for key in keys:
        raw.extend(extract_numbers(key))
    candidates: list[Candidate] = []
    for item in raw:
        candidates.extend(normalize_str(item))
    return list(dict.fromkeys(candidates))


def eval_open(answers: Sequence[str], candidates: Sequence[Candidate] | str) -> bool:
    """``eval_open``: does any candidate match any gold answer?

    ``candidates`` may be a string (the lmms-eval bug): it is then iterated character by
    character, exactly like the reference does.
    """
    gold: list[Candidate] = []
    for answer in answers:
        gold.extend(normalize_str(answer))
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in gold):
                return True
        elif candidate in gold:
            return True
    return False


def mmmu_open_match(prediction: str, answers: Sequence[str], mode: str = OFFICIAL) -> bool:
    """Is ``prediction`` a correct answer to an MMMU open question, as ``mode`` scores it?

    Args:
        prediction: the raw model reply.
        answers: the gold answer(s) (MMMU stores a string, sometimes a list literal; pass the list).
        mode: ``official``, ``lmms-eval``, ``vlmevalkit``, ``mistral-explicit`` or
            ``mistral-anywhere``.

    Returns:
        True when the reply counts as correct.

    Raises:
        ConfigError: for any other mode.
    """
    require_mode(mode, OPEN_MODES, "mmmu_open_match")
    answers = list(answers)
    if mode == OFFICIAL:
        return eval_open(answers, parse_open_response(prediction))
    if mode == LMMS_EVAL:
        candidates = parse_open_response(prediction)
        collapsed = str(candidates[0]) if candidates else ""
        return eval_open(answers, collapsed)
    if mode == VLMEVALKIT:
        return vlmevalkit_can_infer(prediction, [answers[0], "Other Answers"]) == "A"
    return mistral.score(prediction, answers, mode) == 1.0
