"""Run llama.cpp's ``convert_hf_to_gguf.py`` with two fixes (a subprocess of
:func:`vlmlab.engines.llamacpp.convert.export_gguf`)::

    python -m vlmlab.engines.llamacpp.run_converter LLAMA_CPP_DIR CHECKPOINT [converter args...]

1. **The BPE pre-tokenizer.** The converter names a tokenizer's pre-tokenizer by hashing how it
   splits a fixed text, and refuses hashes it does not list. A tokenizer.json whose
   pre-tokenizer is "split every digit, then GPT-2's byte-level regex" (nano's) splits text
   exactly as llama.cpp's ``starcoder`` pre-tokenizer does (``\\p{N}``, then GPT-2's regex; equal
   for every ASCII digit), so that name is written. Any other unknown one still fails.
2. **Pixtral's [IMG_BREAK] embedding.** The vision projector of a Pixtral-style model needs the
   row of the token embedding for ``[IMG_BREAK]`` (``v.token_embd.img_break``), which the
   converter means to extract from ``embed_tokens.weight``, but its ``--mmproj`` tensor filter
   drops every ``language_model.`` tensor first, so the row is missing and llama.cpp cannot load
   the projector. The embedding tensor is let through to the code that extracts the row.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

DIGITS = ("\\d", "\\p{N}")


def digit_split_then_byte_level(tokenizer_json: Path) -> bool:
    """Whether the tokenizer's pre-tokenizer is ``Sequence[Split(digit, Isolated), ByteLevel(regex)]``."""
    try:
        pre = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return False
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    return (
        split.get("type") == "Split" and pattern in DIGITS and split.get("behavior") == "Isolated"
        and not split.get("invert") and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex", True)
    )  # fmt: skip


def patch(root: Path) -> None:
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import conversion.base as base  # type: ignore[import-not-found]

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if digit_split_then_byte_level(Path(self.dir_model) / "tokenizer.json"):
                return "starcoder"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    try:
        import conversion.llava as llava  # type: ignore[import-not-found]
    except ImportError:  # an older layout: one big convert_hf_to_gguf.py
        return
    model = getattr(llava, "LlavaVisionModel", None)
    if model is None:
        return
    drops = model.filter_tensors.__func__

    def filter_tensors(cls: Any, item: Any) -> Any:
        if cls.use_break_tok and item[0].endswith("embed_tokens.weight"):
            return base.ModelBase.filter_tensors.__func__(cls, item)
        return drops(cls, item)

    model.filter_tensors = classmethod(filter_tensors)


def main(argv: list[str]) -> None:
    root = Path(argv[0])
    patch(root)
    sys.argv = [str(root / "convert_hf_to_gguf.py"), *argv[1:]]
    runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
