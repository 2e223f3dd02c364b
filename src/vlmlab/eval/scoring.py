"""Scoring stored sample results: per-sample scores, dataset aggregates and summaries.

Works only from the JSONL records the runner wrote, so ``vlmlab score out/`` re-scores a run with
another metric mode (or a fixed metric) without any inference.
"""

from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.eval import metrics as M
from vlmlab.eval.types import DatasetSpec
from vlmlab.protocol.errors import ConfigError

LETTERS = "ABCDEFGHIJ"
# Dataset-level metrics and the per-row metric whose modes they accept.
ROW_METRIC = {"mmbench_circular": "mcq", "mmmu": "mcq", "hallusion": "exact_match", "mathvista": "mcq"}


@dataclass
class SampleScore:
    key: str
    sample_id: str
    score: float | None  # None: this harness leaves the row out of the mean (DAM-QA conversational)
    parsed: bool
    error: bool
    category: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_mode(spec: DatasetSpec, mode: str | None) -> str:
    chosen = mode or spec.default_mode
    metric = ROW_METRIC.get(spec.metric, spec.metric)
    supported = M.MODES[metric].supported if metric in M.MODES else ("official",)
    if chosen not in supported:
        raise ConfigError(
            f"metric mode {chosen!r} does not apply to {spec.key} ({spec.metric}). Modes: {', '.join(supported)}"
        )
    return chosen


def score_record(spec: DatasetSpec, record: Mapping[str, Any], mode: str, judge: Any = None) -> SampleScore:
    """One stored record's score under ``mode``; ``judge`` (an :class:`~vlmlab.eval.judge.Judge`)
    is asked only about rows the rules cannot parse."""
    fields = record.get("fields") or {}
    category = fields.get("category")
    base = dict(key=record["key"], sample_id=str(record["sample_id"]), category=None if category is None else str(category))
    if record.get("error"):
        return SampleScore(score=0.0, parsed=False, error=True, **base)
    # --response-format json: the prediction is the JSON's "answer"; a reply that was no such JSON
    # is unparsed (scored 0, never guessed), and a letter / yes-no answer is used as it is.
    as_json = record.get("response_format") == "json"
    if as_json and not record.get("answer_parsed"):
        return SampleScore(score=0.0, parsed=False, error=False, extra={"letter": None, "correct": None, "judged": False}, **base)
    prediction, answers, metric = record.get("prediction") or "", record.get("answers") or [], spec.metric
    if metric in ("relaxed_accuracy", "anls", "vqa_accuracy", "exact_match", "ocrbench", "chartqapro"):
        kwargs = {k: fields[k] for k in M.MODES[metric].fields if k in fields}
        value = M.score(metric, prediction, answers, mode, **kwargs)
        return SampleScore(score=None if math.isnan(value) else value, parsed=True, error=False, **base)
    if metric in ("mcq", "mmbench_circular") or (metric == "mmmu" and fields.get("question_type") != "open"):
        gold = str(answers[0]).strip() if answers else ""
        if metric == "mcq" and gold.upper() not in LETTERS[: max(4, len(fields.get("choices") or []))]:
            value = M.score("exact_match", prediction, answers, "official")  # a free-text gold
            return SampleScore(score=value, parsed=True, error=False, **base)
        letter = _json_letter(prediction, fields) if as_json else None
        letter = letter or M.extract_mcq(prediction, fields.get("choices") or [], mode)
        judged = False
        if letter is None and judge is not None and fields.get("choices"):
            letter, judged = judge.choice(record.get("prompt", ""), fields["choices"], prediction), True
        correct = None if letter is None else letter == gold.upper()
        return SampleScore(score=float(bool(correct)), parsed=letter is not None, error=False, extra={"letter": letter, "correct": correct, "judged": judged}, **base)
    if metric == "mmmu":
        ok = M.mmmu_open_match(prediction, [str(a) for a in answers], mode)
        return SampleScore(score=float(ok), parsed=True, error=False, **base)
    if metric == "mathvista":
        def check(text: str) -> bool | None:
            return M.mathvista_correct(
                text, str(answers[0]), question_type=fields.get("question_type", "free_form"),
                answer_type=fields.get("answer_type", "text"), choices=fields.get("choices") or (),
                precision=fields.get("precision"), mode=mode,
            )  # fmt: skip

        letter = _json_letter(prediction, fields) if as_json else None
        if letter is not None and fields.get("question_type") == "multi_choice":
            prediction = fields["choices"][LETTERS.index(letter)]  # the choice text the rules compare
        correct, judged = check(prediction), False
        if correct is None and judge is not None:
            extracted = judge.value(record.get("prompt", ""), prediction)
            correct, judged = (check(extracted) if extracted else None), True
        return SampleScore(score=float(bool(correct)), parsed=correct is not None, error=False, extra={"judged": judged}, **base)
    if metric == "hallusion":
        direct = prediction.strip().lower() if as_json else ""
        said = direct if direct in ("yes", "no") else M.extract_yes_no(prediction)
        gold = {"1": "yes", "0": "no"}.get(str(answers[0]).strip().lower(), str(answers[0]).strip().lower())
        correct = said == gold if said is not None else False
        return SampleScore(score=float(correct), parsed=said is not None, error=False, extra={"correct": correct}, **base)
    raise ConfigError(f"dataset {spec.key!r} names an unknown metric {metric!r}")


def _json_letter(answer: str, fields: Mapping[str, Any]) -> str | None:
    """A JSON answer that is one of the sample's option letters, as it is (else None)."""
    letter = answer.strip().upper()
    options = fields.get("options") or {}
    valid = list(options) if options else LETTERS[: len(fields.get("choices") or [])]
    return letter if len(letter) == 1 and letter in valid else None


def aggregate(spec: DatasetSpec, records: Sequence[Mapping[str, Any]], scores: Sequence[SampleScore]) -> dict[str, Any]:
    """Dataset-level figures: MMBench CircularEval, HallusionBench aAcc / fAcc / qAcc."""
    if not scores:
        return {}
    if spec.metric == "mmbench_circular":
        rows = [{"index": int(r["fields"]["index"]), "correct": s.extra.get("correct"), "category": s.category} for r, s in zip(records, scores)]
        result = M.circular_eval(rows)
        return {"circular_accuracy": result.accuracy, "questions": result.n_questions, "groups_with_unparsed": result.n_with_unparsed, "circular_by_category": result.by_category}
    if spec.metric == "hallusion":
        rows = [{**r["fields"], "correct": bool(s.extra.get("correct"))} for r, s in zip(records, scores)]
        return M.hallusion_scores(rows)
    return {}


def summarize(spec: DatasetSpec, records: Iterable[Mapping[str, Any]], mode: str | None, info: Mapping[str, Any] | None = None, judge: Any = None) -> dict[str, Any]:
    """Scores overall and per category, counts, unparsed, timing and the settings of the run."""
    chosen = resolve_mode(spec, mode)
    ordered = sorted(records, key=lambda r: str(r["sample_id"]))
    scores = [score_record(spec, r, chosen, judge) for r in ordered]
    counted = [s for s in scores if s.score is not None]
    by_category: dict[str, list[float]] = defaultdict(list)
    for s in counted:
        if s.category is not None:
            by_category[s.category].append(s.score)  # type: ignore[arg-type]
    usage = [r.get("usage") or {} for r in ordered]
    timings = [r.get("timings") or {} for r in ordered]
    total_s = sum(t.get("total_s") or 0.0 for t in timings)
    return {
        "dataset": spec.key,
        "model": ordered[0]["model"] if ordered else None,
        "metric": spec.metric,
        "metric_mode": chosen,
        "score": (sum(s.score for s in counted) / len(counted)) if counted else None,  # type: ignore[misc]
        "n": len(scores),
        "scored": len(counted),
        "errors": sum(s.error for s in scores),
        "unparsed": sum((not s.parsed) and not s.error for s in scores),
        # of those, --response-format json replies that were no {"answer": ...} JSON (cut off)
        "json_unparsed": sum(r.get("response_format") == "json" and not r.get("answer_parsed") and not r.get("error") for r in ordered),
        "judged": sum(bool(s.extra.get("judged")) for s in scores),
        "judge": None if judge is None else {"url": judge.base_url, "model": judge.model},
        "by_category": {k: sum(v) / len(v) for k, v in sorted(by_category.items())},
        "aggregate": aggregate(spec, ordered, scores),
        "tokens": {k: sum(u.get(k, 0) for u in usage) for k in ("prompt_tokens", "image_tokens", "completion_tokens")},
        # The sum of every sample's own latency (request start -> last token): samples that ran
        # together overlap in it, so it exceeds the wall time; the run's wall time and rate are
        # run.wall_seconds / run.samples_per_second.
        "latency_seconds_sum": round(total_s, 3),
        "prompt_profile": ordered[0].get("prompt_profile") if ordered else None,
        "response_format": ordered[0].get("response_format", "text") if ordered else None,
        "generation": ordered[0].get("generation") if ordered else None,
        "dataset_info": dict(info or {}),
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("vlmlab", "transformers", "torch", "datasets", "vllm"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def read_records(path: Path, response_format: str | None = None) -> list[dict[str, Any]]:
    """Complete JSON lines of a results file (a torn last line is ignored); with
    ``response_format`` (``text`` / ``json``) only the answers given that way."""
    records: dict[str, dict[str, Any]] = {}
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break
            records.setdefault(record["key"], record)
    if response_format is None:
        return list(records.values())
    return [r for r in records.values() if r.get("response_format", "text") == response_format]


def run_response_format(path: Path) -> str | None:
    """The ``--response-format`` of the run that wrote the summary beside a results file
    (``text`` for runs from before the option), or None when there is no summary."""
    summary = path.with_suffix(".summary.json")
    if not summary.exists():
        return None
    return (json.loads(summary.read_text()).get("settings") or {}).get("response_format", "text")


def markdown_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Models x datasets, score in percent, with n and unparsed counts."""
    datasets = list(dict.fromkeys(s["dataset"] for s in summaries))
    models = list(dict.fromkeys(s["model"] for s in summaries))
    cell = {(s["model"], s["dataset"]): s for s in summaries}
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for model in models:
        row = []
        for dataset in datasets:
            s = cell.get((model, dataset))
            if s is None or s["score"] is None:
                row.append("-")
            else:
                row.append(f"{100 * s['score']:.1f} (n={s['n']}, unparsed {s['unparsed']})")
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
