"""MMBench CircularEval: a question counts only if every circular shift of its options is right.

Reference (spec ``/work/shared/specs/eval.md`` §a.2): VLMEvalKit
``vlmeval/dataset/utils/multiple_choice.py`` (``mmbench_evaluate``/circular grouping) and lmms-eval
``tasks/mmbench``: rows whose ``index`` differ by a multiple of 1e6 are shifted copies of one
question (``index % 1_000_000`` is the question id). Per-row letters come from the rule matcher
(:func:`..mcq.extract_mcq`); the harnesses then ask an LLM judge and finally guess at random, we
count an unparsed row as wrong and report how many groups contain one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlmlab.protocol.errors import BadRequestError

CIRCULAR_OFFSET = 1_000_000  # MMBench TSV: shifted copies have index + k * 1e6


@dataclass(frozen=True)
class CircularResult:
    """Outcome of CircularEval.

    Attributes:
        accuracy: share of questions whose every rotation is right, in [0, 1].
        n_questions: number of question groups.
        n_correct: groups with every rotation right.
        n_with_unparsed: groups where at least one rotation had no parseable answer.
        group_correct: question id (``index % 1e6``) -> all rotations right.
        by_category: accuracy per ``category`` (taken from each group's first row), if given.
    """

    accuracy: float
    n_questions: int
    n_correct: int
    n_with_unparsed: int
    group_correct: dict[int, bool] = field(default_factory=dict)
    by_category: dict[str, float] = field(default_factory=dict)


def circular_eval(rows: Iterable[Mapping[str, Any]]) -> CircularResult:
    """Group rows by ``index % 1e6`` and require every rotation to be right.

    Args:
        rows: one mapping per row with ``index`` (int) and ``correct`` (bool, or None for an
            unparsed answer, which counts as wrong); optional ``category``.

    Returns:
        The :class:`CircularResult`.

    Raises:
        BadRequestError: for no rows, or a row without an integer ``index`` or ``correct``.
    """
    groups: dict[int, list[bool | None]] = {}
    categories: dict[int, str] = {}
    for row in rows:
        if "index" not in row or "correct" not in row:
            raise BadRequestError(
                f"circular_eval rows need 'index' and 'correct', got {sorted(row)}"
            )
        try:
            question = int(row["index"]) % CIRCULAR_OFFSET
        except (TypeError, ValueError) as err:
            raise BadRequestError(
                f"MMBench index must be an integer, got {row['index']!r}"
            ) from err
        groups.setdefault(question, []).append(row["correct"])
        if "category" in row and question not in categories:
            categories[question] = str(row["category"])
    if not groups:
        raise BadRequestError("circular_eval needs at least one row")
    group_correct = {q: all(v is True or v == 1 for v in values) for q, values in groups.items()}
    n_correct = sum(group_correct.values())
    by_category: dict[str, list[bool]] = {}
    for question, name in categories.items():
        by_category.setdefault(name, []).append(group_correct[question])
    return CircularResult(
        accuracy=n_correct / len(groups),
        n_questions=len(groups),
        n_correct=n_correct,
        n_with_unparsed=sum(any(v is None for v in values) for values in groups.values()),
        group_correct=group_correct,
        by_category={name: sum(v) / len(v) for name, v in by_category.items()},
    )
