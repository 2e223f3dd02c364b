"""What every benchmark module shares: the spec record, image decoding, small row helpers.

A benchmark module builds one :class:`Benchmark` (a :class:`~vlmlab.eval.types.DatasetSpec` with
the few extra facts the loader needs: which columns hold images, which rows belong to the split,
where the DAM-QA annotation file lives) and the loader in :mod:`vlmlab.eval.datasets.loading`
does the rest for every source (Hub, ``save_to_disk`` folder, parquet, jsonl, DAM-QA jsonl).
"""

from __future__ import annotations

import ast
import io
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.eval.types import DatasetSpec
from vlmlab.protocol.errors import ImageDecodeError

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Benchmark(DatasetSpec):
    """A :class:`DatasetSpec` plus what the shared loader needs to read every local layout.

    Attributes:
        image_columns: the columns of the Hub schema that hold images (decoded by ``datasets``
            on the Hub path; file names relative to the annotation file in jsonl layouts).
        keep_row: which rows of the Hub split belong to this dataset (ChartQA's human and
            augmented halves share one split); None keeps all. It sees rows without images.
        damqa_file: the annotation file in DAM-QA's ``data/`` tree (``chartqa/test_human.jsonl``),
            images in the ``images/`` folder next to it; None if DAM-QA has no such file.
        from_damqa: converts one DAM-QA jsonl row into a row of the Hub schema, so ``from_row``
            reads both the same way.
        hub_available: False when the Hub has no image-bearing copy (DAM-QA's VQAv2 subset):
            loading then needs ``data_dir``.
        generate: for generated datasets (``synth``): ``limit -> rows`` (lazy); no files.
        fixed_revision: the revision recorded for a generated dataset (hash of the generator).
    """

    image_columns: tuple[str, ...] = ("image",)
    keep_row: Callable[[Row], bool] | None = None
    damqa_file: str | None = None
    from_damqa: Callable[[Row], dict[str, Any]] | None = None
    hub_available: bool = True
    generate: Callable[[int | None], Iterable[dict[str, Any]]] | None = None
    fixed_revision: str | None = None

    def __post_init__(self) -> None:
        if self.damqa_file and self.local_loader is None:
            # DAM-QA jsonl is the layout the Hub loader cannot read; expose it as local_loader.
            from vlmlab.eval.datasets.loading import DamqaReader

            object.__setattr__(self, "local_loader", DamqaReader(self.key))


def as_rgb(value: Any, what: str) -> Any:
    """Decode one image cell into an RGB ``PIL.Image``.

    Args:
        value: a PIL image (``datasets.Image`` decoded it), raw bytes (ChartQAPro stores the
            PNG bytes in a binary column), a ``{"bytes", "path"}`` dict (undecoded
            ``datasets.Image``), or a file path (jsonl layouts, resolved by the loader).
        what: names the sample and column in error messages.

    Raises:
        ImageDecodeError: the cell is empty or not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):
            raw = value.get("bytes")
            image = Image.open(io.BytesIO(raw)) if raw else Image.open(value["path"])
        elif isinstance(value, (str, Path)) and str(value):
            image = Image.open(value)
        else:
            raise ImageDecodeError(f"{what}: no image in this cell (got {type(value).__name__})")
        return image.convert("RGB")
    except ImageDecodeError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageDecodeError(f"{what}: cannot decode the image ({exc})") from exc


def is_missing(value: Any) -> bool:
    """None, NaN, empty or the literal ``"nan"`` (pandas-made TSV/parquet files write that)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def text(value: Any) -> str:
    """A cell as text; missing cells become ``""``."""
    return "" if is_missing(value) else str(value)


def as_list(value: Any, parse_repr: bool = False) -> list[Any]:
    """A list cell; a scalar becomes a one-element list.

    Args:
        parse_repr: also read a string holding a Python list repr (MMMU ``options`` are stored
            that way on the Hub). Off by default: answers such as ``"[2007, 2008]"`` are one
            answer, not two.
    """
    if value is None:
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if parse_repr and stripped.startswith("["):
            try:
                parsed = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                return [value]
            return list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def answer_strings(value: Any) -> list[str]:
    """Answers as strings: VQAv2 rows hold ``{"answer": ...}`` dicts, others plain strings."""
    out = []
    for item in as_list(value):
        if isinstance(item, Mapping):
            item = item.get("answer", "")
        out.append(str(item))
    return out


def letters(n: int) -> list[str]:
    """``A, B, C, ...`` for ``n`` options."""
    return [chr(ord("A") + i) for i in range(n)]
