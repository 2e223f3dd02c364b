"""The transformers engine's prompts: the template's control tokens are controls, user text is text.

A chat template writes its own control strings (``[INST]``, ``<|im_start|>``, the image
placeholders) and pastes the messages' text between them. Tokenizing the rendered string as it
is reads a special-token string inside that text as the control token itself: ``"[IMG] what
colour?"`` becomes a second image placeholder, ``"</s>"`` ends a turn. The text is encoded as
text instead, as mistral_common does (vLLM's mistral tokenizer mode) for each message's text:

* :meth:`PromptEncoder.mark` wraps each control string in a text part in two private-use
  markers before the template runs. Text without one (nearly all) is left as it is, so its
  prompt, and the ids it becomes, are exactly what they were.
* A rendered prompt with markers is cut at the template's own (unmarked) control strings. A run
  of text between two of them that holds a marked string is tokenized on its own with special
  tokens split (``split_special_tokens=True``); everything else as before.

Tokenizers split their input at special tokens before anything else, so cutting a prompt there
changes no id; only the runs with marked strings are tokenized differently, which is the point.
The placeholder count check (:mod:`vlmlab.engines.hf.preprocess`) sees the template's
placeholders only. transformers 5.25's ``apply_chat_template(..., sanitize_control_tokens=True)``
marks text the same way, but vlmlab supports older releases and builds its ids itself (spliced
images, processors fed stand-ins), so it does not depend on it.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from vlmlab.protocol.core import Chat, ImagePart
from vlmlab.protocol.errors import EngineError

# Private-use code points (plane 15) around a control string from the user's text, the ones
# transformers' mark_control_tokens uses. The user's own are dropped first: they cannot forge one.
MARK_START = "\U000f0000"
MARK_END = "\U000f0001"

Piece = tuple[str, bool]  # (text, as_text): as_text = tokenize with special tokens split


def is_marked(prompt: str) -> bool:
    """Whether a rendered prompt carries text with control strings (see :class:`PromptEncoder`)."""
    return MARK_START in prompt or MARK_END in prompt


class PromptEncoder:
    """Marks control strings in user text; tokenizes rendered prompts that carry such marks.

    Control strings: the tokenizer's special tokens (``all_special_tokens`` and every added
    token flagged special) and the image placeholders the template writes, which some
    processors find in the text even where they are not tokens (Phi's ``<|image_1|>``).
    """

    def __init__(
        self, tokenizer: Any, placeholders: Iterable[str] = (), keep: Iterable[str] = ()
    ) -> None:
        """``keep``: tokens a processor gives a meaning to (its image and video tokens), never
        used as a stand-in (:meth:`for_processor`)."""
        self.tokenizer = tokenizer
        added = list((getattr(tokenizer, "added_tokens_decoder", None) or {}).values())
        special = {str(t.content) for t in added if getattr(t, "special", False)}
        special |= {t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str)}
        self.special = frozenset(t for t in special if t)
        self.placeholders = frozenset(p for p in placeholders if p)
        controls = sorted(self.special | self.placeholders, key=len, reverse=True)  # longest first
        alternatives = "|".join(map(re.escape, controls)) or "(?!)"  # (?!) matches nothing
        self._control = re.compile(alternatives)
        # A marked control string (user text), an unmarked one (the template's), or a lone
        # marker (a template that cut a marked string apart), which still ends a run.
        self._scan = re.compile(
            f"{MARK_START}(?P<marked>{alternatives}){MARK_END}"
            f"|(?P<control>{alternatives})|[{MARK_START}{MARK_END}]"
        )
        # Added tokens that take the whitespace beside them (AddedToken lstrip / rstrip): a run
        # tokenized on its own loses that whitespace as it would have in the whole prompt.
        self._lstrip = {str(t.content) for t in added if getattr(t, "lstrip", False)}
        self._rstrip = {str(t.content) for t in added if getattr(t, "rstrip", False)}
        self._keep = frozenset(keep) | self.placeholders
        self._text_tokenizer: Any = None
        self._stand_ins: list[tuple[str, int]] | None = None

    # -- before the template -------------------------------------------------------------------

    def mark(self, text: str) -> str:
        """``text`` with each control string in it wrapped in markers (and markers the user sent
        dropped); text without either comes back unchanged."""
        if is_marked(text):
            text = text.replace(MARK_START, "").replace(MARK_END, "")
        if self._control.search(text) is None:
            return text
        return self._control.sub(f"{MARK_START}\\g<0>{MARK_END}", text)

    # -- after it ------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """The ids of a rendered prompt (no special tokens added): the template's control strings
        as control tokens, the user's as text."""
        if not is_marked(prompt):
            return self._ids(prompt)
        return [i for text, as_text in self.pieces(prompt) for i in self._piece_ids(text, as_text)]

    def encode_between(self, prompt: str, placeholder: str) -> list[list[int]]:
        """The ids of the text before, between and after the image placeholders the template
        wrote: one list more than there are of them. A placeholder in the user's text is text."""
        if not is_marked(prompt):
            return [self._ids(piece) if piece else [] for piece in prompt.split(placeholder)]
        parts: list[list[int]] = [[]]
        for text, as_text in self.pieces(prompt):
            if as_text:
                parts[-1] += self.text_ids(text)
                continue
            for index, chunk in enumerate(text.split(placeholder)):
                if index:
                    parts.append([])
                if chunk:
                    parts[-1] += self._ids(chunk)
        return parts

    def for_processor(self, prompt: str) -> tuple[str, int | None, list[list[int]]]:
        """For a processor that tokenizes the prompt itself (and finds the image placeholders in
        it): the prompt with each run of user text that holds a marked string replaced by one
        special token the template did not write (the stand-in), the stand-in's id, and the ids
        of the runs, in order, to put in its place. An unmarked prompt comes back as it is."""
        if not is_marked(prompt):
            return prompt, None, []
        pieces = self.pieces(prompt)
        template = "".join(piece for piece, as_text in pieces if not as_text)
        stand_in = next(((t, i) for t, i in self.stand_ins() if t not in template), None)
        if stand_in is None:
            raise EngineError("no special token is left to stand in for user text in this prompt")
        text = "".join(stand_in[0] if as_text else piece for piece, as_text in pieces)
        return text, stand_in[1], [self.text_ids(piece) for piece, as_text in pieces if as_text]

    def pieces(self, prompt: str) -> list[Piece]:
        """``prompt`` cut for tokenizing: the template's text and control strings (joined,
        ``as_text`` False) and, apart, each run between two template control strings that holds
        a marked string (``as_text`` True, markers removed)."""
        out: list[Piece] = []
        run: list[str] = []
        as_text, after, start = False, "", 0
        for match in self._scan.finditer(prompt):
            run.append(prompt[start : match.start()])
            start = match.end()
            if match["marked"] is not None:
                run.append(match["marked"])
                as_text = True
                continue
            control = match["control"] or ""  # "" for a lone marker
            self._flush(out, "".join(run), as_text or not control, after, control)
            if control:
                _append(out, control, False)
            run, as_text, after = [], not control, control
        run.append(prompt[start:])
        self._flush(out, "".join(run), as_text, after, "")
        return out

    def text_ids(self, text: str) -> list[int]:
        """``text`` tokenized as plain text: ``tokenizer(text, split_special_tokens=True)``."""
        if self._text_tokenizer is None:
            # A copy: the flag lives on the tokenizer, which request threads share; setting it
            # per call (split_special_tokens=True) would leak into their calls meanwhile.
            clone = copy.deepcopy(self.tokenizer)
            clone.split_special_tokens = True
            self._text_tokenizer = clone
        return self._text_tokenizer(text, add_special_tokens=False)["input_ids"]

    def stand_ins(self) -> list[tuple[str, int]]:
        """Special tokens that can stand in for a run of text: one id each, read back as that
        id, and no meaning to the processor. Padding and unknown first."""
        if self._stand_ins is None:
            tok = self.tokenizer
            first = [getattr(tok, "pad_token", None), getattr(tok, "unk_token", None)]
            found = []
            preferred = [t for t in first if t in self.special]
            for token in dict.fromkeys(preferred + sorted(self.special)):
                if token in self._keep:
                    continue
                ids = self._ids(token)
                if len(ids) == 1:
                    found.append((token, ids[0]))
            self._stand_ins = found
        return self._stand_ins

    def _flush(self, out: list[Piece], text: str, as_text: bool, after: str, before: str) -> None:
        if as_text:
            text = text.lstrip() if after in self._rstrip else text
            text = text.rstrip() if before in self._lstrip else text
        if text:
            _append(out, text, as_text)

    def _piece_ids(self, text: str, as_text: bool) -> list[int]:
        return self.text_ids(text) if as_text else self._ids(text)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _append(out: list[Piece], text: str, as_text: bool) -> None:
    """Add a piece; the template's pieces join the one before when that is the template's too."""
    if out and not as_text and not out[-1][1]:
        out[-1] = (out[-1][0] + text, False)
    else:
        out.append((text, as_text))


# Normalizers that never shrink a text by more than this factor (composition: Hangul jamo L+V+T
# into one syllable is the largest, 3 to 1); any other normalizer may delete text, so no bound.
COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
KEEPING_NORMALIZERS = {"Prepend"}


def token_span_bound(tokenizer: Any) -> int | None:
    """Characters of input text one token can stand for at most, or None where the tokenizer
    gives no such bound. Only for BPE that can spell any text (byte-level, or byte fallback),
    where no unknown token swallows a run of text; the longest vocabulary entry bounds a token's
    span, times 3 when the normalizer composes characters."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, normalizer = spec.get("model") or {}, spec.get("normalizer")
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        return None
    steps = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    kinds = [step.get("type") for step in steps]
    if any(kind not in COMPOSING_NORMALIZERS | KEEPING_NORMALIZERS for kind in kinds):
        return None
    longest = max(map(len, model.get("vocab", {})), default=0)
    longest = max([longest, *(len(t["content"]) for t in spec.get("added_tokens", []))])
    return longest * (3 if set(kinds) & COMPOSING_NORMALIZERS else 1) or None


def fast_decode(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, straight to the Rust tokenizer where
    that is all transformers does (a fast tokenizer without space clean-up): a decode step
    detokenizes every row, and the Python wrapper costs twice the decode itself."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "_tokenizer", None)
    plain = type(tokenizer)._decode is TokenizersBackend._decode and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
    if isinstance(tokenizer, TokenizersBackend) and backend is not None and plain:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def to_hf_messages(chat: Chat, mark: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Core chat -> the list-of-parts messages that processors' chat templates accept; ``mark``
    (:meth:`~vlmlab.engines.hf.prompt.PromptEncoder.mark`) applied to each text."""
    out = []
    for message in chat.messages:
        parts = [
            {"type": "image"}
            if isinstance(p, ImagePart)
            else {"type": "text", "text": mark(p.text) if mark else p.text}
            for p in message.content
        ]
        entry: dict[str, Any] = {"role": message.role, "content": parts}
        if message.tool_calls:  # transformers' tool-use message format
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _json_or_text(c.arguments)}}
                for c in message.tool_calls
            ]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
