"""Reference-exact metrics for vlmlab's eval harness, with one *mode* per harness imitated.

``score(metric, prediction, answers, mode="lmms-eval", **fields)`` scores one row the way the
chosen harness would, quirks included; ``MODES`` says which modes each metric supports (default
``official``). The building blocks the runner and reports need are exported too: answer
extraction (``extract_mcq``, ``final_answer``, ``extract_yes_no``), MMMU open answers
(``mmmu_open_match``), MathVista (``mathvista_extract``/``mathvista_normalize``/
``mathvista_correct``), MMBench ``circular_eval`` and HallusionBench ``hallusion_scores``.

Each module's docstring names the reference file every mode reproduces; the rules and the
measured deltas between harnesses are in ``/work/shared/specs/eval.md``. Extraction never guesses:
where a harness would pick a random option or ask an LLM judge, we return None ("unparsed").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vlmlab.eval.metrics.hallusion import extract_yes_no, hallusion_scores
from vlmlab.eval.metrics.mathvista import mathvista_correct, mathvista_extract, mathvista_normalize
from vlmlab.eval.metrics.mcq import extract_mcq
from vlmlab.eval.metrics.mistral import final_answer
from vlmlab.eval.metrics.mmbench import CircularResult, circular_eval
from vlmlab.eval.metrics.mmmu import mmmu_open_match, parse_open_response
from vlmlab.eval.metrics.modes import ALL_MODES, MODES, MetricModes, check_fields, check_mode
from vlmlab.protocol.errors import BadRequestError, ConfigError, NotFoundError
from vlmlab.registry import Registry

__all__ = [
    "ALL_MODES",
    "METRICS",
    "MODES",
    "CircularResult",
    "MetricModes",
    "circular_eval",
    "extract_mcq",
    "extract_yes_no",
    "final_answer",
    "hallusion_scores",
    "mathvista_correct",
    "mathvista_extract",
    "mathvista_normalize",
    "mmmu_open_match",
    "parse_open_response",
    "score",
]

MetricFn = Callable[..., float]

# Lazy targets: a metric's module is imported on first use (registry docstring).
METRICS: Registry[MetricFn] = Registry("metric")
METRICS.register("relaxed_accuracy", "vlmlab.eval.metrics.relaxed:relaxed_accuracy",
                 aliases=("relaxed", "relaxed_correctness"))  # fmt: skip
METRICS.register("anls", "vlmlab.eval.metrics.anls:anls")
METRICS.register("vqa_accuracy", "vlmlab.eval.metrics.vqa:vqa_accuracy", aliases=("vqa_score",))
METRICS.register("exact_match", "vlmlab.eval.metrics.exact:exact_match")
METRICS.register("chartqapro", "vlmlab.eval.metrics.chartqapro:chartqapro")
METRICS.register("ocrbench", "vlmlab.eval.metrics.ocrbench:ocrbench")
METRICS.register("mcq", "vlmlab.eval.metrics.mcq:mcq", aliases=("multiple_choice",))


def score(
    metric: str,
    prediction: str | None,
    answers: str | Sequence[str],
    mode: str = "lmms-eval",
    **fields: Any,
) -> float:
    """Score one prediction the way ``mode``'s harness scores ``metric``.

    Args:
        metric: ``relaxed_accuracy``, ``anls``, ``vqa_accuracy``, ``exact_match``, ``chartqapro``,
            ``ocrbench`` or ``mcq`` (aliases and ``-``/``_`` spellings resolve).
        prediction: the model's answer text (None, e.g. a failed generation, counts as ``""``).
        answers: the gold answers (a single string is one answer). ``chartqapro``: the row's
            ``Answer`` list (the last is the gold); ``mcq``: ``[gold letter]``.
        mode: the harness to imitate; see ``MODES[metric].supported``.
        **fields: metric-specific row fields: ``question_type`` and ``year`` (chartqapro),
            ``dataset`` and ``category`` (ocrbench), ``choices`` (mcq: option texts for A, B, ...),
            ``dataset`` (vqa_accuracy, lmms-eval only: ``"vqav2"`` picks its VQAv2 path).

    Returns:
        The score in [0, 1] (NaN for a ChartQAPro Conversational row in ``damqa`` mode, which
        DAM-QA excludes from its mean).

    Raises:
        ConfigError: unknown metric or unsupported mode (the message lists the valid ones).
        UnknownOptionError: a field the metric does not read.
        BadRequestError: no gold answers, or a non-string prediction/answer.
    """
    try:
        name = METRICS.canonical(metric)
        fn = METRICS.get(name)
    except NotFoundError as err:
        raise ConfigError(err.message, param="metric") from err
    check_mode(name, mode)
    check_fields(name, fields)
    gold = [answers] if isinstance(answers, str) else list(answers)
    if not gold:
        raise BadRequestError(f"{name}: answers is empty; pass at least one gold answer")
    if not all(isinstance(a, str) for a in gold):
        raise BadRequestError(f"{name}: answers must be strings, got {gold!r}")
    if prediction is None:
        prediction = ""
    if not isinstance(prediction, str):
        raise BadRequestError(
            f"{name}: prediction must be a string, got {type(prediction).__name__}"
        )
    return fn(prediction, gold, mode, **fields)
