"""HallusionBench: yes/no extraction and the three accuracies aAcc, fAcc, qAcc.

References (spec ``/work/shared/specs/eval.md`` §a.2): the official HallusionBench evaluation
(also followed by lmms-eval's ``hallusion_bench/evaluate_hb.py``) groups rows by
``category_subcategory_set_id_figure_id`` for fAcc and ``category_subcategory_set_id_question_id``
for qAcc; VLMEvalKit ``vlmeval/dataset/utils/yorn.py::Hallusion_rating`` computes the same three
numbers (keyed on ``l2-category``, which is the subcategory). The answer extraction here is
VLMEvalKit's ``YOrN_Extraction`` (yes xor no among the words); the official GPT judge is not run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from vlmlab.eval.metrics.vqa import vlmevalkit_punctuation
from vlmlab.protocol.errors import BadRequestError


def extract_yes_no(prediction: str) -> str | None:
    """VLMEvalKit ``YOrN_Extraction``: ``"yes"``/``"no"`` when exactly one of the words occurs.

    The reply is lower-cased and passed through VLMEvalKit's ``process_punctuation`` before
    splitting into words; both or neither -> None (VLMEvalKit's ``"Unknown"``).
    """
    words = vlmevalkit_punctuation(prediction.lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "yes"
    if has_no and not has_yes:
        return "no"
    return None


def _field(row: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in row:
            return row[name]
    raise BadRequestError(f"HallusionBench row needs one of {', '.join(names)}: got {sorted(row)}")


def hallusion_scores(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """aAcc, fAcc and qAcc over scored HallusionBench rows, each in [0, 1].

    Args:
        rows: one mapping per question with ``correct`` (bool; an unparsed answer is False),
            ``category``, ``subcategory`` (or ``l2-category``), ``set_id``, ``figure_id`` and
            ``question_id``.

    Returns:
        ``{"aAcc": per-question accuracy, "fAcc": share of figures whose questions are all
        right, "qAcc": share of questions right on every figure variant}``.

    Raises:
        BadRequestError: for an empty input or a row missing a key.
    """
    per_figure: dict[str, list[bool]] = defaultdict(list)
    per_question: dict[str, list[bool]] = defaultdict(list)
    correct: list[bool] = []
    for row in rows:
        ok = bool(_field(row, "correct"))
        category = _field(row, "category")
        subcategory = _field(row, "subcategory", "l2-category")
        set_id = _field(row, "set_id")
        prefix = f"{category}_{subcategory}_{set_id}"
        per_figure[f"{prefix}_{_field(row, 'figure_id')}"].append(ok)
        per_question[f"{prefix}_{_field(row, 'question_id')}"].append(ok)
        correct.append(ok)
    if not correct:
        raise BadRequestError("hallusion_scores needs at least one row")
    return {
        "aAcc": sum(correct) / len(correct),
        "fAcc": sum(all(v) for v in per_figure.values()) / len(per_figure),
        "qAcc": sum(all(v) for v in per_question.values()) / len(per_question),
    }
