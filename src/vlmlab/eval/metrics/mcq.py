"""Multiple-choice answer extraction: which option letter a free-form reply picks.

Every extractor returns the letter, or None when it cannot tell. The harnesses then guess (MMMU
picks a random letter, MMBench asks a judge and finally guesses, VLMEvalKit writes ``Z``); we never
guess: callers count None as wrong and report it as *unparsed*.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.2, §c.15):

- ``official``: the MMMU parser (``MMMU/eval/utils/eval_utils.py::parse_multi_choice_response`` as
  copied in ``lmms_eval/tasks/mmmu/utils.py``). Strip ``, . ! ? ; : '`` from both ends, pad with
  spaces, then look for ``(A)``; else ``A `` (letter + space, so ``"DATA "`` counts for A); else
  ``A.``; else, only for replies of more than 5 words, an option's text (case-insensitive). Several
  candidates: the one occurring last wins (``rfind``). Nothing: the official code picks at random.
- ``lmms-eval``: ``lmms_eval/tasks/_task_utils/mcq_extract.py::extract_mcq_answer`` (RealWorldQA):
  candidates with priorities start-letter > end-letter > answer phrase ("the answer is", "i
  choose", ...) > ``(A)`` > ``A.`` > ``A:`` > ``A)`` > ``A `` and, only when none of those
  matched, **any occurrence of the capital letter** (``"Choose the option"`` -> C, ``"Answer: (c)
  rabbit"`` -> A); highest priority then latest position wins. Letters A-H are searched (its
  default); more when a question has more options.
- ``vlmevalkit``: ``vlmeval/utils/matching_util.py::can_infer`` at open-compass/VLMEvalKit
  ``e8e78f05f3080fe28154f2130321f17951c3be94`` (2026-08-18, the spec snapshot; the file last
  changed in ``2cf2a36c``, 2026-06-25). A reply containing "Failed to obtain answer via API" goes
  straight to the text rule; one containing a refusal sentence is ``Z``. Otherwise ``.()[],:;!*#{}``
  become spaces and the whitespace tokens are searched for option letters: exactly one letter
  present counts only if its first occurrence is among the last four tokens (``"A cat"`` -> A,
  ``"A cat is sitting on the mat"`` -> not from the letter); no letter but a ``Z`` token is ``Z``.
  Then PR #1552's case-insensitive ``(correct) answer is **X**`` for X in A-D, first match only,
  with no boundary after X (``"The answer is dog"`` -> D, ``"... is approximately 3.14"`` -> A).
  Last, the text rule: unless the lower-cased reply is longer than twice the summed length of the
  option texts, exactly one option text contained in it (case-insensitive). With VLMEvalKit's
  ``VERBOSE`` environment variable set (any non-empty value; nothing in VLMEvalKit sets it), a
  single letter found among more than three tokens one of which is ``A`` is read as a possible
  article: the letter rules stop and only the text rule decides (``verbose=True`` here). A refusal
  (``Z``) and no match are None in :func:`extract_mcq`.
- ``mistral`` / ``mistral-explicit``: mistral-evals compares the first character of the
  (extracted, see :mod:`.mistral`) answer with the gold letter; we return that character
  upper-cased if it is an option letter. ``mistral-anywhere`` needs the gold answer, so it is only
  available through ``score("mcq", ...)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlmlab.eval.metrics import mistral
from vlmlab.eval.metrics.modes import (
    LMMS_EVAL,
    MISTRAL,
    MISTRAL_ANYWHERE,
    MISTRAL_EXPLICIT,
    OFFICIAL,
    VLMEVALKIT,
    require_mode,
)
from vlmlab.protocol.errors import BadRequestError

EXTRACT_MODES = (OFFICIAL, LMMS_EVAL, VLMEVALKIT, MISTRAL, MISTRAL_EXPLICIT)


def option_letters(count: int) -> list[str]:
    """``["A", "B", ...]`` for ``count`` options."""
    return [chr(ord("A") + i) for i in range(count)]


# ----------------------------------------------------------------------------- official (MMMU)


def mmmu_parse(response: str, choices: Sequence[str]) -> str | None:
    """MMMU ``parse_multi_choice_response`` without its random fallback (None instead)."""
    letters = option_letters(len(choices))
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "  # pad so a letter at either end still has a neighbour

    with_brackets = False
    from_text = False
    candidates = [c for c in letters if f"({c})" in response]
    if candidates:
        with_brackets = True
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        lowered = response.lower()
        candidates = [c for c, text in zip(letters, choices) if text.lower() in lowered]
        from_text = bool(candidates)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if from_text:
        positions = [response.lower().rfind(choices[letters.index(c)].lower()) for c in candidates]
    elif with_brackets:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        # The reference looks for " A " here even when the candidate came from "A " or "A.";
        # a -1 then loses to any real position, and ties go to the first candidate (argmax).
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


# ----------------------------------------------------------------------------- lmms-eval

_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is",
    "the best answer is", "best answer is", "the correct option is", "correct option is",
    "the best option is", "best option is", "the choice is", "choice is",
    "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选",
    "答えは",
)  # fmt: skip  # mcq_extract.py _ANSWER_PHRASES, in order
# mcq_extract.py _FORMAT_PRIORITY
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
             "right_paren": 3, "space": 2, "fallback": 0}  # fmt: skip
_DEFAULT_LETTERS = option_letters(8)  # mcq_extract.py _DEFAULT_CHOICES: A-H


def lmms_eval_extract(response: str, letters: Sequence[str] | None = None) -> str | None:
    """lmms-eval ``extract_mcq_answer(response, choices=letters)``; None for its ``""``."""
    if not response or not response.strip():
        return None
    letters = list(letters) if letters else _DEFAULT_LETTERS
    text = response.strip()
    for char in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(char)
    text = " " + text + " "

    found: list[tuple[str, int, str]] = []
    for fmt, template in (
        ("parentheses", "({})"),
        ("period", "{}."),
        ("colon", "{}:"),
        ("right_paren", "{})"),
        ("space", "{} "),
    ):
        for letter in letters:
            token = template.format(letter)
            if token in text:
                found.append((letter, text.rfind(token), fmt))
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        index = lowered.find(phrase)
        if index != -1:
            after = index + len(phrase)
            for letter in letters:
                # The reference searches the original text (case kept) for the letter.
                position = text.find(letter, after)
                if position != -1:
                    found.append((letter, position, "phrase"))
    stripped = text.strip()
    for letter in letters:
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            found.append((letter, 0, "start"))
    for letter in letters:
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            found.append((letter, len(text) - 1, "end"))
    if not found:
        # Last resort: any occurrence of the capital letter, even inside a word.
        found = [(c, text.rfind(c), "fallback") for c in letters if c in text]
    if not found:
        return None
    return max(found, key=lambda item: (_PRIORITY[item[2]], item[1]))[0]


# ----------------------------------------------------------------------------- VLMEvalKit

_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)  # matching_util.py can_infer_option: reject_to_answer
_SPLIT_CHARS = ".()[],:;!*#{}"  # replaced by spaces before tokenising; quotes and <> stay
# PR #1552 (_VERBOSE_ANSWER_RE): letters A-D only, any case, nothing required after the letter.
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)


def _vlmevalkit_option(answer: str, letters: Sequence[str], verbose: bool = False) -> str | None:
    """``can_infer_option``: a letter, ``"Z"`` (refusal or a lone ``Z`` token) or None."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    spaced = answer
    for char in _SPLIT_CHARS:
        spaced = spaced.replace(char, " ")
    tokens = spaced.split()
    present = [letter for letter in letters if letter in tokens]
    if len(present) == 1:
        if verbose and "A" in tokens and len(tokens) > 3:
            # Under VERBOSE the reference gives up here ("A" may be the article), skipping the
            # "answer is" pattern below; only the option texts can still decide.
            return None
        # PR #1175: only a letter whose first occurrence is among the last four tokens counts.
        if tokens.index(present[0]) > len(tokens) - 5:
            return present[0]
    elif not present and "Z" in tokens:
        return "Z"
    match = _ANSWER_IS.search(answer)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def _vlmevalkit_text(answer: str, choices: Sequence[str]) -> str | None:
    """``can_infer_text``: the one option whose text the reply contains, ignoring case."""
    lowered = answer.lower()
    texts = [str(text) for text in choices]
    # The reference measures the lower-cased reply against the option texts as given.
    if len(lowered) > 2 * sum(len(text) for text in texts):
        return None
    letters = option_letters(len(texts))
    hits = [letter for letter, text in zip(letters, texts) if text.lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def vlmevalkit_can_infer(
    answer: str, choices: Sequence[str], *, verbose: bool = False
) -> str | None:
    """VLMEvalKit ``can_infer(answer, choices)``: letter, ``"Z"`` (refusal) or None.

    Args:
        answer: the model reply (anything; it is passed through ``str`` like the reference does).
        choices: the option texts for A, B, C, ...
        verbose: behave as VLMEvalKit does with its ``VERBOSE`` environment variable set: a lone
            letter among more than three tokens, one of them ``A``, is not read as a letter.

    Returns:
        The option letter, ``"Z"`` for a refusal or a lone ``Z`` token, or None (the reference's
        ``False``).
    """
    answer = str(answer)
    letters = option_letters(len(choices))
    return _vlmevalkit_option(answer, letters, verbose) or _vlmevalkit_text(answer, choices)


# ----------------------------------------------------------------------------- mistral


def mistral_letter(answer: str, letters: Sequence[str]) -> str | None:
    """The option letter mistral-evals compares: the first character after its preprocessing."""
    text = mistral.preprocess(answer)
    if not text:
        return None
    first = text[0].upper()
    return first if first in letters else None


# ----------------------------------------------------------------------------- public


def extract_mcq(prediction: str, choices: Sequence[str], mode: str = LMMS_EVAL) -> str | None:
    """The option letter ``prediction`` picks, as ``mode``'s harness reads it.

    Args:
        prediction: the raw model reply.
        choices: the option texts for A, B, C, ... (used for text matching and the letter range).
        mode: ``official`` (MMMU parser), ``lmms-eval``, ``vlmevalkit``, ``mistral`` (first
            character of the reply) or ``mistral-explicit`` (first character after ``Answer:``).
            Without choices, ``lmms-eval`` and the mistral modes consider the letters A-H.

    Returns:
        The letter, or None when the reply cannot be parsed (never a random guess; a VLMEvalKit
        refusal is None too).

    Raises:
        ConfigError: for an unknown mode (``mistral-anywhere`` needs the gold letter: use
            ``score("mcq", ...)``).
        BadRequestError: when ``official`` or ``vlmevalkit`` get no choices.
    """
    require_mode(mode, EXTRACT_MODES, "extract_mcq")
    if not choices and mode in (OFFICIAL, VLMEVALKIT):
        raise BadRequestError(
            f"extract_mcq in mode {mode!r} needs the option texts: pass choices=[text of A, ...]"
        )
    letters = option_letters(len(choices)) if choices else _DEFAULT_LETTERS
    if mode == OFFICIAL:
        return mmmu_parse(prediction, choices)
    if mode == LMMS_EVAL:
        return lmms_eval_extract(prediction, letters if len(letters) > 8 else None)
    if mode == VLMEVALKIT:
        letter = vlmevalkit_can_infer(prediction, choices)
        return None if letter == "Z" else letter
    if mode == MISTRAL_EXPLICIT:
        prediction = mistral.explicit_final_answer(prediction)
    return mistral_letter(prediction, letters)


def mcq(prediction: str, answers: list[str], mode: str, choices: Sequence[str] = ()) -> float:
    """1.0 when the extracted letter equals ``answers[0]`` (the gold letter), else 0.0."""
    gold = answers[0]
    if mode in (MISTRAL, MISTRAL_EXPLICIT, MISTRAL_ANYWHERE):
        # mistral-evals scores MMMU options with its relaxed metric against the gold letter.
        return mistral.score(prediction, [gold], mode)
    return 1.0 if extract_mcq(prediction, choices, mode) == gold else 0.0
