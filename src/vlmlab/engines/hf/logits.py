"""Per-request logits processing for the transformers engine, one row at a time, in the order
:class:`~vlmlab.protocol.core.SamplingParams` documents: ``logit_bias``, ``repetition_penalty``
(vLLM's definition: over prompt and output tokens, a positive logit divided by the penalty, a
negative one multiplied), ``frequency_penalty`` and ``presence_penalty`` (OpenAI's: the logit
minus ``count * frequency + (count > 0) * presence`` over output tokens), ``min_tokens`` (no
end-of-sequence yet), then the structured-output constraint's mask (one bitmask for the
batch, :func:`vlmlab.engines.hf.structured.mask_rows`). Log probabilities are taken
from the processed row, before temperature, top-k and top-p, so a greedy answer's tokens are
their rows' most likely ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from vlmlab.protocol.core import TokenLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def process_row(job: Any, row: torch.Tensor, eos_ids: Sequence[int]) -> None:
    """Apply ``job.sampling``'s logits processing to ``row`` (one row's logits) in place."""
    params = job.sampling
    vocab = row.shape[-1]
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias if t < vocab], dtype=torch.long, device=row.device)
        bias = torch.tensor([b for t, b in params.logit_bias if t < vocab], dtype=row.dtype, device=row.device)
        row.index_add_(0, ids, bias)
    generated = job.token_ids
    if params.repetition_penalty != 1.0:
        if job.prompt_ids is None:  # the prompt's distinct ids, once per request
            job.prompt_ids = torch.unique(job.inputs["input_ids"][0]).to(row.device)
        seen = job.prompt_ids
        if generated:
            seen = torch.unique(torch.cat([seen, torch.tensor(generated, device=row.device)]))
        seen = seen[seen < vocab]
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if generated and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(generated, device=row.device), minlength=vocab)[:vocab].to(row.dtype)
        row -= counts * params.frequency_penalty + (counts > 0).to(row.dtype) * params.presence_penalty
    if params.min_tokens and len(generated) < params.min_tokens and eos_ids:
        row[torch.tensor(list(eos_ids), device=row.device)] = float("-inf")
    # the constraint's mask comes next, for the whole batch at once (structured.mask_rows)


class TokenPieces:
    """A token id's text and UTF-8 bytes, as OpenAI's logprobs report them (cached per id).

    A token that is part of a character (a byte-fallback token such as ``<0xE2>``) has that
    byte as its bytes and the replacement character as its text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token: int) -> tuple[str, tuple[int, ...]]:
        hit = self._cache.get(token)
        if hit is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = self.tokenizer.convert_ids_to_tokens(token)
            match = _BYTE_TOKEN.fullmatch(raw or "") if isinstance(raw, str) else None
            data = (int(match.group(1), 16),) if match else tuple(text.encode("utf-8"))
            hit = self._cache[token] = (text, data)
        return hit


def token_logprob(logprobs: torch.Tensor, token: int, top: int, pieces: TokenPieces) -> TokenLogprob:
    """The record of ``token`` chosen from a row's log probabilities, with the ``top`` most likely."""
    text, data = pieces(token)
    alternatives: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = tuple((pieces(i)[0], _finite(v), pieces(i)[1]) for v, i in zip(values.tolist(), ids.tolist()))
    return TokenLogprob(text, _finite(float(logprobs[token])), data, alternatives)


def _finite(value: float) -> float:
    """JSON has no -inf: a token the processing ruled out reports the lowest float32 instead."""
    return value if value > float("-inf") else -3.4028234663852886e38
