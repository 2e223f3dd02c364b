"""Hugging Face checkpoint -> GGUF with llama.cpp's own converter (``convert_hf_to_gguf.py``).

The converter and its ``gguf-py`` ship in llama-cpp-python's source distribution: vlmlab takes
them from a llama.cpp checkout (``--llama-cpp DIR`` / ``VLMLAB_LLAMA_CPP``) or downloads that
sdist once with pip into its cache, and runs them in a subprocess
(:mod:`vlmlab.engines.llamacpp.run_converter`, which applies two fixes vlmlab needs). Two files
come out: the language model and its vision projector (``mmproj-*.gguf``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from vlmlab.engines.llamacpp.translate import GGUFFiles
from vlmlab.protocol.errors import ConfigError, EngineError, NotFoundError

logger = logging.getLogger(__name__)

# The llama-cpp-python release whose converter is used when llama-cpp-python is not installed.
DEFAULT_LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from the sdist's vendor/llama.cpp/ folder.
CONVERTER_PARTS = (CONVERTER, "conversion/", "gguf-py/gguf/")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def cache_root() -> Path:
    base = os.environ.get("VLMLAB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vlmlab")
    return Path(base)


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_LLAMA_CPP_PYTHON


def converter_source(explicit: str | os.PathLike[str] | None = None) -> Path:
    """A folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``.

    Order: ``explicit``, ``$VLMLAB_LLAMA_CPP``, vlmlab's cache, else the llama-cpp-python sdist
    of the installed version (pip download, once) unpacked into the cache.

    Raises:
        NotFoundError: a given folder has no converter.
        EngineError: the sdist cannot be downloaded (the message says how to point at a checkout).
    """
    given = explicit or os.environ.get("VLMLAB_LLAMA_CPP")
    if given:
        folder = Path(given).expanduser()
        if not (folder / CONVERTER).is_file():
            raise NotFoundError(f"{folder} has no {CONVERTER}; pass a llama.cpp checkout (git clone https://github.com/ggml-org/llama.cpp)")
        return folder
    version = llama_cpp_version()
    folder = cache_root() / f"llama.cpp-converter-{version}"
    if (folder / CONVERTER).is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix="vlmlab-sdist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={version}", "-d", tmp]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise EngineError(
                f"could not download llama-cpp-python {version}'s source (for llama.cpp's converter): "
                f"{' / '.join(tail) or 'no archive'}. Point --llama-cpp (or VLMLAB_LLAMA_CPP) at a llama.cpp checkout instead"
            )
        _unpack_converter(archives[0], folder)
    return folder


def _unpack_converter(archive: Path, folder: Path) -> None:
    partial = folder.with_name(folder.name + ".partial")
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            _, sep, rest = member.name.partition("/vendor/llama.cpp/")
            if sep and member.isfile() and rest.startswith(CONVERTER_PARTS):
                member.name = rest
                members.append(member)
        if not any(m.name == CONVERTER for m in members):
            raise EngineError(f"{archive.name} has no vendor/llama.cpp/{CONVERTER}")
        tar.extractall(partial, members=members, filter="data")
    partial.rename(folder)


def export_gguf(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    outtype: str = "f16",
    llama_cpp: str | os.PathLike[str] | None = None,
) -> GGUFFiles:
    """Convert ``checkpoint`` (a transformers folder) to ``OUT/NAME.gguf`` and
    ``OUT/mmproj-NAME.gguf``; ``name`` is also written as the GGUF's ``general.name`` (a vlmlab
    family name or alias there tells the engine which family it is).

    Raises:
        ConfigError: an unknown ``outtype``.
        NotFoundError: ``checkpoint`` has no config.json.
        EngineError: the converter failed (its last lines are in the message).
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown GGUF type {outtype!r}; use one of: {', '.join(OUTTYPES)}")
    source = Path(checkpoint)
    if not (source / "config.json").is_file():
        raise NotFoundError(f"{source} is not a transformers checkpoint folder (no config.json)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tools = converter_source(llama_cpp)
    files = GGUFFiles(out / f"{name}.gguf", out / f"mmproj-{name}.gguf")
    for target, extra in ((files.model, []), (files.mmproj, ["--mmproj"])):
        command = [sys.executable, "-m", "vlmlab.engines.llamacpp.run_converter", str(tools), str(source),
                   "--outfile", str(target), "--outtype", outtype, "--model-name", name, *extra]  # fmt: skip
        logger.info("llama.cpp converter: %s", " ".join(command[3:]))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not Path(target).is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise EngineError(f"llama.cpp's converter failed on {source}:\n{tail}")
    return files


def nano_gguf(llama_cpp: str | os.PathLike[str] | None = None) -> GGUFFiles:
    """The packaged nano checkpoint as GGUF (f16), exported once into vlmlab's cache (a folder
    named after the weights' hash, so a retrained nano gets new files)."""
    from vlmlab.nano import checkpoint_path

    checkpoint = checkpoint_path()
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise NotFoundError(f"the packaged nano checkpoint is missing at {checkpoint}")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"nano-{digest}"
    files = GGUFFiles(folder / "vlmlab-nano.gguf", folder / "mmproj-vlmlab-nano.gguf")
    if files.model.is_file() and files.mmproj is not None and files.mmproj.is_file():
        return files
    with tempfile.TemporaryDirectory(dir=_parent(folder), prefix="nano-export-") as tmp:
        export_gguf(checkpoint, tmp, name="vlmlab-nano", llama_cpp=llama_cpp)
        if not folder.exists():
            Path(tmp).rename(folder)
            Path(tmp).mkdir()  # TemporaryDirectory removes it on exit
    return files


def _parent(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent
