"""OCRBench (v1): 1 when any gold answer is a substring of the prediction.

Rule per mode (spec ``/work/shared/specs/eval.md`` §a.2):

- ``official``: Yuliang-Liu/MultimodalOCR OCRBench evaluation script. Gold and prediction are
  lower-cased, stripped, and newlines become spaces; a gold contained in the prediction scores 1
  (long answers that happen to contain the gold score, an empty gold always does). For
  ``dataset == "HME100k"`` (handwritten math) case is kept and all spaces (and newlines) are
  removed from both sides instead.
- ``vlmevalkit``: ``vlmeval/dataset/image_vqa.py::OCRBench.evaluate``: the same rules, but the
  HME branch is chosen by ``category == "Handwritten Mathematical Expression Recognition"``.
- ``lmms-eval``: ``lmms_eval/tasks/ocrbench/utils.py`` at the spec snapshot: HME keyed on
  ``dataset == "HME100k"`` with the prediction's case kept (PR #1278, issue #1220), and outside HME
  full-width ASCII (U+FF01-U+FF5E) and the ideographic space U+3000 are folded to ASCII on both
  sides before matching (PR #1415). (Aggregation there returns score/1000 and accumulates in a
  module-level dict; scoring one row is unaffected.)

Returns 1.0 or 0.0 per row; the benchmark reports the raw sum out of 1000.
"""

from __future__ import annotations

from vlmlab.eval.metrics.modes import LMMS_EVAL, OFFICIAL, VLMEVALKIT

HME_DATASET = "HME100k"  # OCRBench.json dataset_name of the handwritten-math subset
HME_CATEGORY = "Handwritten Mathematical Expression Recognition"  # its question_type / category

# lmms-eval PR #1415: U+FF01..U+FF5E -> U+0021..U+007E, U+3000 -> space (no NFKC).
_FULLWIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


def fold_fullwidth(text: str) -> str:
    """Map full-width ASCII variants and the ideographic space to ASCII."""
    return text.translate(_FULLWIDTH)


def _hme_hit(prediction: str, answers: list[str]) -> bool:
    pred = prediction.strip().replace("\n", " ").replace(" ", "")
    return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers)


def _text_hit(prediction: str, answers: list[str]) -> bool:
    pred = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in answers)


def ocrbench(
    prediction: str,
    answers: list[str],
    mode: str,
    dataset: str | None = None,
    category: str | None = None,
) -> float:
    """OCRBench score of one row (1.0 or 0.0).

    Args:
        dataset: the row's ``dataset`` / ``dataset_name`` (``HME100k`` selects the math branch in
            ``official`` and ``lmms-eval``).
        category: the row's ``question_type`` / ``category`` (selects the math branch in
            ``vlmevalkit``); when missing, ``dataset == "HME100k"`` stands in for it (the two
            coincide on OCRBench).
    """
    if mode == VLMEVALKIT:
        is_hme = category == HME_CATEGORY if category is not None else dataset == HME_DATASET
    else:
        is_hme = dataset == HME_DATASET
    if is_hme:
        return float(_hme_hit(prediction, answers))
    if mode == LMMS_EVAL:
        return float(_text_hit(fold_fullwidth(prediction), [fold_fullwidth(a) for a in answers]))
    if mode in (OFFICIAL, VLMEVALKIT):
        return float(_text_hit(prediction, answers))
    raise AssertionError(f"unhandled ocrbench mode {mode!r}")  # guarded by check_mode
