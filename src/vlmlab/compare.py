"""``vlmlab compare`` and ``vlmlab sweep``: the same questions to several models, or to one model
at several resolutions / image counts, side by side.

Models are local engines (``nano``, a preset, a hub id or a path, optionally ``hf:`` /
``vllm:`` prefixed) or remote OpenAI-compatible endpoints written ``URL#model`` (e.g.
``http://gpu1:8000/v1#mistralai/Pixtral-12B-2409``), so Pixtral on one vLLM server and
Phi-3.5-vision on another compare in one command. Every model answers greedily with the same
prompts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.config import model_target
from vlmlab.engines import Engine, GenerationRequest, check_model, complete, load_engine
from vlmlab.protocol.core import Chat, ImageData, ImagePart, SamplingParams
from vlmlab.protocol.errors import ConfigError, VlmlabError
from vlmlab.units import format_bytes, format_duration


@dataclass(frozen=True)
class Question:
    """Images + a question (+ the expected answer when it comes from a dataset)."""

    images: tuple[Any, ...]
    question: str
    expected: str | None = None
    label: str = ""


@dataclass
class Answer:
    model: str
    question: str
    label: str
    answer: str
    expected: str | None
    correct: bool | None
    latency_s: float | None
    ttft_s: float | None
    tokens_per_s: float | None
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    peak_memory_bytes: int | None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def image_part(image: Any, label: str) -> ImagePart:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return ImagePart(ref=label, data=ImageData(image, image.width, image.height, "PNG", hashlib.sha256(buf.getvalue()).hexdigest(), buf.tell()))


def normalise(text: str) -> str:
    return text.strip().strip(".").strip().lower()


async def ask_all(engine: Engine, label: str, questions: Sequence[Question], max_tokens: int, warm_up: bool = True) -> list[Answer]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    if warm_up and questions:  # first-call costs (allocations, lazy imports) are not the model's
        q = questions[0]
        await complete(engine, GenerationRequest(Chat.single(q.question, [image_part(im, "warm-up") for im in q.images]), sampling))
    answers = []
    for index, q in enumerate(questions):  # one at a time: latencies are not mixed by batching
        parts = [image_part(im, f"{q.label or index}-{k}") for k, im in enumerate(q.images)]
        try:
            result = await complete(engine, GenerationRequest(Chat.single(q.question, parts), sampling))
        except VlmlabError as exc:
            answers.append(Answer(label, q.question, q.label, "", q.expected, None if q.expected is None else False, None, None, None, 0, 0, 0, None, exc.message))
            continue
        t = result.timings
        answers.append(
            Answer(
                model=label,
                question=q.question,
                label=q.label,
                answer=result.text,
                expected=q.expected,
                correct=None if q.expected is None else normalise(result.text) == normalise(q.expected),
                latency_s=t.total_s,
                ttft_s=t.ttft_s,
                tokens_per_s=t.decode_tokens_per_s(result.completion_tokens),
                prompt_tokens=result.prompt_tokens,
                image_tokens=result.image_tokens,
                completion_tokens=result.completion_tokens,
                peak_memory_bytes=t.peak_memory_bytes,
            )
        )
    return answers


def unique_labels(labels: Sequence[str]) -> list[str]:
    """The labels, with the 2nd, 3rd... repeat of a label suffixed ``#2``, ``#3``...

    Results are keyed by label (summary rows, report columns), so ``--models nano,nano`` must not
    merge the two runs into one row. A suffix that some other entry already uses is skipped.
    """
    taken = set(labels)
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        if label not in seen:
            seen[label] = 1
            out.append(label)
            continue
        n = seen[label] + 1
        while f"{label}#{n}" in taken:
            n += 1
        seen[label] = n
        taken.add(f"{label}#{n}")
        out.append(f"{label}#{n}")
    return out


def answer_job(label: str, spec: Any, questions: Sequence[Question], max_tokens: int) -> list[Answer]:
    """One model answers ``questions`` (loaded here, closed after): a job of
    :func:`run_compare` / :func:`run_sweep`, in this process or in a Ray worker."""
    engine = load_engine(spec)
    try:
        return asyncio.run(ask_all(engine, label, questions, max_tokens))
    finally:
        engine.close()


@dataclass(frozen=True)
class RayJobs:
    """``--ray``: each job (a model of ``compare``, a level of ``sweep``) runs as a Ray task on
    a worker of its own, all at once, on the cluster at ``address`` (``None``: a new local one).
    A worker that dies is retried by Ray (the job is a pure function of its inputs at
    temperature 0)."""

    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0

    def run(self, jobs: Sequence[tuple[str, Any, Sequence[Question]]], max_tokens: int) -> list[list[Answer]]:
        from vlmlab.engines.ray_pool import connect

        connect(self.address)
        import ray

        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=3)(answer_job)
        refs = [task.remote(label, spec, list(questions), max_tokens) for label, spec, questions in jobs]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:  # a vlmlab error inside the job: its own message
            cause = exc.cause if isinstance(getattr(exc, "cause", None), VlmlabError) else None
            if cause is not None:
                raise cause from None
            raise


def run_compare(
    targets: Sequence[str], questions: Sequence[Question], max_tokens: int = 64, ray: RayJobs | None = None, **engine_defaults: Any
) -> list[Answer]:
    """Every model answers every question; models are loaded one at a time (memory), or with
    ``ray`` each on a Ray worker of its own, all at once.

    Each answer's ``model`` is the target's label; a target given twice is labelled ``nano``,
    ``nano#2`` (see ``unique_labels``) so the runs stay separate rows and columns.
    """
    if not targets:
        raise ConfigError("give at least one model: --models nano,<another>")
    if not questions:
        raise ConfigError("give a question (--question with --image, --questions-file, or --dataset)")
    parsed = [model_target(target, **engine_defaults) for target in targets]
    for _, spec in parsed:  # a missing second model fails before the first one loads
        check_model(spec)
    jobs = [(label, spec, questions) for label, (_, spec) in zip(unique_labels([label for label, _ in parsed]), parsed, strict=True)]
    if ray is not None:
        return [answer for answers in ray.run(jobs, max_tokens) for answer in answers]
    return [answer for label, spec, asked in jobs for answer in answer_job(label, spec, asked, max_tokens)]


def resize_longest(image: Any, side: int) -> Any:
    from PIL import Image

    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def with_image_count(questions: Sequence[Question], count: int) -> list[Question]:
    """Each question with exactly ``count`` images: its own images first, in order (what it asks
    about), then images of the other questions as distractors. A question with more images of its
    own than ``count`` is left out of that level: dropping an image it asks about changes the
    question, not the image count."""
    out = []
    for index, question in enumerate(questions):
        own = tuple(question.images)
        if len(own) > count:
            continue
        others = [im for j in range(1, len(questions)) for im in questions[(index + j) % len(questions)].images]
        extra = tuple(others[(k % len(others))] for k in range(count - len(own))) if others else ()
        if len(own) + len(extra) < count:
            continue
        out.append(Question(own + extra, question.question, question.expected, question.label))
    return out


def sweep_levels(resolutions: Sequence[int], images_per_prompt: Sequence[int]) -> list[dict[str, int]]:
    """Every setting a sweep runs: one axis alone, or both crossed (each resolution with each
    image count, so no answer lacks a value on either axis)."""
    sides: list[int | None] = list(resolutions) or [None]
    counts: list[int | None] = list(images_per_prompt) or [None]
    levels = []
    for side in sides:
        for count in counts:
            level = {}
            if side is not None:
                level["resolution"] = side
            if count is not None:
                level["images_per_prompt"] = count
            levels.append(level)
    return levels


def sweep_key(resolutions: Sequence[int], images_per_prompt: Sequence[int]) -> str:
    """The summary's grouping: the one axis swept, or ``setting`` when both are."""
    if resolutions and images_per_prompt:
        return "setting"
    return "resolution" if resolutions else "images_per_prompt"


def run_sweep(
    target: str, questions: Sequence[Question], resolutions: Sequence[int] = (), images_per_prompt: Sequence[int] = (),
    max_tokens: int = 64, ray: RayJobs | None = None, **engine_defaults: Any,
) -> list[Answer]:
    """One model; each question at each longest-side resolution and/or with each image count
    (:func:`with_image_count`); both axes given: every pair of the two. With ``ray``, each level
    runs on a Ray worker of its own (each loading the model), all at once."""
    label, spec = model_target(target, **engine_defaults)
    levels = sweep_levels(resolutions, images_per_prompt)
    jobs = []
    for level in levels:
        asked = list(questions)
        if "images_per_prompt" in level:
            asked = with_image_count(asked, level["images_per_prompt"])
        if "resolution" in level:
            side = level["resolution"]
            asked = [Question(tuple(resize_longest(im, side) for im in q.images), q.question, q.expected, q.label) for q in asked]
        jobs.append((label, spec, asked))
    if ray is not None:
        check_model(spec)
        per_level = ray.run(jobs, max_tokens)
    else:
        engine = load_engine(spec)
        try:
            per_level = [asyncio.run(ask_all(engine, label, asked, max_tokens)) for _, _, asked in jobs]
        finally:
            engine.close()
    answers: list[Answer] = []
    for level, level_answers in zip(levels, per_level, strict=True):
        for answer in level_answers:
            answer.extra.update(level)
            if len(level) == 2:
                answer.extra["setting"] = f"{level['resolution']} px, {level['images_per_prompt']} image(s)"
            answers.append(answer)
    return answers


def summarize(answers: Sequence[Answer], by: str = "model") -> list[dict[str, Any]]:
    """Per model (or per ``resolution`` / ``images_per_prompt``): accuracy, latency, tokens."""
    groups: dict[Any, list[Answer]] = {}
    for a in answers:
        key = a.model if by == "model" else a.extra.get(by)
        groups.setdefault(key, []).append(a)
    rows = []
    for key, items in groups.items():
        ok = [a for a in items if a.error is None]
        graded = [a for a in ok if a.correct is not None]

        def mean(values: list[float | None]) -> float | None:
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        rows.append(
            {
                by: key,
                "questions": len(items),
                "errors": len(items) - len(ok),
                "accuracy": (sum(bool(a.correct) for a in graded) / len(graded)) if graded else None,
                "mean_latency_s": mean([a.latency_s for a in ok]),
                "mean_ttft_s": mean([a.ttft_s for a in ok]),
                "mean_image_tokens": mean([float(a.image_tokens) for a in ok]),
                "peak_memory_bytes": max((a.peak_memory_bytes or 0 for a in ok), default=None),
            }
        )
    return rows


def write_outputs(answers: Sequence[Answer], questions: Sequence[Question], out_dir: Path, title: str, by: str = "model") -> Path:
    """``answers.json`` and ``report.html`` (thumbnails, side-by-side answers, plots for sweeps)."""
    from vlmlab import htmlpage as h

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(answers, by)
    (out_dir / "answers.json").write_text(json.dumps({"summary": summary, "answers": [asdict(a) for a in answers]}, indent=2))
    thumbs = {q.label or q.question: [h.png_data_url(im) for im in q.images] for q in questions}
    columns = sorted({a.model if by == "model" else str(a.extra.get(by)) for a in answers}, key=lambda c: (len(c), c)) if by != "model" else list(dict.fromkeys(a.model for a in answers))
    grid: dict[str, dict[str, Answer]] = {}
    for a in answers:
        column = a.model if by == "model" else str(a.extra.get(by))
        grid.setdefault(a.label or a.question, {})[column] = a

    def cell(a: Answer | None) -> h.Raw:
        if a is None:
            return h.Raw("")
        if a.error:
            return h.Raw(f'<span class="bad">{h.escape(a.error)}</span>')
        mark = "" if a.correct is None else (' <span class="ok">✓</span>' if a.correct else ' <span class="bad">✗</span>')
        timing = f"{format_duration(a.latency_s)} · {a.image_tokens} img tok"
        return h.Raw(f"{h.escape(a.answer)}{mark}<br><span class=\"muted\">{timing}</span>")

    rows = []
    for key, by_column in grid.items():
        first = next(iter(by_column.values()))
        images = h.Raw("".join(h.img(src, key).html for src in thumbs.get(key, [])))
        expected = first.expected if first.expected is not None else ""
        rows.append([images, first.question, expected, *[cell(by_column.get(c)) for c in columns]])
    sections = []
    # Sweeps open with a plot per swept axis (averaged over the other axis when both are swept).
    axes = [axis for axis in ("resolution", "images_per_prompt") if any(axis in a.extra for a in answers)]
    for axis in axes if by != "model" else []:
        rows_for_axis = summarize(answers, axis)
        sections += [f"<h2>By {axis.replace('_', ' ')}</h2>", h.img(h.figure_data_url(_sweep_figure(rows_for_axis, axis)), f"{axis} plot", "plot").html]
    sections += [
        "<h2>Summary</h2>",
        h.table(*summary_cells(summary, by), numeric=range(1, 8)),
        "<h2>Answers</h2>",
        h.table(["image(s)", "question", "expected", *columns], rows),
    ]
    path = out_dir / "report.html"
    path.write_text(h.page(title, sections))
    return path


def summary_cells(rows: Sequence[dict[str, Any]], by: str = "model") -> tuple[list[str], list[list[str]]]:
    """:func:`summarize` rows as a table for people: ``(headers, cells)``.

    Latencies read ``25.3 ms`` / ``1.52 s``, memory ``846.0 MiB``, accuracy a percentage; the
    raw seconds and bytes stay in ``answers.json``. Used by the HTML report and the CLI table.
    """
    headers = [by.replace("_", " "), "questions", "errors", "accuracy", "mean latency", "mean TTFT", "image tokens", "peak memory"]
    cells = [
        [
            str(row[by]),
            str(row["questions"]),
            str(row["errors"]),
            "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%",
            format_duration(row["mean_latency_s"]),
            format_duration(row["mean_ttft_s"]),
            "-" if row["mean_image_tokens"] is None else f"{row['mean_image_tokens']:.0f}",
            format_bytes(row["peak_memory_bytes"] or None),  # 0: the engine does not measure it
        ]
        for row in rows
    ]
    return headers, cells


def _sweep_figure(summary: list[dict[str, Any]], by: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[by] for r in summary]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(xs, [r["mean_image_tokens"] or 0 for r in summary], marker="o")
    axes[0].set_title("image tokens")
    axes[1].plot(xs, [(r["mean_latency_s"] or 0) * 1000 for r in summary], marker="o")
    axes[1].set_title("latency (ms)")
    axes[2].plot(xs, [r["accuracy"] if r["accuracy"] is not None else float("nan") for r in summary], marker="o")
    axes[2].set_title("accuracy")
    for axis in axes:
        axis.set_xlabel(by)
    return fig


def load_questions(images: Sequence[str] = (), question: str | None = None, questions_file: Path | None = None, dataset: str | None = None, limit: int = 20, seed: int = 0) -> list[Question]:
    """Questions from ``--image``/``--question``, a JSONL file (``images``, ``question``,
    optional ``expected``; image paths relative to the file) or a dataset (``synth``: the nano
    tasks; other eval datasets through ``vlmlab.eval.datasets``)."""
    from vlmlab.media import MediaPolicy, load_image

    policy = MediaPolicy(allowed_local_root=Path("/"))
    out: list[Question] = []
    if question:
        out.append(Question(tuple(load_image(ref, policy).image for ref in images), question, label="q0"))
    if questions_file:
        base = Path(questions_file).parent
        for n, line in enumerate(Path(questions_file).read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            refs = [r if "://" in r or Path(r).is_absolute() else str(base / r) for r in row.get("images", [])]
            out.append(Question(tuple(load_image(r, policy).image for r in refs), row["question"], row.get("expected"), row.get("label", f"f{n}")))
    if dataset:
        if dataset != "synth":
            from vlmlab.eval.datasets import get_dataset, load_samples

            samples, _ = load_samples(get_dataset(dataset), limit=limit)
            for sample in samples:
                out.append(Question(tuple(sample.images), sample.question, sample.answers[0] if sample.answers else None, f"{dataset}/{sample.id}"))
        else:
            from vlmlab.nano.tasks import generate

            for sample in generate(limit, seed=seed):
                out.append(Question(tuple(sample.images), sample.question, sample.answer, f"synth/{sample.id}"))
    return out
