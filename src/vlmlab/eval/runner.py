"""``vlmlab eval``: run models over benchmarks, crash-safe and resumable.

Each answered sample is one JSON line appended to ``<output-dir>/<model>/<dataset>.jsonl`` and
flushed to disk at once, keyed by a hash of everything that decides the answer (dataset and its
revision, sample id, model, rendered prompt, image preprocessing options, generation
parameters, the answer format). A restarted run reads the keys already there, skips them, and
fills only the misses, so a run killed at any point ends with exactly the results of an
uninterrupted one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmlab.cache import content_key
from vlmlab.config import EngineSpec
from vlmlab.engines import Engine, GenerationRequest, check_model, complete, load_engine
from vlmlab.eval import answer_format
from vlmlab.eval.types import DatasetSpec, EvalSample
from vlmlab.protocol.core import Chat, ImageData, ImagePart, Message, SamplingParams
from vlmlab.protocol.errors import ConfigError, VlmlabError

logger = logging.getLogger(__name__)
IMAGE_MARK = "<image>"


@dataclass(frozen=True)
class EvalConfig:
    """One ``vlmlab eval`` invocation: every model x every dataset."""

    models: tuple[str, ...]
    datasets: tuple[str, ...]
    output_dir: Path
    engine: str = "hf"
    base_url: str | None = None
    api_key: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    batch_size: int = 8
    concurrency: int | None = None
    # copies of the model answering side by side (hf: processes; "auto": vlmlab.engines.copies)
    data_parallel_size: int | str = 1
    limit: int | None = None
    max_tokens: int | None = None
    seed: int = 0
    prompt_profile: str = "default"
    metric_mode: str | None = None
    data_dir: Path | None = None
    processor_options: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    # "text" (free answers, extracted by each metric's rules) or "json" (an enforced
    # {"answer": ...} per sample, see vlmlab.eval.answer_format); answer_schemas: the user's own
    # schemas as JSON text, by dataset key or "*" for every dataset (json only).
    response_format: str = "text"
    answer_schemas: Mapping[str, str] = field(default_factory=dict)
    # Ray: the samples spread over ``workers`` actors that each hold the model, on the cluster
    # at ``ray_address`` (None: a local one); results come back here, written by this process.
    ray: bool = False
    ray_address: str | None = None
    workers: int = 2

    def judge(self) -> Any:
        """The extraction judge, or None (the default: rules only, unparsed rows reported)."""
        if not self.judge_url:
            return None
        from vlmlab.eval.judge import Judge

        return Judge(self.judge_url, self.judge_model or "default", Path(self.output_dir) / "judge_cache.jsonl", self.judge_api_key)

    def engine_spec(self, model: str) -> EngineSpec:
        extra: dict[str, Any] = {}
        if self.base_url:
            extra["base_url"] = self.base_url
        if self.api_key:
            extra["api_key"] = self.api_key
        return EngineSpec(
            model=model,
            engine=self.engine,
            device=self.device,  # type: ignore[arg-type]
            dtype=self.dtype,  # type: ignore[arg-type]
            trust_remote_code=self.trust_remote_code,
            max_batch_size=self.batch_size,
            # Ray workers are the copies there: each actor holds one.
            data_parallel_size=1 if self.ray else self.data_parallel_size,
            processor_options=dict(self.processor_options),
            extra=extra,
        )


def model_slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model.strip("/"))[:120]


def image_digest(image: Any) -> str:
    """Content hash of decoded pixels (mode, size and bytes): identical images, identical keys."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def build_chat(spec: DatasetSpec, sample: EvalSample, profile: str, suffix: str = "") -> tuple[Chat, str, list[str]]:
    """The chat for a sample under a prompt profile, its rendered text (images as ``<image>``)
    and the image digests, in prompt order. ``suffix`` is appended to the prompt's last text
    (the JSON instruction of ``--response-format json``)."""
    builder = spec.prompts.get(profile)
    if builder is None:
        raise ConfigError(
            f"dataset {spec.key!r} has no prompt profile {profile!r}. Profiles: {', '.join(spec.prompts) or 'none'}"
        )
    pieces = builder(sample)
    if suffix:
        pieces = answer_format.with_suffix(pieces, suffix)
    parts: list[Any] = []
    rendered: list[str] = []
    digests: list[str] = []
    for piece in pieces:
        if isinstance(piece, int):
            image = sample.images[piece]
            digest = image_digest(image)
            digests.append(digest)
            parts.append(ImagePart(ref=f"{spec.key}/{sample.id}/{piece}", data=ImageData(image, image.width, image.height, "PIL", digest, 0)))
            rendered.append(IMAGE_MARK)
        else:
            parts.append(piece)
            rendered.append(piece)
    messages = [Message.of("user", *parts)]
    if spec.system_prompt:
        messages.insert(0, Message.of("system", spec.system_prompt))
        rendered.insert(0, f"[system] {spec.system_prompt}\n")
    return Chat(tuple(messages)), "".join(rendered), digests


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class ResultsFile:
    """Append-only JSONL of sample results; tolerates a torn last line from a killed run.

    Every record is flushed to the operating system as it is written, so a killed process
    (Ctrl-C, SIGKILL, an OOM kill) loses nothing. fsync, which only matters if the machine itself
    goes down, runs at most once per ``sync_interval_s`` and on close: one per record cost 12 ms
    here, 38% of a nano eval's wall time.
    """

    def __init__(self, path: Path, sync_interval_s: float = 1.0):
        self.path = path
        self.sync_interval_s = sync_interval_s
        self._synced = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._read()
        self._handle = path.open("a", encoding="utf-8")

    def _read(self) -> None:
        good_bytes = 0
        with self.path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a line cut by a crash: dropped and rewritten on resume
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    break
                self.records.setdefault(record["key"], record)
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            logger.warning("%s: dropping a torn last line left by an interrupted run", self.path)
            with self.path.open("r+b") as f:
                f.truncate(good_bytes)

    def append(self, record: dict[str, Any]) -> None:
        self.extend([record])

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` (flushed together; fsync when the interval has passed)."""
        if not records:
            return
        self._handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self._handle.flush()
        if time.monotonic() - self._synced >= self.sync_interval_s:
            self._sync()
        for record in records:
            self.records[record["key"]] = record

    def _sync(self) -> None:
        os.fsync(self._handle.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            self._sync()
        self._handle.close()


@dataclass
class DatasetRun:
    """What one (model, dataset) pair produced."""

    model: str
    dataset: str
    path: Path
    done_before: int = 0
    answered: int = 0
    errors: int = 0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    # Ray: "workers" (each read its own share of the dataset) or "driver" (sent from here)
    samples_read_by: str = "driver"


@dataclass(frozen=True)
class SamplePrompt:
    """One sample's chat, its rendered text, its generation parameters and its resume key."""

    chat: Chat
    rendered: str
    sampling: SamplingParams
    key: str


class SampleAnswerer:
    """One sample -> its prompt and resume key -> one result record, as :func:`run_dataset` writes
    it. The same code runs in the process that writes the results and, on the Ray path, in each
    worker that reads its own share of the dataset (:mod:`vlmlab.eval.ray_share`), so both give
    the same keys and records."""

    def __init__(self, engine_info: Any, model: str, spec: DatasetSpec, info: Mapping[str, Any], config: EvalConfig):
        self.engine_info, self.model, self.spec, self.info, self.config = engine_info, model, spec, info, config
        self.as_json = config.response_format == "json"
        self.custom = config.answer_schemas.get(spec.key) or config.answer_schemas.get(answer_format.ANY_DATASET)
        max_tokens = answer_format.max_tokens(spec, config.prompt_profile, config.response_format, config.max_tokens, bool(self.custom))
        self.base_sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=config.seed)

    def prompt(self, sample: EvalSample) -> SamplePrompt:
        config, custom = self.config, self.custom
        sampling, suffix, parts = self.base_sampling, "", []
        if self.as_json:  # the schema is in the sampling (and the instruction in the prompt) keyed below
            schema = json.loads(custom) if custom else answer_format.answer_schema(self.spec, sample)
            sampling = replace(self.base_sampling, structured=answer_format.structured(schema))
            suffix = answer_format.prompt_suffix(schema, custom=bool(custom))
            parts = [{"response_format": "json"}]  # text-mode keys stay those of earlier runs
        chat, rendered, digests = build_chat(self.spec, sample, config.prompt_profile, suffix)
        key = content_key(
            self.spec.key, self.info.get("revision"), sample.id, self.engine_info.engine, self.engine_info.model,
            rendered, digests, dict(config.processor_options), asdict(sampling), *parts,
        )  # fmt: skip
        return SamplePrompt(chat, rendered, sampling, key)

    async def answer(self, engine: Engine, sample: EvalSample, prompt: SamplePrompt) -> dict[str, Any]:
        """The result record; an engine error is recorded in it (``error``), never dropped.

        Raises:
            ConfigError: the answer schema (or structured outputs) fails: every sample would, so
                the run stops; the message names the flag, not the wire field.
        """
        spec, config = self.spec, self.config
        try:
            result = await complete(engine, GenerationRequest(prompt.chat, prompt.sampling, dict(config.processor_options)))
            prediction, error = result.text, None
            usage = {"prompt_tokens": result.prompt_tokens, "image_tokens": result.image_tokens, "completion_tokens": result.completion_tokens}
            timing = {"ttft_s": result.timings.ttft_s, "total_s": result.timings.total_s}
            finish = result.finish_reason
        except VlmlabError as exc:  # recorded, never silently dropped: the summary counts it
            if self.as_json and (exc.param == answer_format.PARAM or isinstance(exc, ConfigError)):
                flag = "--answer-schema" if self.custom else "--response-format json"
                reason = exc.message.removeprefix("response_format.json_schema.schema").lstrip(": ")
                raise ConfigError(f"{flag} ({spec.key}): {reason}") from exc
            prediction, error, usage, timing, finish = "", exc.message, {}, {}, "error"
        record = {
            "key": prompt.key,
            "dataset": spec.key,
            "sample_id": sample.id,
            "model": self.model,
            "engine": self.engine_info.engine,
            "prompt_profile": config.prompt_profile,
            "prompt": prompt.rendered,
            "image_sizes": [[im.width, im.height] for im in sample.images],
            "answers": jsonable(sample.answers),
            "fields": jsonable(sample.fields),
            "prediction": prediction,
            "finish_reason": finish,
            "error": error,
            "usage": usage,
            "timings": timing,
            "generation": asdict(prompt.sampling),
        }
        if self.as_json:  # the scored answer is the JSON's "answer"; the model's text stays beside it
            parsed = answer_format.parse_answer(prediction) if error is None else None
            record.update(prediction=parsed or "", raw_prediction=prediction, response_format="json", answer_parsed=parsed is not None)
        return record


async def run_dataset(
    engine: Engine,
    model: str,
    spec: DatasetSpec,
    samples: Iterable[EvalSample],
    info: Mapping[str, Any],
    config: EvalConfig,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> DatasetRun:
    """Answer every sample not yet in the results file; returns counts.

    With a :class:`~vlmlab.engines.ray_pool.RayEnginePool` the workers read the samples
    themselves (``load_samples(spec, config.data_dir, config.limit)``, see
    :mod:`vlmlab.eval.ray_share`) and ``samples`` is read here only when they cannot.
    """
    path = Path(config.output_dir) / model_slug(model) / f"{spec.key}.jsonl"
    results = ResultsFile(path)
    done = sum(r.get("response_format", "text") == config.response_format for r in results.records.values())
    run = DatasetRun(model, spec.key, path, done_before=done, info=dict(info))
    start = time.perf_counter()

    def write(records: list[dict[str, Any]]) -> None:
        fresh = [r for r in records if r["key"] not in results.records]
        results.extend(fresh)
        for record in fresh:
            run.answered += 1
            run.errors += record["error"] is not None
            if on_result:
                on_result(record)

    try:
        from vlmlab.engines.ray_pool import RayEnginePool

        if isinstance(engine, RayEnginePool):
            from vlmlab.eval.ray_share import answer_on_workers

            if await answer_on_workers(engine, model, spec, info, config, set(results.records), write):
                run.samples_read_by = "workers"
        if run.samples_read_by == "driver":
            await _answer_here(engine, SampleAnswerer(engine.info(), model, spec, info, config), samples, results, config, write)
    finally:
        results.close()
    run.seconds = time.perf_counter() - start
    return run


async def _answer_here(
    engine: Engine,
    answerer: SampleAnswerer,
    samples: Iterable[EvalSample],
    results: ResultsFile,
    config: EvalConfig,
    write: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Read the samples in this process, build their prompts here, send each to ``engine``."""
    details = engine.info().details or {}
    copies = int(details.get("data_parallel_size") or 1)
    gate = asyncio.Semaphore(config.concurrency or max(1, config.batch_size * 2 * copies))
    fatal: list[BaseException] = []

    async def answer(sample: EvalSample, prompt: SamplePrompt) -> None:
        try:
            record = await answerer.answer(engine, sample, prompt)
        except BaseException as exc:
            fatal.append(exc)
            raise
        finally:
            gate.release()
        write([record])

    pending: set[asyncio.Task[None]] = set()
    try:
        # Samples are read lazily and at most `gate` of them are in flight, so a 5,000-image
        # dataset never sits in memory at once.
        for sample in samples:
            prompt = answerer.prompt(sample)
            if prompt.key in results.records:
                continue
            await gate.acquire()
            if fatal:
                gate.release()
                break
            task = asyncio.create_task(answer(sample, prompt))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    finally:
        for task in pending:
            task.cancel()


def check_answer_format(config: EvalConfig, specs: Iterable[DatasetSpec]) -> None:
    """``--response-format`` / ``--answer-schema`` settings that cannot work fail before any work.

    Raises:
        ConfigError: an unknown format, schemas without ``json``, a schema for a dataset the run
            does not evaluate, or a schema without an ``answer`` property.
    """
    if config.response_format not in answer_format.RESPONSE_FORMATS:
        raise ConfigError(f"--response-format {config.response_format!r} is not one of: {', '.join(answer_format.RESPONSE_FORMATS)}")
    if config.answer_schemas and config.response_format != "json":
        raise ConfigError("--answer-schema needs --response-format json")
    keys = {spec.key for spec in specs}
    for key, text in config.answer_schemas.items():
        if key != answer_format.ANY_DATASET and key not in keys:
            raise ConfigError(f"--answer-schema names {key}, which this run does not evaluate (datasets: {', '.join(sorted(keys))})")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the answer schema for {key} is not valid JSON ({exc.msg})") from None
        if not isinstance(schema, dict):
            raise ConfigError(f"the answer schema for {key} must be a JSON object")
        answer_format.check_custom_schema(schema, f"the answer schema for {key}")


def check_structured_outputs(engine: Engine) -> None:
    """``--response-format json`` needs an engine that enforces a JSON schema.

    Raises:
        ConfigError: naming the engine and the ones that can.
    """
    from vlmlab.engines.base import check_features
    from vlmlab.protocol.errors import BadRequestError

    probe = SamplingParams(structured=answer_format.structured({"type": "object"}))
    try:
        check_features(engine.name, engine.capabilities, probe)
    except BadRequestError:
        raise ConfigError(
            f"--response-format json needs structured outputs, which the {engine.name} engine does not "
            "enforce; use --engine hf, vllm or remote, or --response-format text"
        ) from None


def load_model(config: EvalConfig, model: str) -> Engine:
    if config.ray:
        from vlmlab.engines.ray_pool import RayEnginePool

        return RayEnginePool(config.engine_spec(model), config.workers, config.ray_address)
    return load_engine(config.engine_spec(model))


def _progress(config: EvalConfig, total: int | None, label: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[rate]:.2f} samples/s  score {task.fields[score]}"),
        disable=not config.progress,
    )  # fmt: skip
    task = progress.add_task(label, total=total, rate=0.0, score="-")
    return progress, task


def run_eval(config: EvalConfig) -> list[dict[str, Any]]:
    """Every model x dataset: answer what is missing, then score and write the summaries.

    Writes ``<output-dir>/<model>/<dataset>.jsonl`` (one line per sample), ``...summary.json``
    next to it, and ``<output-dir>/summary.json`` + ``summary.md`` over everything in the folder.
    """
    from vlmlab.eval.datasets import get_dataset, load_samples
    from vlmlab.eval.scoring import resolve_mode, score_record, summarize

    specs = [get_dataset(key) for key in config.datasets]  # unknown names fail before any work
    check_answer_format(config, specs)
    for spec in specs:
        resolve_mode(spec, config.metric_mode)
        if config.prompt_profile not in spec.prompts:
            raise ConfigError(f"dataset {spec.key!r} has no prompt profile {config.prompt_profile!r}. Profiles: {', '.join(spec.prompts)}")
    # Every dataset opens before any model loads: a missing copy fails in seconds, not after a
    # model load (each model after the first reopens them: the samples are a one-pass iterator).
    opened = {spec.key: load_samples(spec, config.data_dir, config.limit) for spec in specs}
    for model in config.models:  # and every model is there before the first one loads
        check_model(config.engine_spec(model))
    summaries = []
    judge = config.judge()
    for model in config.models:
        engine = load_model(config, model)
        try:
            if config.response_format == "json":
                check_structured_outputs(engine)
            for spec in specs:
                samples, info = opened.pop(spec.key, None) or load_samples(spec, config.data_dir, config.limit)
                total = min(info.rows, config.limit) if config.limit is not None else info.rows
                progress, task = _progress(config, total, f"{model} · {spec.key}")
                scores: list[float] = []
                started = time.perf_counter()
                mode = resolve_mode(spec, config.metric_mode)

                def on_result(record: dict[str, Any]) -> None:
                    value = score_record(spec, record, mode).score
                    if value is not None:
                        scores.append(value)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    progress.update(task, advance=1, rate=len(scores) / elapsed, score=f"{100 * sum(scores) / max(1, len(scores)):.1f}")

                with progress:
                    existing = ResultsFile(Path(config.output_dir) / model_slug(model) / f"{spec.key}.jsonl")
                    progress.update(task, advance=sum(r.get("response_format", "text") == config.response_format for r in existing.records.values()))
                    existing.close()
                    run = asyncio.run(run_dataset(engine, model, spec, samples, dict(info), config, on_result))
                from vlmlab.eval.scoring import read_records

                # Only this run's answer format: a results file may also hold answers given the other way.
                records = read_records(run.path, config.response_format)
                summary = summarize(spec, records, config.metric_mode, dict(info), judge)
                summary["run"] = {
                    "answered_now": run.answered, "resumed_from": run.done_before, "errors_now": run.errors,
                    "wall_seconds": round(run.seconds, 3),
                    "samples_per_second": round(run.answered / run.seconds, 3) if run.seconds > 0 else None,
                }  # fmt: skip
                summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "judge_api_key"}
                if hasattr(engine, "cluster"):  # a Ray run: where it ran
                    summary["cluster"] = {**engine.cluster(), "samples_read_by": run.samples_read_by}
                run.path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2, default=str))
                summaries.append(summary)
        finally:
            engine.close()
    write_overview(Path(config.output_dir))
    return summaries


def rescore(output_dir: Path, metric_mode: str | None = None, judge: Any = None) -> list[dict[str, Any]]:
    """``vlmlab score``: re-score every stored results file without inference.

    Nothing a run recorded is lost: the new summaries keep each old summary's ``run`` and
    ``settings``. With ``metric_mode`` they are written beside the run's own
    (``<dataset>.<mode>.summary.json``, ``summary.<mode>.json`` / ``.md``); without it (each
    dataset's default mode) they replace them, merged.
    """
    from vlmlab.eval.datasets import get_dataset
    from vlmlab.eval.scoring import read_records, run_response_format, summarize

    files = sorted(Path(output_dir).glob("*/*.jsonl"))
    if not files:
        raise ConfigError(f"no results (<model>/<dataset>.jsonl) under {output_dir}")
    summaries = []
    for path in files:
        spec = get_dataset(path.stem)
        old_path = path.with_suffix(".summary.json")
        old = json.loads(old_path.read_text()) if old_path.exists() else {}
        # The answer format of the run that wrote the summary (a file may hold both formats).
        records = read_records(path, run_response_format(path))
        summary = summarize(spec, records, metric_mode, old.get("dataset_info", {}), judge)
        summary.update({key: old[key] for key in ("run", "settings") if key in old})
        summary_name = ".summary.json" if metric_mode is None else f".{metric_mode}.summary.json"
        path.with_suffix(summary_name).write_text(json.dumps(summary, indent=2, default=str))
        summaries.append(summary)
    write_overview(Path(output_dir), summaries, metric_mode)
    return summaries


def overview_paths(output_dir: Path, metric_mode: str | None = None) -> tuple[Path, Path]:
    """``summary.json`` / ``summary.md``, or ``summary.<mode>.*`` for a re-score in another mode."""
    stem = "summary" if metric_mode is None else f"summary.{metric_mode}"
    return output_dir / f"{stem}.json", output_dir / f"{stem}.md"


def write_overview(output_dir: Path, summaries: list[dict[str, Any]] | None = None, metric_mode: str | None = None) -> None:
    from vlmlab.eval.scoring import markdown_table

    if summaries is None:
        summaries = [json.loads(p.read_text()) for p in sorted(output_dir.glob("*/*.summary.json")) if p.name.count(".") == 2]
    json_path, markdown_path = overview_paths(output_dir, metric_mode)
    json_path.write_text(json.dumps(summaries, indent=2, default=str))
    markdown_path.write_text(markdown_table(summaries))
