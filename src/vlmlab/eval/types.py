"""Records shared by eval datasets, prompts, the runner and reports."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalSample:
    """One benchmark item, in a dataset-neutral shape.

    Attributes:
        id: stable id within the dataset (the official question id where there is one).
        images: decoded RGB PIL images, in prompt order.
        question: the question text as the dataset gives it (prompt profiles add instructions).
        answers: the accepted answers (VQA: all 10; ChartQAPro: the answer list; MCQ: [letter]).
        fields: what metrics and prompts need: ``choices`` (option texts A, B, ...),
            ``question_type`` / ``year`` (ChartQAPro), ``dataset`` (OCRBench), ``category``,
            ``hint``, ``paragraph``, ``history``, ``answer_type`` / ``precision`` (MathVista),
            grouping keys (MMBench ``index``, HallusionBench ``set_id`` / ``figure_id`` ...).
    """

    id: str
    images: list[Any]
    question: str
    answers: list[str]
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str | None:
        value = self.fields.get("category")
        return None if value is None else str(value)


PromptBuilder = Callable[[EvalSample], list[str | int]]


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: where it lives, how big it is, how to read it and how to score it.

    Attributes:
        key: vlmlab's name (``chartqa_test_human``).
        hf_id / hf_config / split: the Hugging Face dataset and split (the real code path).
        expected_rows: the known size; a different count is warned about (and recorded).
        metric: the ``vlmlab.eval.metrics.score`` metric name (or a dataset-level aggregate such
            as ``mmbench_circular`` / ``hallusion``).
        default_mode: the metric mode that matches the official scorer.
        max_tokens: default generation budget (the official / lmms-eval value).
        from_row: converts one dataset row (a dict, images decoded by ``datasets``) to an
            EvalSample, or None to skip the row (e.g. the other half of ChartQA).
        local_loader: reads ``--data-dir`` layouts the HF loader does not (DAM-QA jsonl, ...).
        prompts: prompt profile name -> builder returning the user turn as an ordered list of
            text pieces (str) and image positions (int index into ``sample.images``). Profiles:
            ``default`` (official / lmms-eval wording), ``vlmevalkit``, ``mistral`` (the
            "Final Answer:" prompt), ``damqa``; a dataset offers the ones that exist for it.
        source: citation for sizes, fields and prompts.
        system_prompt: an optional system turn sent before the user turn.
        profile_max_tokens: generation budgets of profiles that differ from ``max_tokens``
            (mistral-evals' CoT prompts ask for 2,048 tokens, DAM-QA for 100); see
            :meth:`max_tokens_for`.
    """

    key: str
    hf_id: str
    split: str
    expected_rows: int
    metric: str
    default_mode: str
    max_tokens: int
    from_row: Callable[[Mapping[str, Any], int], EvalSample | None]
    hf_config: str | None = None
    local_loader: Callable[[Path], Iterator[EvalSample]] | None = None
    prompts: Mapping[str, PromptBuilder] = field(default_factory=dict)
    source: str = ""
    system_prompt: str | None = None
    profile_max_tokens: Mapping[str, int] = field(default_factory=dict)

    def max_tokens_for(self, profile: str) -> int:
        """The generation budget that goes with a prompt profile (``max_tokens`` by default)."""
        return self.profile_max_tokens.get(profile, self.max_tokens)
