"""Structured outputs for the transformers engine: grammars compiled with xgrammar, enforced token
by token.

:class:`Grammars` compiles a request's :class:`~vlmlab.protocol.core.StructuredOutput` once per
tokenizer (bounded cache, thread-safe: the engine compiles in a worker thread before queueing);
:class:`TokenConstraint` is one request's matcher state, used from the decoding thread: ``mask``
the row's logits, sample, ``accept`` the token, and end the answer once ``done``.

xgrammar is vLLM's default structured-output backend (``vllm/v1/structured_output/backend_xgrammar.py``);
on nano's tokenizer it imports in ~0.1 s, compiles a JSON schema in a few ms and masks + accepts
in ~0.02 ms per token on CPU.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from vlmlab.protocol.core import StructuredOutput
from vlmlab.protocol.errors import BadRequestError, ConfigError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

# JSON layout forced on the answer: compact, no free whitespace. xgrammar's default
# (any_whitespace=True, which vLLM keeps) allows unbounded whitespace at every separator, and a
# small model that has not learned JSON (nano) then tends to spend max_tokens on spaces and
# newlines; one fixed layout also keeps the answer shortest.
JSON_LAYOUT = {"any_whitespace": False, "separators": (",", ":")}
GRAMMAR_HINT = (
    ' (xgrammar EBNF is expected: rules `name ::= ...` from `root`, e.g. root ::= "yes" | "no")'
)

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and assertion boilerplate.
_ERROR_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def _import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:
        raise ConfigError(
            "structured outputs (response_format json_schema / json_object, regex, choice, grammar) "
            "on the hf engine need xgrammar, which is not installed: pip install 'xgrammar>=0.2.9' "
            "(it is part of the hf extra: pip install 'vlmlab[hf]')"
        ) from exc
    return xgrammar


def _reason(exc: BaseException) -> str:
    """xgrammar's message without its source-location prefix, on one line."""
    text = _ERROR_PREFIX.sub("", str(exc).strip())
    return " ".join(text.split()) or type(exc).__name__


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(structured: StructuredOutput) -> str:
    """The request field to name in a message (``param`` stays the top-level field)."""
    if structured.param == "response_format" and structured.kind == "json_schema":
        return "response_format.json_schema.schema"
    return structured.param


def _pack(allowed: Any) -> Any:
    """A bool tensor over token ids -> xgrammar's bitmask layout: int32 words of 32 ids, bit i
    of word w for id 32 * w + i, shape (1, words)."""
    import torch

    words = -(-allowed.numel() // 32)
    padded = torch.zeros(words * 32, dtype=torch.int64)
    padded[: allowed.numel()] = allowed.to(torch.int64)
    packed = (padded.view(words, 32) << torch.arange(32)).sum(dim=1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # bit 31 is int32's sign
    return packed.to(torch.int32).view(1, words)


_SHIFTS: dict[Any, Any] = {}  # device -> arange(32), to unpack bitmasks off the CPU


def _apply(xgr: Any, logits: Any, bitmask: Any, width: int, rows: list[int] | None = None) -> None:
    """-inf, in place, on ``logits[:, :width]`` wherever ``bitmask`` (CPU int32, one row of
    words per logits row) has a 0 bit; ``rows``: the only rows whose bitmask is not all ones."""
    import torch

    view = logits[:, :width]
    if view.device.type == "cpu" and view.dtype in (torch.float32, torch.float16, torch.bfloat16):
        xgr.apply_token_bitmask_inplace(
            view, bitmask, vocab_size=width, indices=rows, backend="cpu"
        )
        return
    # Other devices and dtypes: unpack the bits with plain torch ops (one copy, a few kernels).
    # xgrammar's GPU path goes through triton, compiled on first use.
    shifts = _SHIFTS.get(view.device)
    if shifts is None:
        shifts = _SHIFTS[view.device] = torch.arange(32, dtype=torch.int32, device=view.device)
    words = bitmask.to(view.device, non_blocking=True)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :width]
    view.masked_fill_(allowed == 0, float("-inf"))


@dataclass(frozen=True, eq=False)
class CompiledConstraint:
    """What :meth:`Grammars.compile` returns: xgrammar's compiled grammar, and whether the
    answer is JSON (then raw control characters are banned too, see :class:`Grammars`)."""

    grammar: Any
    is_json: bool


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are the literal ``choices``.

    Each literal is written as a JSON string: xgrammar's EBNF literals take the same escapes
    (``\\"``, ``\\\\``, ``\\n``, ``\\uXXXX``); ``ensure_ascii=False`` keeps characters outside the
    BMP as UTF-8 instead of surrogate pairs, which EBNF does not join.
    """
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class Grammars:
    """Compiles StructuredOutput constraints for one tokenizer (xgrammar), with a bounded cache.

    Args:
        tokenizer: the Hugging Face tokenizer (``AutoTokenizer`` / ``processor.tokenizer``).
        vocab_size: the width of the model's logits (may exceed ``len(tokenizer)``).
        cache_entries: compiled grammars kept (least recently used dropped first).
        stop_token_ids: the ids that end an answer (the engine's EOS ids); default the tokenizer's
            ``eos_token_id``. Once a grammar is complete, only these are allowed.

    Raises:
        ConfigError: xgrammar is not installed (the message says how to install it).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        cache_entries: int = 256,
        *,
        stop_token_ids: Iterable[int] | None = None,
    ):
        xgr = _import_xgrammar()
        import torch

        self._xgr = xgr
        self.vocab_size = int(vocab_size)
        stops = sorted({int(i) for i in stop_token_ids}) if stop_token_ids is not None else None
        try:
            detected = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=stops or None
            )
        except ValueError as exc:  # a tokenizer class xgrammar does not know
            raise ConfigError(
                f"structured outputs are not available for this model: xgrammar cannot read its "
                f"tokenizer ({type(tokenizer).__name__}): {exc}"
            ) from exc
        # from_huggingface treats only the stop ids as special: <s>, <pad>, [IMG], ... would be
        # allowed inside JSON strings as their literal text, and then vanish from the decoded
        # answer (skip_special_tokens). xgrammar never allows a token whose text is empty, so
        # blank every special token; added tokens that are not special stay ordinary text.
        special = set(getattr(tokenizer, "all_special_ids", []))
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(int(token_id))
        encoded = [""] * self.vocab_size
        for text, token_id in tokenizer.get_vocab().items():
            if token_id < self.vocab_size and token_id not in special:
                encoded[token_id] = text
        self.tokenizer_info = xgr.TokenizerInfo(
            encoded,
            detected.vocab_type,
            vocab_size=self.vocab_size,
            stop_token_ids=list(detected.stop_token_ids),
            add_prefix_space=detected.add_prefix_space,
        )
        self.stop_token_ids = tuple(self.tokenizer_info.stop_token_ids)
        # xgrammar's own cache is unbounded by default; ours bounds it by entries instead.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str, bool], Any] = OrderedDict()
        self._cache_entries = max(0, cache_entries)
        self._lock = threading.Lock()
        # Bits of every token a grammar may allow besides the stop tokens: ``done`` is "the
        # mask allows none of these" (also clears any padding bits past vocab_size).
        ordinary = torch.ones(self.vocab_size, dtype=torch.bool)
        ordinary[[i for i in self.stop_token_ids if i < self.vocab_size]] = False
        self._ordinary_bits = _pack(ordinary)
        # xgrammar (0.2.8, 0.2.9) compiles a string with minLength / maxLength to any character
        # but `"`, `\\`, CR and LF, so raw control characters (U+0000-U+001F), which JSON
        # forbids inside strings, would pass and the answer would fail json.loads. Outside
        # strings the compact layout allows no whitespace either, so in JSON answers a token
        # holding any byte below 0x20 is never valid: these bits take them out of the mask.
        vocab_bytes = self.tokenizer_info.decoded_vocab
        self._json_banned = frozenset(
            i for i, text in enumerate(vocab_bytes) if any(b < 0x20 for b in text)
        )
        json_allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        json_allowed[list(self._json_banned)] = False
        self._json_bits = _pack(json_allowed)

    def compile(self, structured: StructuredOutput) -> CompiledConstraint:
        """Compiled grammar (cached by kind/spec/strict), for :meth:`constraint`.

        Raises:
            BadRequestError: (``param=structured.param``) an unknown kind, or a schema, regex,
                grammar or choice list that cannot be compiled; the message names the field and
                gives xgrammar's reason.
        """
        if structured.kind not in KINDS:
            raise BadRequestError(
                f"unknown structured output kind {structured.kind!r}. Available: {', '.join(KINDS)}",
                param=structured.param,
            )
        strict = structured.strict if structured.kind == "json_schema" else False
        spec = "" if structured.kind == "json_object" else structured.spec
        key = (structured.kind, spec, strict)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # outside the lock: other requests keep compiling (xgrammar's compiler is thread-safe)
        grammar = self._compile(structured)
        compiled = CompiledConstraint(
            grammar, is_json=structured.kind in ("json_schema", "json_object")
        )
        with self._lock:
            if key in self._cache:  # another thread compiled the same spec meanwhile: share one
                self._cache.move_to_end(key)
                return self._cache[key]
            if self._cache_entries:
                self._cache[key] = compiled
                while len(self._cache) > self._cache_entries:
                    self._cache.popitem(last=False)
        return compiled

    def _compile(self, structured: StructuredOutput) -> Any:
        kind, spec, where = structured.kind, structured.spec, _field(structured)
        compiler, hint = self._compiler, ""
        if kind == "json_object":  # any object, as OpenAI's json_object (not any JSON value)
            return compiler.compile_json_schema(
                '{"type": "object"}', strict_mode=False, **JSON_LAYOUT
            )
        if kind == "json_schema":
            try:
                schema = json.loads(spec)
            except ValueError as exc:
                raise BadRequestError(
                    f"{where} is not valid JSON: {exc}", param=structured.param
                ) from exc
            if not isinstance(schema, (dict, bool)):
                raise BadRequestError(
                    f"{where} must be a JSON object (a JSON Schema), got {_shorten(spec)!r}",
                    param=structured.param,
                )
            # strict_mode: OpenAI's strict, no properties or items beyond the schema's
            build = partial(
                compiler.compile_json_schema, spec, strict_mode=structured.strict, **JSON_LAYOUT
            )
        elif kind == "regex":
            build, where = (
                partial(compiler.compile_regex, spec),
                f"{where}: regex {_shorten(spec)!r}",
            )
        elif kind == "choice":
            try:
                choices = json.loads(spec)
            except ValueError:
                choices = None
            if not (
                isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
            ):
                raise BadRequestError(
                    f"{where}: choice must be a non-empty list of strings, got {_shorten(spec)!r}",
                    param=structured.param,
                )
            build = partial(compiler.compile_grammar, choice_grammar(choices))
            where = f"{where}: choice list"
        else:
            build, where, hint = (
                partial(compiler.compile_grammar, spec),
                f"{where}: grammar",
                GRAMMAR_HINT,
            )
        try:
            return build()
        except (RuntimeError, ValueError) as exc:
            raise BadRequestError(
                f"{where} cannot be compiled: {_reason(exc)}{hint}", param=structured.param
            ) from exc

    def constraint(self, compiled: CompiledConstraint) -> TokenConstraint:
        """A fresh matcher state for one request over a grammar from :meth:`compile`."""
        return TokenConstraint(self, compiled)


class TokenConstraint:
    """One request's grammar state. Not thread-safe: one decoding thread uses it.

    Per step: ``mask(logits_row)``, sample, ``accept(token)``; the answer is complete once
    ``done`` (then only a stop token is allowed, so the engine can end without another step).
    """

    def __init__(self, grammars: Grammars, compiled: CompiledConstraint):
        self._xgr = grammars._xgr
        self._matcher = self._xgr.GrammarMatcher(
            compiled.grammar, override_stop_tokens=list(grammars.stop_token_ids)
        )
        self._vocab_size = grammars.vocab_size
        self._stop_token_ids = grammars.stop_token_ids
        self._ordinary_bits = grammars._ordinary_bits
        # JSON answers: tokens never allowed whatever the grammar says (see Grammars)
        self._extra_bits = grammars._json_bits if compiled.is_json else None
        self._banned = grammars._json_banned if compiled.is_json else frozenset()
        self._bitmask = self._xgr.allocate_token_bitmask(1, self._vocab_size)
        self._filled = False  # the bitmask holds the current state's mask

    def _fill(self) -> None:
        if not self._filled:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            if self._extra_bits is not None:
                self._bitmask &= self._extra_bits
            self._filled = True

    def mask(self, logits: Any) -> None:
        """Set to -inf, in place, every entry of ``logits`` (1-D, one row of the model's vocab
        width, any device) whose token the grammar does not allow next. Entries past the
        grammar's vocab_size are never allowed. After termination only stop tokens stay."""
        import torch

        width = min(int(logits.shape[-1]), self._vocab_size)
        if logits.shape[-1] > width:
            logits[width:] = float("-inf")
        if self._matcher.is_terminated():  # xgrammar refuses to fill a mask now
            allowed = torch.zeros(width, dtype=torch.bool, device=logits.device)
            allowed[[i for i in self._stop_token_ids if i < width]] = True
            logits[:width].masked_fill_(~allowed, float("-inf"))
            return
        self._fill()
        _apply(self._xgr, logits.unsqueeze(0), self._bitmask, width)

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False (state unchanged) if the grammar does not allow it."""
        token_id = int(token_id)
        if token_id in self._banned:
            return False
        accepted = bool(self._matcher.accept_token(token_id))
        if accepted:
            self._filled = False
        return accepted

    @property
    def allows_eos(self) -> bool:
        """The text so far is a complete answer: a stop token may end it now."""
        return self._matcher.is_terminated() or bool(self._matcher.is_completed())

    @property
    def done(self) -> bool:
        """The grammar accepted a complete answer and allows nothing but the end (the matcher
        terminated, or only stop tokens are allowed next)."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        self._fill()
        return not bool((self._bitmask & self._ordinary_bits).any())


def mask_rows(logits: Any, constraints: Sequence[TokenConstraint | None]) -> None:
    """Row ``i`` of ``logits`` (batch, vocab) masked for ``constraints[i]`` in place (``None``:
    left alone): what ``constraints[i].mask(logits[i])`` does row by row, with one bitmask and one
    apply for the batch. On a GPU that is one host-to-device copy instead of one per row: 16
    rows of nano on an H200: 0.3 ms a step against 1.5 ms row by row."""
    import torch

    live = [c for c in constraints if c is not None]
    if not live:
        return
    vocab_size = live[0]._vocab_size
    batched: list[int] = []
    for row, constraint in enumerate(constraints):
        if constraint is None:
            continue
        if constraint._matcher.is_terminated() or constraint._vocab_size != vocab_size:
            constraint.mask(logits[row])
        else:
            batched.append(row)
    if not batched:
        return
    width = min(int(logits.shape[-1]), vocab_size)
    if logits.shape[-1] > width:
        logits[batched, width:] = float("-inf")
    bitmask = torch.full((logits.shape[0], live[0]._bitmask.shape[-1]), -1, dtype=torch.int32)
    for row in batched:
        constraint = constraints[row]
        assert constraint is not None
        constraint._fill()
        bitmask[row] = constraint._bitmask[0]
    _apply(live[0]._xgr, logits, bitmask, width, batched)
