"""``vlmlab report out/``: models x datasets with bootstrap confidence intervals, per-category
breakdowns, paired comparisons between models on the same items, and disagreement examples;
``--html`` writes a self-contained page with plots."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.eval.datasets import get_dataset
from vlmlab.eval.scoring import read_records, resolve_mode, run_response_format, score_record
from vlmlab.protocol.errors import ConfigError

BOOTSTRAP = 2000


@dataclass
class Cell:
    """One model on one dataset: per-sample scores keyed by sample id."""

    model: str
    dataset: str
    mode: str
    scores: dict[str, float]
    records: dict[str, dict[str, Any]]
    categories: dict[str, str | None] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.scores.values()))) if self.scores else float("nan")


def bootstrap_ci(values: Sequence[float], seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``BOOTSTRAP`` resamples, fixed seed)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(BOOTSTRAP, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def load_cells(output_dir: Path, metric_mode: str | None = None) -> list[Cell]:
    files = sorted(Path(output_dir).glob("*/*.jsonl"))
    if not files:
        raise ConfigError(f"no results (<model>/<dataset>.jsonl) under {output_dir}; run vlmlab eval first")
    cells = []
    for path in files:
        spec = get_dataset(path.stem)
        mode = resolve_mode(spec, metric_mode)
        records = read_records(path, run_response_format(path))  # the answer format of its summary
        scores, by_id, categories = {}, {}, {}
        for record in records:
            sample = str(record["sample_id"])
            scored = score_record(spec, record, mode)
            by_id[sample] = record
            categories[sample] = scored.category
            if scored.score is not None:
                scores[sample] = scored.score
        model = records[0]["model"] if records else path.parent.name
        cells.append(Cell(model, spec.key, mode, scores, by_id, categories))
    return cells


def paired(a: Cell, b: Cell, seed: int = 0) -> dict[str, Any]:
    """``b - a`` on the items both answered: mean difference, its bootstrap CI, wins and losses."""
    common = sorted(set(a.scores) & set(b.scores))
    diffs = np.array([b.scores[i] - a.scores[i] for i in common], dtype=float)
    low, high = bootstrap_ci(diffs.tolist(), seed) if common else (float("nan"), float("nan"))
    return {
        "dataset": a.dataset,
        "a": a.model,
        "b": b.model,
        "items": len(common),
        "mean_diff": float(diffs.mean()) if common else float("nan"),
        "ci95": [low, high],
        "b_better": int((diffs > 0).sum()),
        "a_better": int((diffs < 0).sum()),
        "ties": int((diffs == 0).sum()),
    }


def disagreements(a: Cell, b: Cell, limit: int = 8) -> list[dict[str, Any]]:
    out = []
    for sample in sorted(set(a.scores) & set(b.scores)):
        if a.scores[sample] != b.scores[sample]:
            ra, rb = a.records[sample], b.records[sample]
            out.append({"sample_id": sample, "prompt": ra["prompt"], "answers": ra["answers"], a.model: ra["prediction"], b.model: rb["prediction"]})
            if len(out) >= limit:
                break
    return out


def build_report(output_dir: Path, metric_mode: str | None = None) -> dict[str, Any]:
    cells = load_cells(output_dir, metric_mode)
    table = []
    for cell in cells:
        low, high = bootstrap_ci(list(cell.scores.values()))
        per_category: dict[str, list[float]] = defaultdict(list)
        for sample, value in cell.scores.items():
            if cell.categories.get(sample) is not None:
                per_category[str(cell.categories[sample])].append(value)
        table.append(
            {
                "model": cell.model,
                "dataset": cell.dataset,
                "metric_mode": cell.mode,
                "n": len(cell.scores),
                "score": cell.mean,
                "ci95": [low, high],
                "by_category": {k: float(np.mean(v)) for k, v in sorted(per_category.items())},
            }
        )
    comparisons, examples = [], []
    by_dataset: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_dataset[cell.dataset].append(cell)
    for dataset_cells in by_dataset.values():
        for i, a in enumerate(dataset_cells):
            for b in dataset_cells[i + 1 :]:
                comparisons.append(paired(a, b))
                examples.append({"dataset": a.dataset, "a": a.model, "b": b.model, "items": disagreements(a, b)})
    return {"table": table, "paired": comparisons, "disagreements": examples}


def write_html(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmlab import htmlpage as h

    rows = report["table"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(datasets) * max(1, len(models)) / 2), 3.5))
    width = 0.8 / max(1, len(models))
    for m_index, model in enumerate(models):
        xs, ys, errs = [], [], [[], []]
        for d_index, dataset in enumerate(datasets):
            row = next((r for r in rows if r["model"] == model and r["dataset"] == dataset), None)
            if row is None:
                continue
            xs.append(d_index + m_index * width)
            ys.append(100 * row["score"])
            errs[0].append(100 * (row["score"] - row["ci95"][0]))
            errs[1].append(100 * (row["ci95"][1] - row["score"]))
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=model)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(datasets))], datasets)
    ax.set_ylabel("score (%)")
    ax.legend()
    sections = [
        "<h2>Scores (95% bootstrap CI)</h2>",
        h.table(
            ["model", "dataset", "mode", "n", "score %", "95% CI"],
            [[r["model"], r["dataset"], r["metric_mode"], r["n"], f"{100 * r['score']:.1f}", f"{100 * r['ci95'][0]:.1f} – {100 * r['ci95'][1]:.1f}"] for r in rows],
            numeric=(3, 4),
        ),
        h.img(h.figure_data_url(fig), "scores with confidence intervals", "plot").html,
        "<h2>Per category</h2>",
        h.table(["model", "dataset", "category", "score %"], [[r["model"], r["dataset"], k, f"{100 * v:.1f}"] for r in rows for k, v in r["by_category"].items()], numeric=(3,)),
    ]
    if report["paired"]:
        sections += [
            "<h2>Paired comparisons (b − a on shared items)</h2>",
            h.table(
                ["dataset", "a", "b", "items", "mean diff %", "95% CI", "b better", "a better", "ties"],
                [[p["dataset"], p["a"], p["b"], p["items"], f"{100 * p['mean_diff']:.1f}", f"{100 * p['ci95'][0]:.1f} – {100 * p['ci95'][1]:.1f}", p["b_better"], p["a_better"], p["ties"]] for p in report["paired"]],
                numeric=(3, 4, 6, 7, 8),
            ),
            "<h2>Disagreements</h2>",
        ]
        for group in report["disagreements"]:
            sections.append(f"<h3>{h.escape(group['dataset'])}: {h.escape(group['a'])} vs {h.escape(group['b'])}</h3>")
            sections.append(h.table(["sample", "prompt", "answers", group["a"], group["b"]], [[i["sample_id"], i["prompt"], ", ".join(map(str, i["answers"])), i[group["a"]], i[group["b"]]] for i in group["items"]]))
    path.write_text(h.page("vlmlab report", sections))
    return path


def write_report(output_dir: Path, metric_mode: str | None = None, html: bool = False) -> tuple[dict[str, Any], Path | None]:
    report = build_report(output_dir, metric_mode)
    (Path(output_dir) / "report.json").write_text(json.dumps(report, indent=2, default=float))
    page = write_html(report, Path(output_dir) / "report.html") if html else None
    return report, page
