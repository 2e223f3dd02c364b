"""Read a benchmark from the Hub or from a local copy, pin what was read, check its size.

Sources, tried in this order for ``data_dir``:

1. ``data_dir/<key>/`` (a root holding one folder per dataset), then DAM-QA's tree
   (``data_dir/chartqa/test_human.jsonl`` + ``data_dir/chartqa/images/``);
2. a ``save_to_disk`` folder (``dataset_info.json`` or ``dataset_dict.json``) -> ``load_from_disk``;
3. parquet files (a file, or a folder searched recursively; a ``<config>/`` sub-folder and files
   named after the split are preferred, as in Hub snapshots) -> ``load_dataset("parquet")``;
4. a jsonl file (or the one in the folder) in the Hub schema with image columns holding file
   names, or in DAM-QA's schema (``question_id``, ``question``, ``image``, ``answer``), with the
   images next to it or in ``images/``.

Without ``data_dir`` the Hub copy is read with ``datasets.load_dataset(hf_id, config,
split=split)``, the same call lmms-eval and mistral-evals make. The revision recorded is the Hub
commit the files came from; for local copies it is ``sha256:`` of the annotation and image bytes,
so a changed file gives a different revision (and different resume keys in the runner).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vlmlab.eval.datasets.base import Benchmark
from vlmlab.eval.types import DatasetSpec, EvalSample
from vlmlab.hub import hub_access, missing_message, offline_libraries
from vlmlab.protocol.errors import ConfigError, ImageDecodeError, NotFoundError, VlmlabError

logger = logging.getLogger(__name__)

SOURCES = ("hub", "disk", "parquet", "jsonl", "damqa", "generated")


@dataclass(frozen=True)
class DatasetInfo(Mapping[str, Any]):
    """Where the samples came from, pinned, and whether the copy has the known size.

    A read-only mapping too (``info["revision"]``, ``dict(info)``), so it can go into JSON.

    Attributes:
        key: the dataset key.
        hf_id / config / split: the Hub dataset the samples correspond to.
        revision: the Hub commit sha (``load_dataset`` path; the ``datasets`` fingerprint when the
            commit is not known), ``sha256:<hex>`` of the local files, or the generator's hash.
        content_sha256: the hex digest for local copies, else None.
        rows: rows in this copy that belong to the dataset (before ``limit``).
        expected_rows: the known size (``DatasetSpec.expected_rows``).
        warning: the size-mismatch message, or None when ``rows == expected_rows``.
        source: one of :data:`SOURCES`.
        path: the local file or folder read, if any.
    """

    key: str
    hf_id: str
    config: str | None
    split: str
    revision: str | None
    content_sha256: str | None
    rows: int
    expected_rows: int
    warning: str | None
    source: str
    path: str | None = None

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class _Source:
    """Rows of one opened copy, before ``keep_row`` / ``from_row``."""

    rows: Iterable[Mapping[str, Any]]
    count: int
    revision: str | None
    content_sha256: str | None
    kind: str
    path: Path | None = None


def load_samples(
    spec: DatasetSpec, data_dir: str | Path | None = None, limit: int | None = None
) -> tuple[Iterator[EvalSample], DatasetInfo]:
    """The samples of ``spec`` (lazily, images decoded per sample) and where they came from.

    Args:
        spec: the dataset (from :func:`vlmlab.eval.datasets.get_dataset`).
        data_dir: a local copy or a root of copies (see the module docstring); None reads the Hub.
        limit: yield at most this many samples (the row-count check still covers the whole copy).

    Returns:
        ``(samples, info)``. The size check runs before the first sample: a mismatch is logged as
        a warning and kept in ``info.warning``.

    Raises:
        ConfigError: a bad ``limit``, an unreadable local layout, or ``datasets`` not installed.
        NotFoundError: ``data_dir`` does not exist, an image file is missing, or the Hub copy
            cannot be loaded (offline, unknown id).
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    bench = spec if isinstance(spec, Benchmark) else None
    if bench is not None and bench.generate is not None:
        if data_dir is not None:
            logger.debug("%s is generated; data_dir %s is not used", spec.key, data_dir)
        source = _Source(
            bench.generate(limit), spec.expected_rows, bench.fixed_revision, None, "generated"
        )
    elif data_dir is None:
        if bench is not None and not bench.hub_available:
            raise ConfigError(
                f"{spec.key} cannot be read from the Hub: {spec.hf_id} holds annotations only, "
                f"without images. Pass --data-dir with DAM-QA's layout: {bench.damqa_file} and "
                "its images/ folder next to it (see DAM-QA data/dataset_guide.md)."
            )
        source = _open_hub(spec)
    else:
        source = _open_local(spec, Path(data_dir).expanduser())
    warning = size_warning(spec, source.count)
    if warning:
        logger.warning("%s", warning)
    info = DatasetInfo(
        key=spec.key,
        hf_id=spec.hf_id,
        config=spec.hf_config,
        split=spec.split,
        revision=source.revision,
        content_sha256=source.content_sha256,
        rows=source.count,
        expected_rows=spec.expected_rows,
        warning=warning,
        source=source.kind,
        path=None if source.path is None else str(source.path),
    )
    return _samples(spec, source.rows, limit), info


def size_warning(spec: DatasetSpec, rows: int) -> str | None:
    """The message for a copy whose size differs from the known one, else None."""
    if rows == spec.expected_rows:
        return None
    where = spec.hf_id + (f" ({spec.hf_config})" if spec.hf_config else "") + f" {spec.split}"
    return (
        f"{spec.key}: {rows:,} rows, expected {spec.expected_rows:,} ({where}). This copy is "
        "partial or a different version; scores are not comparable with published numbers."
    )


def _samples(
    spec: DatasetSpec, rows: Iterable[Mapping[str, Any]], limit: int | None
) -> Iterator[EvalSample]:
    keep = spec.keep_row if isinstance(spec, Benchmark) else None
    produced = 0
    if limit == 0:
        return
    iterator = iter(rows)
    index = -1
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except (OSError, ValueError) as exc:  # datasets/PIL decoding a stored image failed
            raise ImageDecodeError(
                f"{spec.key}: row {index + 1} cannot be decoded ({exc})"
            ) from exc
        index += 1
        if keep is not None and not keep(row):
            continue
        try:
            sample = spec.from_row(row, index)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise wrap_errors(spec.key, exc) from exc
        if sample is None:
            continue
        yield sample
        produced += 1
        if limit is not None and produced >= limit:
            return


# ---------------------------------------------------------------------------- Hub and datasets


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # an install problem, reported as a fix
        raise ConfigError(
            "reading benchmark datasets needs the 'datasets' package: pip install datasets"
        ) from exc
    return datasets


def _open_hub(spec: DatasetSpec) -> _Source:
    """The Hub copy of ``spec``; when the Hub does not answer (asked once, in seconds) or offline
    mode is on, the cached copy or one line saying it is not there, without the Hub's retries."""
    datasets = _datasets()
    access = hub_access()
    where = spec.hf_id + (f" config {spec.hf_config!r}" if spec.hf_config else "")
    local_fix = (
        "Pass --data-dir with a local copy (save_to_disk folder, parquet files, jsonl + images, "
        "or DAM-QA's layout)."
    )
    try:
        with offline_libraries() if access.cache_only else nullcontext():
            ds = datasets.load_dataset(spec.hf_id, spec.hf_config, split=spec.split)
    except Exception as exc:  # datasets raises a zoo of types (hub, network, config, files)
        if access.cache_only:
            raise NotFoundError(
                missing_message("dataset", spec.hf_id, access, fix=f"{spec.key} reads it. {local_fix}")
            ) from exc
        why = " ".join(str(exc).split())
        raise NotFoundError(
            f"cannot load {where} split {spec.split!r} for {spec.key}: {why}. Check HF_TOKEN "
            f"(lmms-lab repos may need a login). {local_fix}"
        ) from exc
    return _Source(ds, _count(spec, ds), _hub_revision(ds), None, "hub")


def _hub_revision(ds: Any) -> str:
    """The Hub commit of a loaded split: ``datasets`` caches Hub data under ``.../<commit>/``."""
    for cache in getattr(ds, "cache_files", None) or []:
        name = Path(cache.get("filename", "")).parent.name
        if re.fullmatch(r"[0-9a-f]{40}", name):
            return name
    return f"fingerprint:{ds._fingerprint}"


def _count(spec: DatasetSpec, ds: Any) -> int:
    """Rows of a ``datasets.Dataset`` that belong to ``spec``, reading no image column."""
    keep = spec.keep_row if isinstance(spec, Benchmark) else None
    if keep is None:
        return len(ds)
    images = set(spec.image_columns) if isinstance(spec, Benchmark) else set()
    light = ds.select_columns([c for c in ds.column_names if c not in images])
    return sum(1 for row in light if keep(row))


def _pick_split(spec: DatasetSpec, dsdict: Any, where: Path) -> Any:
    names = list(dsdict.keys())
    if spec.split in dsdict:
        return dsdict[spec.split]
    if len(names) == 1:
        return dsdict[names[0]]
    raise ConfigError(
        f"{where} holds splits {', '.join(names)} but not {spec.split!r} needed by {spec.key}"
    )


# -------------------------------------------------------------------------------- local copies


def _open_local(spec: DatasetSpec, path: Path) -> _Source:
    if not path.exists():
        raise NotFoundError(f"--data-dir {path} does not exist")
    bench = spec if isinstance(spec, Benchmark) else None
    if path.is_file():
        return _open_file(spec, path)
    if (path / spec.key).exists() and path.name != spec.key:
        return _open_local(spec, path / spec.key)
    if bench is not None and bench.damqa_file:
        for candidate in (path / bench.damqa_file, path / Path(bench.damqa_file).name):
            if candidate.is_file():
                return _open_jsonl(spec, candidate)
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _open_disk(spec, path)
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return _open_parquet(spec, path, parquet)
    jsonl = sorted(path.glob("*.jsonl"))
    named = [f for f in jsonl if f.name.startswith(spec.split)]
    if len(named) == 1 or len(jsonl) == 1:
        return _open_jsonl(spec, (named or jsonl)[0])
    expected = f"; DAM-QA: {bench.damqa_file}" if bench and bench.damqa_file else ""
    raise ConfigError(
        f"cannot tell how to read {path} for {spec.key}: expected a save_to_disk folder, parquet "
        f"files, or one .jsonl file (found {len(jsonl)}){expected}"
    )


def _open_file(spec: DatasetSpec, path: Path) -> _Source:
    if path.suffix == ".parquet":
        return _open_parquet(spec, path.parent, [path])
    if path.suffix in (".jsonl", ".json"):
        return _open_jsonl(spec, path)
    raise ConfigError(f"{path}: expected a .parquet or .jsonl file, a folder, or a DAM-QA tree")


def _open_disk(spec: DatasetSpec, path: Path) -> _Source:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt or foreign folder
        raise ConfigError(f"{path} is not a readable save_to_disk folder: {exc}") from exc
    ds = _pick_split(spec, loaded, path) if hasattr(loaded, "keys") else loaded
    files = [f for f in path.rglob("*") if f.is_file() and f.name != "state.json"]
    digest = content_sha256(files, path)
    return _Source(ds, _count(spec, ds), f"sha256:{digest}", digest, "disk", path)


def _open_parquet(spec: DatasetSpec, root: Path, files: list[Path]) -> _Source:
    if spec.hf_config and (root / spec.hf_config).is_dir():  # Hub snapshot: <config>/<split>-*
        scoped = [f for f in files if (root / spec.hf_config) in f.parents]
        files = scoped or files
    named = [f for f in files if f.name.startswith(spec.split)]
    files = named or files
    datasets = _datasets()
    try:
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # unreadable parquet
        raise ConfigError(f"cannot read parquet files under {root}: {exc}") from exc
    digest = content_sha256(files, root)
    return _Source(ds, _count(spec, ds), f"sha256:{digest}", digest, "parquet", root)


def _looks_damqa(row: Mapping[str, Any]) -> bool:
    """DAM-QA rows: ``question_id``, ``answer`` and an image file name (no Hub schema has all)."""
    return "question_id" in row and "answer" in row and isinstance(row.get("image"), str)


def _open_jsonl(spec: DatasetSpec, path: Path) -> _Source:
    bench = spec if isinstance(spec, Benchmark) else None
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    kind = "jsonl"
    if rows and bench is not None and bench.from_damqa is not None and _looks_damqa(rows[0]):
        rows = [bench.from_damqa(r) for r in rows]
        kind = "damqa"
    columns = bench.image_columns if bench is not None else ("image",)
    images: list[Path] = []
    for number, row in enumerate(rows, 1):
        for column in columns:
            value = row.get(column)
            if isinstance(value, str) and value:
                resolved = _image_file(path.parent, value)
                if resolved is None:
                    raise NotFoundError(
                        f"{path}: row {number} names image {value!r}, not found in "
                        f"{path.parent / 'images'} or {path.parent}. Download the images "
                        "(DAM-QA: data/dataset_guide.md) next to the annotation file."
                    )
                row[column] = str(resolved)
                images.append(resolved)
    keep = bench.keep_row if bench is not None else None
    count = sum(1 for r in rows if keep is None or keep(r))
    digest = content_sha256([path, *images], path.parent)
    return _Source(rows, count, f"sha256:{digest}", digest, kind, path)


def _image_file(base: Path, name: str) -> Path | None:
    for candidate in (base / "images" / name, base / name, Path(name)):
        if candidate.is_file():
            return candidate
    return None


def content_sha256(files: Iterable[Path], root: Path) -> str:
    """sha256 over each file's path relative to ``root`` and its bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(set(files)):
        try:
            name = file.relative_to(root).as_posix()
        except ValueError:
            name = file.name
        digest.update(name.encode() + b"\0")
        try:
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise NotFoundError(f"cannot read {file}: {exc}") from exc
        digest.update(b"\0")
    return digest.hexdigest()


def wrap_errors(key: str, exc: Exception) -> VlmlabError:
    """A vlmlab error for a foreign exception raised while reading ``key``'s rows."""
    if isinstance(exc, VlmlabError):
        return exc
    return ConfigError(
        f"{key}: a row does not have the expected schema ({type(exc).__name__}: {exc}); "
        "check that the local copy is the dataset's Hub schema or DAM-QA's"
    )


class DamqaReader:
    """``DatasetSpec.local_loader`` of the DAM-QA datasets: the samples of ``key`` read from a
    DAM-QA tree, folder or jsonl file (the same path :func:`load_samples` takes)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, path: Path) -> Iterator[EvalSample]:
        from vlmlab.eval.datasets import get_dataset  # the registry imports this module

        samples, _ = load_samples(get_dataset(self.key), path)
        return samples

    def __repr__(self) -> str:
        return f"DamqaReader({self.key!r})"
