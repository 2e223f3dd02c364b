"""``vlmlab eval --ray``: each Ray worker reads its own share of the dataset (issue 20).

The process that runs :func:`~vlmlab.eval.runner.run_dataset` (the driver) hands out shares:
ranges of sample positions, ``batch_size`` samples each, two per worker in flight, to whichever
worker holds the fewest. A worker opens the dataset itself (``load_samples`` with the driver's
dataset spec, ``--data-dir`` and ``--limit``; its copy must have the driver's revision), reads
the samples of its range, builds their prompts and resume keys with the driver's code
(:class:`~vlmlab.eval.runner.SampleAnswerer`), skips the keys already in the results file,
answers the others and returns their result records. The driver only writes them: no image is
drawn, decoded, hashed or pickled in it, which on a small machine is what let workers scale.

A worker keeps its open dataset between calls and reads forward from where it stopped (skipping
the other workers' ranges), so each sample is decoded about once per worker rather than once
per range. A worker that dies mid-range is restarted by Ray and its range sent again (the pool's
retries); it reopens the dataset, and the driver writes each range's records once, so nothing is
lost or written twice. Where the workers cannot open the dataset (not on their node, another
revision, a spec they cannot import) the driver falls back to sending them the samples.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from vlmlab.engines.ray_pool import RayEnginePool
from vlmlab.eval.runner import EvalConfig, SampleAnswerer
from vlmlab.eval.types import DatasetSpec, EvalSample
from vlmlab.protocol.errors import NotFoundError

logger = logging.getLogger(__name__)
RANGES_PER_WORKER = 2  # in flight: a worker answers one range while the next waits beside it


@dataclass(frozen=True)
class ShareJob:
    """What a worker needs to answer any range of one (model, dataset) run as the driver would.

    ``done``: the keys already in the results file (a resumed run); ``info``: the driver's
    dataset info (its revision is part of every key).
    """

    id: str
    model: str
    spec: DatasetSpec
    info: Mapping[str, Any]
    config: EvalConfig
    done: frozenset[str]


class _Share:
    """A worker's open copy of a job's dataset, read forward from ``position``."""

    def __init__(self, job: ShareJob, engine_info: Any):
        self.job = job
        self.answerer = SampleAnswerer(engine_info, job.model, job.spec, job.info, job.config)
        self.samples: Iterator[EvalSample] | None = None
        self.position = 0

    def open(self) -> None:
        from vlmlab.eval.datasets import load_samples

        job = self.job
        samples, info = load_samples(job.spec, job.config.data_dir, job.config.limit)
        mine, theirs = (info.get("revision"), info.get("rows")), (job.info.get("revision"), job.info.get("rows"))
        if mine != theirs:
            raise NotFoundError(
                f"{job.spec.key}: this worker's copy (revision, rows) {mine} is not the driver's {theirs}"
            )
        self.samples, self.position = samples, 0

    def take(self, start: int, stop: int) -> list[EvalSample]:
        """Samples ``start`` to ``stop`` (fewer at the end of the dataset)."""
        if self.samples is None or self.position > start:  # a range behind us: read from the top
            self.open()
        assert self.samples is not None
        self.position += sum(1 for _ in islice(self.samples, start - self.position))
        if self.position < start:
            return []
        taken = list(islice(self.samples, stop - start))
        self.position += len(taken)
        return taken


async def _share(engine: Any, scratch: dict[str, Any], job_id: str, box: list[Any]) -> _Share:
    share = scratch.get("eval_share")
    if share is None or share.job.id != job_id:
        job = await box[0]
        share = scratch.get("eval_share")  # another call may have opened it meanwhile
        if share is None or share.job.id != job_id:
            share = scratch["eval_share"] = _Share(job, engine.info())  # the last job only
    return share


async def open_share(engine: Any, scratch: dict[str, Any], job_id: str, box: list[Any]) -> None:
    """In a worker: fetch the job and open its dataset (fails where the worker cannot)."""
    share = await _share(engine, scratch, job_id, box)
    if share.samples is None:
        share.open()


async def answer_range(engine: Any, scratch: dict[str, Any], job_id: str, box: list[Any], start: int, stop: int) -> tuple[list[dict[str, Any]], int]:
    """In a worker: the records of samples ``start`` to ``stop`` not yet answered, and how many
    samples the range held (fewer than asked: the dataset ended)."""
    share = await _share(engine, scratch, job_id, box)
    samples = share.take(start, stop)
    prompted = [(sample, share.answerer.prompt(sample)) for sample in samples]
    todo = [(sample, prompt) for sample, prompt in prompted if prompt.key not in share.job.done]
    records = await asyncio.gather(*(share.answerer.answer(engine, sample, prompt) for sample, prompt in todo))
    return list(records), len(samples)


async def answer_on_workers(
    pool: RayEnginePool,
    model: str,
    spec: DatasetSpec,
    info: Mapping[str, Any],
    config: EvalConfig,
    done: set[str],
    write: Callable[[list[dict[str, Any]]], None],
) -> bool:
    """Answer the dataset with each worker reading its own ranges; ``write`` gets each range's
    records. False, with nothing answered, when the workers cannot open the dataset."""
    data_dir = None if config.data_dir is None else Path(config.data_dir).expanduser().resolve()
    job_config = replace(config, data_dir=data_dir, judge_api_key=None, api_key=None)
    job = ShareJob(uuid.uuid4().hex, model, spec, dict(info), job_config, frozenset(done))
    try:
        box = pool.put(job)
        await pool.call_each(open_share, job.id, box)
    except Exception as exc:  # noqa: BLE001 - any reason means: send the samples from here
        logger.warning("the Ray workers cannot read %s themselves (%s); sending them the samples", spec.key, exc)
        return False
    sizes = [n for n in (info.get("rows"), config.limit) if n is not None]
    end = min(sizes) if sizes else sys.maxsize  # lowered when a range comes back short
    step = max(1, config.batch_size)
    position = 0
    pending: dict[asyncio.Future[Any], tuple[int, int]] = {}
    try:
        while pending or position < end:
            while position < end and len(pending) < RANGES_PER_WORKER * len(pool.workers):
                stop = min(position + step, end)
                pending[asyncio.ensure_future(pool.call(answer_range, job.id, box, position, stop))] = (position, stop)
                position = stop
            finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = None
            for future in finished:
                start, stop = pending.pop(future)
                if future.exception() is not None:
                    failed = failed or future.exception()
                    continue
                records, held = future.result()
                if held < stop - start:
                    end = min(end, start + held)
                write(records)
            if failed is not None:  # the other ranges' records are written first
                raise failed
    finally:
        for future in pending:
            future.cancel()
    return True
