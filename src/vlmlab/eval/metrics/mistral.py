"""mistral-evals' answer extraction and relaxed correctness (``mistral*`` modes).

Reference: mistralai/mistral-evals ``eval/metrics.py`` (snapshot ``d61811f``; stored copy read at
``70eecd8``), classes ``RelaxedCorrectness``, ``ExplicitPromptRelaxedCorrectness`` and
``AnywhereInAnswerRelaxedCorrectness``; ChartQA, MathVista and MMMU use the last two.

- ``mistral``: ``RelaxedCorrectness._relaxed_correctness`` on the prediction as given. Texts with a
  digit lose trailing punctuation (except ``%``), commas and ``$``; texts without one only lose a
  pair of outer quotes (so ``"yes."`` != ``"Yes"``). Numbers compare within 5% (denominator
  ``max(|t|, 1e-10)``, so target 0 needs an exact 0), and when either side ends in ``%`` also as
  ``value/100`` on either side (``"5%"`` ~ ``"5"`` ~ ``"0.05"``). A single-letter target is a
  multiple-choice letter: the prediction's first character decides.
- ``mistral-explicit``: take the first non-empty line after the *last* ``answer:`` (any case, so
  ``Final Answer:`` qualifies; ``**Answer:**`` markdown is unwrapped first), drop ``* _ [ ] ( )``,
  then score as ``mistral``. No marker, or an empty answer line, scores 0.
- ``mistral-anywhere``: as explicit; without a marker it searches the raw generation for each
  reference: a number (as int when integral) formatted with thousands commas, plain, or with
  ``%``; else the patterns ``is X``, ``was X``, `` X.``, ``are X``, ``\\n\\nX``, which are
  lower-cased while the generation is not (so ``"... is Paris"`` misses reference ``Paris``, and a
  reference ``A`` matches any ``"... is a ..."``). Overly generous by the authors' own note.
"""

from __future__ import annotations

import re
import string

from vlmlab.eval.metrics._text import strip_one_quote_pair
from vlmlab.eval.metrics.modes import MISTRAL, MISTRAL_ANYWHERE, MISTRAL_EXPLICIT, require_mode

_MARKDOWN_ANSWER = re.compile(r"([aA]nswer)\**:\**")
_MARKDOWN_CHARS = re.compile(r"[*_\[\]\(\)]")
_MARKER = "answer:"


def remove_end_punctuation(text: str) -> str:
    """``_remove_end_punctuation``: drop trailing ASCII punctuation/whitespace, stop at ``%``."""
    while text and (text[-1] in string.punctuation or text[-1].isspace()) and text[-1] != "%":
        text = text[:-1]
    return text


def preprocess(text: str) -> str:
    """``_preprocess_text``: texts with a digit lose end punctuation, commas and ``$``; others
    only a pair of outer quotes."""
    if not any(char.isdigit() for char in text):
        return strip_one_quote_pair(text)
    return remove_end_punctuation(text).replace(",", "").replace("$", "")


def _to_float(text: str) -> tuple[float | None, bool]:
    text = text.strip()
    is_percent = text.endswith("%")
    try:
        return float(text.rstrip("%")), is_percent
    except ValueError:
        return None, False


def _numeric_match(prediction: float, target: float, tolerance: float) -> float:
    return 1.0 if abs(prediction - target) / max(abs(target), 1e-10) <= tolerance else 0.0


def relaxed_correctness(prediction: str, references: list[str], tolerance: float = 0.05) -> float:
    """mistral-evals ``RelaxedCorrectness._relaxed_correctness``: best score over ``references``.

    Args:
        prediction: the (already extracted) answer text.
        references: gold answers; must not be empty.
        tolerance: maximum relative change for numbers.

    Returns:
        1.0 or 0.0.
    """
    prediction = preprocess(prediction)
    pred_value, pred_percent = _to_float(prediction)
    values = []
    for target in references:
        target = preprocess(target)
        target_value, target_percent = _to_float(target)
        if pred_value is not None and target_value is not None:
            value = _numeric_match(pred_value, target_value, tolerance)
            if value != 1.0 and (pred_percent or target_percent):
                as_decimal_pred = pred_value / 100 if pred_percent else pred_value
                as_decimal_target = target_value / 100 if target_percent else target_value
                value = max(
                    value,
                    _numeric_match(as_decimal_pred, target_value, tolerance),
                    _numeric_match(pred_value, as_decimal_target, tolerance),
                )
        elif target.isalpha() and len(target) == 1 and len(prediction) > 0:
            # A one-letter target is read as a multiple-choice option letter.
            value = 1.0 if prediction[0].lower() == target.lower() else 0.0
        else:
            value = 1.0 if prediction.lower() == target.lower() else 0.0
        values.append(value)
    return max(values)


def explicit_final_answer(generation: str) -> str:
    """``ExplicitPromptRelaxedCorrectness._get_final_answer``; ``""`` when there is no answer.

    The marker is searched in the lower-cased text but sliced from the original, exactly like the
    reference (a character whose lower-case form is longer shifts the slice).
    """
    generation = _MARKDOWN_ANSWER.sub(r"\1:", generation)
    index = generation.lower().rfind(_MARKER)
    if index == -1:
        return ""
    lines = generation[index + len(_MARKER) :].split("\n")
    answer = next((line.strip() for line in lines if line.strip()), "")
    return _MARKDOWN_CHARS.sub("", answer)


def _as_number(reference: str) -> int | float | None:
    try:
        number = float(reference)
        if int(number) == number:
            return int(number)
        return number
    except (ValueError, OverflowError):
        # OverflowError (``"inf"``) crashes the reference; we treat it like text instead.
        return None


def anywhere_match(generation: str, references: list[str]) -> str | None:
    """``AnywhereInAnswerRelaxedCorrectness``'s fallback: the reference found in ``generation``.

    Walks the references in order like the reference loop: a numeric reference is looked for
    with thousands commas, plainly, then with ``%``; the first non-numeric reference triggers a
    search for the text patterns of *all* references.

    Returns:
        The matching reference (for text patterns: the first reference whose pattern occurs), or
        None when nothing occurs.
    """
    for reference in references:
        number = _as_number(reference)
        if number is not None:
            if format(number, ",") in generation or str(number) in generation:
                return reference
            if str(number) + "%" in generation:
                return reference
            continue
        for candidate_ref in references:
            patterns = (
                f"is {candidate_ref}",
                f"was {candidate_ref}",
                f" {candidate_ref}.",
                f"are {candidate_ref}",
                f"\n\n{candidate_ref}",
            )
            # The reference lower-cases its patterns but not the generation.
            if any(pattern.lower() in generation for pattern in patterns):
                return candidate_ref
    return None


def final_answer(
    text: str, mode: str = MISTRAL_EXPLICIT, answers: list[str] | None = None
) -> str | None:
    """The final answer of a "Final Answer:" style generation, as mistral-evals reads it.

    Args:
        text: the raw generation.
        mode: ``mistral-explicit`` (only text after the last ``answer:`` marker, any case) or
            ``mistral-anywhere`` (the same, else the reference found anywhere by the fallback;
            needs ``answers``).
        answers: gold answers, used only by the ``mistral-anywhere`` fallback.

    Returns:
        The answer text, or None when nothing could be extracted (the reference scores 0).

    Raises:
        ConfigError: for any other mode.
    """
    require_mode(mode, (MISTRAL_EXPLICIT, MISTRAL_ANYWHERE), "final_answer")
    explicit = explicit_final_answer(text)
    if explicit:
        return explicit
    if mode == MISTRAL_ANYWHERE and answers:
        return anywhere_match(text, list(answers))
    return None


def score(prediction: str, references: list[str], mode: str) -> float:
    """Relaxed correctness in one of the three mistral modes (see the module docstring)."""
    if mode == MISTRAL:
        return relaxed_correctness(prediction, references)
    explicit = explicit_final_answer(prediction)
    if explicit:
        return relaxed_correctness(explicit, references)
    if mode == MISTRAL_ANYWHERE and anywhere_match(prediction, references) is not None:
        return 1.0
    return 0.0
