"""Continuous batching for the transformers engine (standard-RoPE decoder language models).

``model.generate`` decodes a fixed batch to the end, so a request that arrives one step after a
batch started waits for its longest member. Here one decode step runs for all active requests;
between steps, new requests are prefilled (together, left-padded) and their KV caches merged into
the running batch, and finished requests leave it at once. Inputs follow what ``generate`` builds
for left-padded batches (position ids from the attention mask, the 2-D mask extended each step),
so greedy answers equal the ``generate`` path's; sampling, stops and streaming reuse
:class:`RowSampler` / :class:`RowTracker`.

Supported when every cache layer is a plain ``DynamicLayer`` and the text model uses 1-D rotary
positions (Mistral, Llama, Qwen2 text models: nano, Pixtral, LLaVA-NeXT/OneVision, Idefics);
Qwen2-VL's 3-D M-RoPE keeps the ``generate`` path.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmlab.engines.hf.batching import Job, RowSampler, RowTracker, batched_emits, start_batch

logger = logging.getLogger(__name__)

# Text-model types whose positions are plain 1-D indices (config.text_config.model_type).
ROPE_1D_TEXT_MODELS = frozenset({"mistral", "llama", "qwen2", "gemma", "phi3", "internlm2"})


def supports_continuous(model: Any) -> bool:
    """Plain 1-D RoPE text model with full attention (no sliding window, no scaled RoPE)."""
    config = getattr(model.config, "text_config", model.config)
    if getattr(config, "model_type", "") not in ROPE_1D_TEXT_MODELS or getattr(config, "sliding_window", None):
        return False
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return not isinstance(scaling, dict) or scaling.get("rope_type", "default") == "default"


# Prefills at least this many (padded) tokens may use more intra-op threads than decode steps.
PREFILL_WIDE_TOKENS = 256


def length_groups(lengths: list[int], slack: float = 1.3) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, shortest first, such that padding a
    group to its longest member costs at most ``slack`` times its real tokens."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > slack * (total + lengths[i]):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        groups.append(current)
    return groups


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass
class _Prefilled:
    """A prefill's result, waiting to join the running batch."""

    jobs: list[Job]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    aborted: int


class ContinuousDecoder:
    """The running batch: its jobs, KV cache, attention mask, next positions and last tokens."""

    def __init__(
        self, model: Any, pad_id: int, eos_ids: set[int], decode: Callable[[list[int]], str], device: str,
        on_step: Callable[[], None], prefill_threads: int = 1, overlap: bool = False,
    ):  # fmt: skip
        self.model = model
        # The forward argument that takes the KV cache: ``cache`` since transformers 5.2x, which
        # warns on every call that still passes ``past_key_values`` (removed in 5.40); earlier
        # releases know only ``past_key_values``.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # overlap: prefills run on their own thread while this one keeps decoding
        self._prefiller = ThreadPoolExecutor(1, thread_name_prefix="vlmlab-prefill") if overlap else None
        self._pending: list[tuple[Future[_Prefilled], list[Job]]] = []
        self.prefill_threads = prefill_threads
        text_config = getattr(model.config, "text_config", model.config)
        self.sdpa = getattr(text_config, "_attn_implementation", None) == "sdpa"
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.decode = decode
        self.device = device
        self.on_step = on_step
        self.jobs: list[Job] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T]
        self.positions: torch.Tensor | None = None  # [B] next position id
        self.last: torch.Tensor | None = None  # [B] last sampled token
        self.aborted = 0
        self.max_len = 1 << 30
        self.pieces: Any = None  # logits.TokenPieces, for logprobs (set by the engine)
        # Decode steps straight through the text decoder and the LM head, past the multimodal
        # wrapper's forward (a tenth of a nano step on a CPU: its embedding merge checks and output
        # objects). None until the first step has checked that it gives the wrapper's logits.
        self._direct: tuple[Any, Any, str] | None = None
        self._direct_checked = False

    @property
    def active(self) -> int:
        return len(self.jobs)

    def close(self) -> None:
        """Stop the prefill thread (prefills in flight finish; nobody collects them)."""
        if self._prefiller is not None:
            self._prefiller.shutdown(wait=False, cancel_futures=True)

    def reset(self) -> None:
        self.jobs, self.cache, self.mask, self.positions, self.last = [], None, None, None, None

    # -- one forward ---------------------------------------------------------------------------

    def _sample(self, jobs: list[Job], logits: torch.Tensor, tracker: RowTracker) -> torch.Tensor:
        scores = RowSampler(jobs, self.eos_ids)(None, logits.float().clone())  # type: ignore[arg-type]
        tokens = scores.argmax(dim=-1)
        now = time.perf_counter()
        for job, token in zip(jobs, tokens.tolist()):
            if job.finish_reason is None:
                tracker._advance(job, token, now)
        return tokens

    def admit(self, new: list[Job]) -> None:
        """Prefill ``new`` in groups of similar prompt length (left-padding a short prompt to a
        long one's length is computation thrown away) and merge them into the running batch.

        With a prefill thread (``overlap``) and a batch already decoding, the prefills run there
        while this thread keeps stepping the batch; :meth:`collect` merges them when done."""
        groups = [[new[i] for i in group] for group in length_groups([job.prompt_tokens for job in new])]
        if self._prefiller is None or not self.jobs:  # nothing to overlap with
            with batched_emits():
                for group in groups:
                    self._adopt(self._prefill(group))
            return
        for group in groups:
            self._pending.append((self._prefiller.submit(self._prefill_emitting, group), group))

    @property
    def pending(self) -> int:
        """Jobs whose prefill runs on the prefill thread."""
        return sum(len(jobs) for _, jobs in self._pending)

    @property
    def pending_jobs(self) -> list[Job]:
        return [job for _, jobs in self._pending for job in jobs]

    def collect(self, wait: bool = False) -> None:
        """Merge finished prefills into the running batch (``wait``: the first, even unfinished)."""
        keep = []
        for index, (future, jobs) in enumerate(self._pending):
            if not (future.done() or (wait and index == 0)):
                keep.append((future, jobs))
                continue
            try:
                done = future.result()
            except Exception as exc:  # noqa: BLE001 - reported to the requests of that prefill
                logger.exception("prefill of %d request(s) failed", len(jobs))
                for job in jobs:
                    job.emit(("error", exc))
                continue
            with batched_emits():
                self._adopt(done)
        self._pending = keep

    def _prefill_emitting(self, new: list[Job]) -> _Prefilled:
        with batched_emits():  # first tokens, delivered from the prefill thread
            return self._prefill(new)

    def _prefill(self, new: list[Job]) -> _Prefilled:
        """Run the prompts of ``new`` and sample their first tokens (any thread; touches only
        ``new`` and the model)."""
        batch = start_batch(new, self.pad_id, self.device, self.model.dtype)
        mask = batch["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        # Opt-in (extra.prefill_threads): a prefill's matrix products are big enough for more
        # intra-op threads than decode steps use, on cores nothing else needs; restored after.
        decode_threads = torch.get_num_threads()
        wide = self.prefill_threads > decode_threads and mask.numel() >= PREFILL_WIDE_TOKENS
        if wide:
            torch.set_num_threads(self.prefill_threads)
        try:
            features = [f for job in new for f in (job.image_features or ())]
            if features:  # encoded ahead, in request order: what the model fills its image tokens with
                batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}
            with torch.inference_mode():
                out = self.model(**batch, position_ids=position_ids, **{self.cache_arg: cache}, use_cache=True, logits_to_keep=1)
        finally:
            if wide:
                torch.set_num_threads(decode_threads)
        tracker = RowTracker(new, self.decode, self.eos_ids, pieces=self.pieces)
        tokens = self._sample(new, out.logits[:, -1, :], tracker)
        return _Prefilled(new, cache, mask, mask.sum(-1), tokens, tracker.aborted)

    def _adopt(self, done: _Prefilled) -> None:
        self.aborted += done.aborted
        self._merge(done.jobs, done.cache, done.mask, done.positions, done.tokens)
        self.on_step()

    def _merge(self, new: list[Job], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.cache is None or not self.jobs:
            self.jobs, self.cache, self.mask, self.positions, self.last = list(new), cache, mask, positions, tokens
        else:
            width = max(self.mask.shape[1], mask.shape[1])  # type: ignore[union-attr]
            for old_layer, new_layer in zip(self.cache.layers, cache.layers):
                old_layer.keys = torch.cat([_pad_left(old_layer.keys, width, 2), _pad_left(new_layer.keys, width, 2)])
                old_layer.values = torch.cat([_pad_left(old_layer.values, width, 2), _pad_left(new_layer.values, width, 2)])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])  # type: ignore[arg-type]
            self.positions = torch.cat([self.positions, positions])  # type: ignore[list-item]
            self.last = torch.cat([self.last, tokens])  # type: ignore[list-item]
            self.jobs += new
        self._drop_finished()

    def step(self) -> None:
        """One decode step for every active job."""
        with batched_emits():
            self._step()

    def _step(self) -> None:
        assert self.cache is not None and self.mask is not None
        mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        past = self.cache.get_seq_length()
        # One query per row: its SDPA mask is the padding mask itself. Handing it over as 4-D
        # skips transformers' per-step mask construction (about a sixth of a batch-16 step).
        step_mask = mask[:, None, None, :].bool() if self.sdpa else mask
        inputs = {
            "input_ids": self.last[:, None],  # type: ignore[index]
            "attention_mask": step_mask,
            "position_ids": self.positions[:, None],  # type: ignore[index]
            "cache_position": torch.arange(past, past + 1, device=mask.device),
            "use_cache": True,
        }
        if not self._direct_checked:
            self._direct = self._check_direct(inputs)
            self._direct_checked = True
        with torch.inference_mode():
            if self._direct is not None:
                decoder, head, cache_arg = self._direct
                hidden = decoder(**inputs, **{cache_arg: self.cache}).last_hidden_state
                logits = head(hidden[:, -1, :])
            else:
                logits = self.model(**inputs, **{self.cache_arg: self.cache}).logits[:, -1, :]
        self.mask = mask
        self.positions = self.positions + 1  # type: ignore[operator]
        tracker = RowTracker(self.jobs, self.decode, self.eos_ids, pieces=self.pieces)
        self.last = self._sample(self.jobs, logits, tracker)
        self.aborted += tracker.aborted
        for job in self.jobs:  # context exhausted: the job ends where generate would stop
            if job.finish_reason is None and job.prompt_tokens + len(job.token_ids) >= self.max_len:
                job.finish_reason = "length"
        self.on_step()
        self._drop_finished()

    def _check_direct(self, inputs: dict[str, Any]) -> tuple[Any, Any, str] | None:
        """``(decoder, head, cache argument)`` when one step through the model's text decoder
        and LM head gives exactly the wrapper's logits (checked on copies of the running cache,
        once); None otherwise (a wrapper that scales, caps or otherwise changes the logits, or a
        model without ``get_decoder`` / ``get_output_embeddings``), and steps go through the
        wrapper."""
        try:
            decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if decoder is None or decoder is self.model or not isinstance(head, torch.nn.Linear):
            return None
        parameters = inspect.signature(decoder.forward).parameters
        cache_arg = "cache" if "cache" in parameters else "past_key_values"
        try:
            with torch.inference_mode():
                expected = self.model(**inputs, **{self.cache_arg: copy.deepcopy(self.cache)}).logits[:, -1, :]
                hidden = decoder(**inputs, **{cache_arg: copy.deepcopy(self.cache)}).last_hidden_state
                got = head(hidden[:, -1, :])
        except Exception as exc:  # noqa: BLE001 - the wrapper's path stays; nothing is lost
            logger.debug("decode steps go through the model's wrapper: the text decoder alone failed (%s)", exc)
            return None
        if not torch.equal(expected, got):
            logger.debug("decode steps go through the model's wrapper: the text decoder's logits differ")
            return None
        return decoder, head, cache_arg

    def _drop_finished(self) -> None:
        done = [i for i, job in enumerate(self.jobs) if job.finish_reason is not None]
        if not done:
            return
        for i in done:
            job = self.jobs[i]
            RowTracker._stream(job)
            job.emit(("done", job.finish_reason))
        keep = [i for i in range(len(self.jobs)) if i not in set(done)]
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.mask.device)  # type: ignore[union-attr]
        self.jobs = [self.jobs[i] for i in keep]
        self.mask = self.mask[index]  # type: ignore[index]
        self.positions, self.last = self.positions[index], self.last[index]  # type: ignore[index]
        # Columns that are padding for every remaining row are dead weight: trim them.
        first = int((self.mask.cumsum(1) > 0).float().argmax(1).min())
        if first > 0:
            self.mask = self.mask[:, first:]
        for layer in self.cache.layers:  # type: ignore[union-attr]
            layer.keys = layer.keys[index][:, :, first:]
            layer.values = layer.values[index][:, :, first:]
