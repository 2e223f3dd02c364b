"""Batched decoding for the transformers engine.

Concurrent requests are collected by one worker thread, left-padded into a batch and decoded
together by ``model.generate``. Everything per request rides on two hooks that transformers calls
every step: :class:`RowSampler` (a logits processor) samples each row with its own temperature /
top-k / top-p and seeded generator, then leaves only that token so greedy selection picks it
(so a seeded request gives the same answer at any batch size, and greedy rows are untouched);
:class:`RowTracker` (a stopping criterion) records each row's new token, detokenizes, applies
stop strings, max_tokens, EOS and cancellation, and streams text back to the request's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from vlmlab.engines.hf.logits import TokenPieces, process_row, token_logprob
from vlmlab.engines.hf.preprocess import pad_cat, token_aligned
from vlmlab.protocol.core import FinishReason, GenerationChunk, SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # identity semantics: jobs are compared with `is`, never by their tensors
class Job:
    """One request inside the batcher; fields below ``inputs`` are written by the worker."""

    inputs: dict[str, Any]  # processor output for this request alone (batch dimension 1)
    prompt_tokens: int
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # GenerationChunk items, then a final ("done", reason) / ("error", exc)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    started: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    sent_tokens: int = 0  # tokens already accounted for in streamed chunks
    stream: bool = True  # False: no chunks, only the end (the caller reads the result)
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    image_features: list[torch.Tensor] | None = None  # encoded ahead: one tensor per image
    image_keys: list[str] = field(default_factory=list)  # the images' content keys (encoder cache)
    constraint: Any = None  # structured outputs: a structured.TokenConstraint
    prompt_ids: torch.Tensor | None = None  # distinct prompt ids (repetition_penalty), lazily
    step_logprobs: torch.Tensor | None = None  # this step's processed log probabilities
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    sent_logprobs: int = 0  # logprobs already streamed
    queued: float | None = None  # when it reached the batcher (after a replica's hop and encode)
    # Seconds by stage, written where they happen: "detokenize" (the incremental text, summed over
    # the tokens), and in a replica "replica_send" and "encode" (HFEngine.generate reports them).
    stages: dict[str, float] = field(default_factory=dict)

    def emit(self, item: Any) -> None:
        pending = getattr(_emits, "pending", None)
        if pending is not None:  # inside batched_emits(): delivered together at its end
            pending.append((self, item))
        else:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


_emits = threading.local()


@contextmanager
def batched_emits() -> Iterator[None]:
    """Collect every ``Job.emit`` of this thread and deliver them with one wake-up per event
    loop at the end: a decode step of 16 rows then costs the loop one callback, not 16."""
    _emits.pending = []
    try:
        yield
    finally:
        pending, _emits.pending = _emits.pending, None
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for job, item in pending:
            by_loop.setdefault(job.loop, []).append((job.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its consumers are gone
                pass


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def left_pad_collate(jobs: Sequence[Job], pad_id: int) -> dict[str, Any]:
    """Merge per-request processor outputs into one batch.

    ``input_ids`` / ``attention_mask`` are left-padded. Every other tensor is zero-padded on each
    non-batch dimension to the largest in the batch and concatenated on dimension 0: that covers
    Pixtral's per-image pixel canvases (the model crops by ``image_sizes``), LLaVA-NeXT's patch
    lists, Idefics' image slots (all-zero images are skipped by the model) and Qwen's flat patch
    rows. Tensors with one entry per prompt token (Qwen's ``mm_token_type_ids``) are left-padded
    with zeros like the ids (a row without one gets zeros: all text). Non-tensor values must
    agree across the batch.
    """
    width = max(j.inputs["input_ids"].shape[1] for j in jobs)
    ids, masks = [], []
    for job in jobs:
        row = job.inputs["input_ids"]
        pad = width - row.shape[1]
        ids.append(torch.nn.functional.pad(row, (pad, 0), value=pad_id))
        mask = job.inputs.get("attention_mask", torch.ones_like(row))
        masks.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
    batch: dict[str, Any] = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
    keys = {k for j in jobs for k in j.inputs} - {"input_ids", "attention_mask"}
    for key in sorted(keys):
        values = [j.inputs[key] for j in jobs if j.inputs.get(key) is not None]
        if not values:
            continue
        if all(token_aligned(j.inputs[key], j.inputs["input_ids"].shape[1]) for j in jobs if j.inputs.get(key) is not None):
            rows = [j.inputs.get(key) for j in jobs]
            rows = [torch.zeros(j.inputs["input_ids"].shape, dtype=values[0].dtype) if r is None else r for j, r in zip(jobs, rows)]
            batch[key] = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=0) for r in rows])
            continue
        if not isinstance(values[0], torch.Tensor):
            if any(v != values[0] for v in values):
                raise ValueError(f"cannot batch differing {key!r} values")
            batch[key] = values[0]
            continue
        if values[0].dim() == 0:
            batch[key] = values[0]
            continue
        batch[key] = pad_cat(values)
    return batch


def start_batch(jobs: Sequence[Job], pad_id: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Mark ``jobs`` started and build their model inputs: collated, on ``device``, floating
    pixel tensors in the model's ``dtype``."""
    now = time.perf_counter()
    for job in jobs:
        job.started = now
    batch = left_pad_collate(jobs, pad_id)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


class RowSampler(LogitsProcessor):
    """Per-row sampling on top of greedy selection (see module docstring)."""

    def __init__(self, jobs: Sequence[Job], eos_ids: set[int] = frozenset()):
        self.jobs = jobs
        self.eos_ids = sorted(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        quiet = [row for row, job in enumerate(self.jobs) if job.sampling.ignore_eos]
        if quiet and self.eos_ids:  # one indexing op for every ignore_eos row
            rows = torch.tensor(quiet, device=scores.device)[:, None]
            scores[rows, torch.tensor(self.eos_ids, device=scores.device)] = float("-inf")
        for row, job in enumerate(self.jobs):  # bias, penalties, min_tokens
            if job.finish_reason is None and job.sampling.processes_logits:
                process_row(job, scores[row], self.eos_ids)
        constraints = [job.constraint if job.finish_reason is None else None for job in self.jobs]
        if any(c is not None for c in constraints):  # structured outputs: one mask for the batch
            from vlmlab.engines.hf.structured import mask_rows

            mask_rows(scores, constraints)
        for row, job in enumerate(self.jobs):
            if job.finish_reason is None and job.sampling.logprobs:
                job.step_logprobs = torch.log_softmax(scores[row].double(), dim=-1)
        for row, job in enumerate(self.jobs):
            params = job.sampling
            if params.greedy or job.finish_reason is not None:
                continue
            # float64 and the max subtracted: a tiny temperature (1e-30) must not overflow to inf
            logits = scores[row].double() / params.temperature
            logits = logits - logits.max()
            if params.top_k:
                kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
                keep[0] = True
                mask = torch.zeros_like(probs, dtype=torch.bool)
                mask[order[keep]] = True
                probs = torch.where(mask, probs, torch.zeros_like(probs))
            if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0:
                token = torch.multinomial(probs.cpu(), 1, generator=job.generator).item()
            else:  # degenerate parameters left no distribution: the most likely token
                token = int(scores[row].argmax())
            chosen = torch.full_like(scores[row], float("-inf"))
            chosen[token] = 0.0
            scores[row] = chosen
        return scores


class RowTracker(StoppingCriteria):
    """Collects each row's tokens, streams text, and decides when each row is done."""

    def __init__(
        self,
        jobs: Sequence[Job],
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        on_step: Callable[[], None] | None = None,
        pieces: TokenPieces | None = None,
    ):
        self.jobs = jobs
        self.decode = decode
        self.eos_ids = eos_ids
        self.on_step = on_step
        self.pieces = pieces  # token text and bytes, for logprobs
        self.aborted = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        now = time.perf_counter()
        if self.on_step is not None:
            self.on_step()
        new_tokens = input_ids[:, -1].tolist()
        done = []
        for job, token in zip(self.jobs, new_tokens):
            if job.finish_reason is None:
                self._advance(job, token, now)
            done.append(job.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, job: Job, token: int, now: float) -> None:
        if job.cancelled:
            job.finish_reason = "abort"
            self.aborted += 1
            return
        job.first_token = job.first_token or now
        job.last_token = now
        if token in self.eos_ids and not job.sampling.ignore_eos:
            job.finish_reason = "stop"
        else:
            job.token_ids.append(token)
            if job.step_logprobs is not None and self.pieces is not None:
                record = token_logprob(job.step_logprobs, token, job.sampling.top_logprobs, self.pieces)
                job.logprobs = [*(job.logprobs or []), record]
            accepted = job.constraint is None or job.constraint.accept(token)
            detokenize = time.perf_counter()
            job.text = self.decode(job.token_ids)
            job.stages["detokenize"] = job.stages.get("detokenize", 0.0) + time.perf_counter() - detokenize
            stops = job.sampling.stop
            hits = [job.text.find(s) for s in stops if s and s in job.text]
            if hits:
                job.text = job.text[: min(hits)]
                job.finish_reason = "stop"
            elif not accepted:  # cannot happen after the mask; never let it pass silently
                logger.error("structured output: token %d was not allowed; ending the answer", token)
                job.finish_reason = "stop"
            elif job.constraint is not None and job.constraint.done:  # the answer is complete
                job.finish_reason = "stop"
            elif len(job.token_ids) >= job.sampling.max_tokens:
                job.finish_reason = "length"
        job.step_logprobs = None
        self._stream(job)

    @staticmethod
    def _stream(job: Job) -> None:
        """Send the text that can no longer change: hold back a partial stop string or a
        half-decoded character (U+FFFD) at the end until the next token settles it."""
        if not job.stream:
            return
        text = job.text
        limit = len(text)
        if job.finish_reason is None:
            if text.endswith("\ufffd"):
                limit = text.rstrip("\ufffd").__len__()
            for stop in job.sampling.stop:
                for k in range(min(len(stop) - 1, limit), 0, -1):
                    if text[:limit].endswith(stop[:k]):
                        limit -= k
                        break
        pending = job.logprobs[job.sent_logprobs :] if job.logprobs and (limit > job.sent or job.finish_reason) else None
        if limit > job.sent or pending:
            chunk = GenerationChunk(text=text[job.sent : limit], token_count=len(job.token_ids) - job.sent_tokens, logprobs=tuple(pending) if pending else None)
            job.emit(chunk)
            job.sent, job.sent_tokens = max(limit, job.sent), len(job.token_ids)
            job.sent_logprobs = len(job.logprobs or ())


class Batcher:
    """One worker thread that decodes waiting jobs in batches of up to ``max_batch_size``."""

    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch_size: int, name: str = "hf", decoder: Any = None):
        self.run_batch = run_batch
        self.decoder = decoder  # a ContinuousDecoder: requests join and leave between steps
        self.max_batch_size = max_batch_size
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0
        self.aborted_total = 0  # rows stopped because their consumer went away
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"vlmlab-{name}-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            job.queued = time.perf_counter()
            self._waiting.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self.decoder is not None:
            self.decoder.close()

    def mark_progress(self) -> None:
        self.last_progress = time.monotonic()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        if self.decoder is not None:
            self._continuous_loop()
            return
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for job in self._waiting:
                        job.emit(("error", RuntimeError("engine closed")))
                    return
                dropped = [j for j in self._waiting if j.cancelled]
                live = [j for j in self._waiting if not j.cancelled]
                batch, self._waiting = live[: self.max_batch_size], live[self.max_batch_size :]
            for job in dropped:
                self.aborted_total += 1
                job.emit(("done", "abort"))
            if not batch:
                continue
            self.running = len(batch)
            try:
                self.run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - reported to every request of the batch
                logger.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.emit(("error", exc))
            finally:
                self.running = 0
                self.last_progress = time.monotonic()

    def _continuous_loop(self) -> None:
        decoder = self.decoder
        while True:
            with self._cond:
                while not self._waiting and not decoder.active and not decoder.pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for job in [*self._waiting, *decoder.jobs, *decoder.pending_jobs]:
                        job.emit(("error", RuntimeError("engine closed")))
                    return
                dropped = [j for j in self._waiting if j.cancelled]
                live = [j for j in self._waiting if not j.cancelled]
                room = self.max_batch_size - decoder.active - decoder.pending
                new, self._waiting = live[:room], live[room:]
            for job in dropped:
                self.aborted_total += 1
                job.emit(("done", "abort"))
            try:
                if new:
                    decoder.admit(new)
                decoder.collect(wait=not decoder.active)  # nothing to decode: wait for a prefill
                if decoder.active:
                    decoder.step()
            except Exception as exc:  # noqa: BLE001 - reported to every request in flight
                logger.exception("continuous batch step failed")
                for job in {id(j): j for j in [*new, *decoder.jobs]}.values():
                    job.emit(("error", exc))
                decoder.reset()
            self.aborted_total += decoder.aborted
            decoder.aborted = 0
            self.running = decoder.active
