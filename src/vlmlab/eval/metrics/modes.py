"""Which harness each metric can imitate ("modes"), and the checks that reject unknown ones.

A *mode* names the harness whose scoring code a metric reproduces, quirks included (see
``/work/shared/specs/eval.md`` §a): ``official`` (the benchmark authors' script), ``lmms-eval``,
``vlmevalkit``, ``mistral`` (mistral-evals' metric on a prediction as given), ``mistral-explicit``
and ``mistral-anywhere`` (mistral-evals' "Final Answer:" metrics, which first extract the answer),
``damqa`` (DAM-QA's ``evaluation/metrics.py``) and, for ANLS only, ``anls-pypi`` (the ``anls``
package used inside ChartQAPro). Not every metric exists in every harness; ``MODES`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmlab.protocol.errors import ConfigError, UnknownOptionError

OFFICIAL = "official"
LMMS_EVAL = "lmms-eval"
VLMEVALKIT = "vlmevalkit"
MISTRAL = "mistral"
MISTRAL_EXPLICIT = "mistral-explicit"
MISTRAL_ANYWHERE = "mistral-anywhere"
DAMQA = "damqa"
ANLS_PYPI = "anls-pypi"

ALL_MODES: tuple[str, ...] = (
    OFFICIAL,
    LMMS_EVAL,
    VLMEVALKIT,
    MISTRAL,
    MISTRAL_EXPLICIT,
    MISTRAL_ANYWHERE,
    DAMQA,
    ANLS_PYPI,
)


@dataclass(frozen=True)
class MetricModes:
    """The modes one metric supports.

    Args:
        supported: mode names, in the order reports should list them.
        default: the mode a runner should use when none is configured (always ``official``).
        fields: extra keyword fields the metric reads (``question_type``, ``choices``, ...).
    """

    supported: tuple[str, ...]
    default: str = OFFICIAL
    fields: tuple[str, ...] = ()


MODES: dict[str, MetricModes] = {
    "relaxed_accuracy": MetricModes(
        (OFFICIAL, LMMS_EVAL, VLMEVALKIT, MISTRAL, MISTRAL_EXPLICIT, MISTRAL_ANYWHERE, DAMQA)
    ),
    "anls": MetricModes((OFFICIAL, LMMS_EVAL, VLMEVALKIT, ANLS_PYPI, MISTRAL, DAMQA)),
    "vqa_accuracy": MetricModes(
        (OFFICIAL, LMMS_EVAL, VLMEVALKIT, MISTRAL, DAMQA), fields=("dataset",)
    ),
    "exact_match": MetricModes((OFFICIAL, LMMS_EVAL, VLMEVALKIT)),
    "chartqapro": MetricModes(
        (OFFICIAL, LMMS_EVAL, VLMEVALKIT, DAMQA), fields=("question_type", "year")
    ),
    "ocrbench": MetricModes((OFFICIAL, LMMS_EVAL, VLMEVALKIT), fields=("dataset", "category")),
    "mcq": MetricModes(
        (OFFICIAL, LMMS_EVAL, VLMEVALKIT, MISTRAL, MISTRAL_EXPLICIT, MISTRAL_ANYWHERE),
        fields=("choices",),
    ),
}


def check_mode(metric: str, mode: str) -> str:
    """Return ``mode`` if ``metric`` supports it.

    Raises:
        ConfigError: naming the bad mode and listing the modes the metric supports.
    """
    supported = MODES[metric].supported
    if mode not in supported:
        kind = "unknown mode" if mode not in ALL_MODES else "mode"
        raise ConfigError(
            f"{kind} {mode!r} is not available for metric {metric!r}. "
            f"Available: {', '.join(supported)}",
            param="mode",
        )
    return mode


def check_fields(metric: str, fields: dict[str, object]) -> None:
    """Reject keyword fields the metric does not read (a typo would otherwise be ignored).

    Raises:
        UnknownOptionError: naming the unknown field and listing the accepted ones.
    """
    accepted = MODES[metric].fields
    for name in fields:
        if name not in accepted:
            listed = ", ".join(accepted) if accepted else "none"
            raise UnknownOptionError(
                f"metric {metric!r} does not take field {name!r}. Accepted fields: {listed}",
                param=name,
            )


def require_mode(mode: str, allowed: tuple[str, ...], what: str) -> str:
    """Check ``mode`` for a building block (``extract_mcq``, ``mmmu_open_match``, ...).

    Raises:
        ConfigError: naming the bad mode and listing ``allowed``.
    """
    if mode not in allowed:
        raise ConfigError(
            f"mode {mode!r} is not available for {what}. Available: {', '.join(allowed)}",
            param="mode",
        )
    return mode
