"""What the llama.cpp engine decides without llama.cpp: which GGUF files to load, which vlmlab
family they are, how a chat becomes the model's prompt text with media markers, the size each
image is resized to before llama.cpp sees it, and which request fields it honours.

Everything here is plain Python (no ``llama_cpp`` import), so it is tested on any machine.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.families import Family, get_family
from vlmlab.protocol.core import Chat, FinishReason, ImagePart, SamplingParams, StructuredOutput
from vlmlab.protocol.errors import BadRequestError, ConfigError, NotFoundError, VlmlabError

INSTALL_HINT = (
    "the llamacpp engine needs llama-cpp-python: pip install 'vlmlab[llamacpp]' (it builds llama.cpp "
    "from source, about 10 CPU-minutes; CMAKE_ARGS=-DGGML_NATIVE=OFF makes the build portable)"
)
# llama.cpp's clip projector types (the mmproj's ``clip.projector_type``) -> vlmlab family.
PROJECTOR_FAMILIES = {
    "pixtral": "pixtral",
    "qwen2vl_merger": "qwen2_vl",
    "qwen2.5vl_merger": "qwen2_5_vl",
    "idefics3": "idefics3",
    "internvl": "internvl2",
}
# Families whose image is one view at the size vlmlab's rule gives: llama.cpp then gets the
# pixels the transformers processor would encode. Tiling families (LLaVA-NeXT, Phi-3.5,
# InternVL, Idefics) cut their own tiles from the original image, so it is passed unchanged.
RESIZED_FAMILIES = frozenset({"nano", "pixtral", "qwen2_vl", "qwen2_5_vl"})


@dataclass(frozen=True)
class GGUFFiles:
    """The two files the engine loads: the language model and its vision projector."""

    model: Path
    mmproj: Path | None


def resolve_files(model: str, extra: Mapping[str, Any], download: Callable[[str, str], str] | None = None) -> GGUFFiles:
    """The GGUF files for ``--model`` (a ``.gguf`` file, a folder holding one model GGUF and one
    ``mmproj-*.gguf``, or a Hub repository with ``gguf_file`` / ``mmproj`` naming its files) and
    ``--mmproj`` (a path, or a file name in that repository).

    ``download(repo, filename) -> local path`` fetches a Hub file (``huggingface_hub``'s
    ``hf_hub_download``); it is only called for a model that is not on disk.

    Raises:
        NotFoundError: a path that does not exist, or a folder without a model GGUF.
        ConfigError: a folder with several model GGUFs and no ``gguf_file`` to choose one.
    """
    mmproj_arg = extra.get("mmproj")
    path = Path(model).expanduser()
    if path.is_file():
        return GGUFFiles(path.resolve(), _local_mmproj(mmproj_arg, path.parent))
    if path.is_dir():
        chosen = extra.get("gguf_file")
        ggufs = sorted(p for p in path.glob("*.gguf") if not p.name.startswith("mmproj"))
        if chosen:
            ggufs = [path / chosen]
            if not ggufs[0].is_file():
                raise NotFoundError(f"{chosen!r} is not in {path}")
        if not ggufs:
            raise NotFoundError(f"{path} holds no model .gguf file (vlmlab nano export-gguf {path} makes nano's)")
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise ConfigError(f"{path} holds several model GGUFs ({names}); choose one with --gguf-file NAME")
        projectors = sorted(path.glob("mmproj*.gguf"))
        mmproj = _local_mmproj(mmproj_arg, path) if mmproj_arg else (projectors[0] if len(projectors) == 1 else None)
        return GGUFFiles(ggufs[0].resolve(), mmproj.resolve() if mmproj else None)
    if model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        raise NotFoundError(f"GGUF file {model!r} does not exist")
    # A Hub repository of GGUFs (e.g. ggml-org/pixtral-12b-GGUF).
    filename = extra.get("gguf_file")
    if not filename:
        raise ConfigError(
            f"{model!r} is not a local GGUF: for a Hub GGUF repository name its files, e.g. "
            "--gguf-file pixtral-12b-Q4_K_M.gguf --mmproj mmproj-pixtral-12b-f16.gguf"
        )
    if download is None:  # pragma: no cover - the engine always passes one
        raise NotFoundError(f"cannot download {model}/{filename}")
    local = Path(download(model, str(filename)))
    mmproj = None
    if mmproj_arg:
        given = Path(str(mmproj_arg)).expanduser()
        mmproj = given if given.is_file() else Path(download(model, str(mmproj_arg)))
    return GGUFFiles(local, mmproj)


def _local_mmproj(value: Any, folder: Path) -> Path | None:
    if not value:
        return None
    for candidate in (Path(str(value)).expanduser(), folder / str(value)):
        if candidate.is_file():
            return candidate.resolve()
    raise NotFoundError(f"--mmproj {value}: no such file (looked in the current folder and {folder})")


def family_of(metadata: Mapping[str, str], projector: str | None, hint: str | None = None) -> Family | None:
    """The vlmlab family of a GGUF: ``--family`` when given, else the model's ``general.name``
    when it is a family name or alias (nano's export writes ``vlmlab-nano``), else the vision
    projector type. None: unknown (prompts use the GGUF's template; images go unresized).

    Raises:
        ConfigError: ``--family`` names no family.
    """
    if hint:
        try:
            return get_family(hint)
        except VlmlabError as exc:
            raise ConfigError(f"--family {hint}: {exc}") from exc
    for key in ("general.name", "general.basename"):
        name = metadata.get(key)
        if name:
            try:
                return get_family(name)
            except VlmlabError:
                pass
    if projector and projector in PROJECTOR_FAMILIES:
        return get_family(PROJECTOR_FAMILIES[projector])
    return None


def resized_size(family: Family | None, width: int, height: int, options: Mapping[str, Any]) -> tuple[int, int] | None:
    """The size vlmlab's family rule gives the image, or None to pass it as it is."""
    if family is None or family.name not in RESIZED_FAMILIES:
        return None
    layout = family.image_layout(width, height, **options)
    return None if layout.resized == (width, height) else layout.resized


def template_messages(chat: Chat, marker: str) -> list[dict[str, Any]]:
    """Chat -> the messages a GGUF's Jinja chat template renders: each image becomes a text part
    holding llama.cpp's media marker, where mtmd puts the image's tokens (with the family's
    begin / break / end tokens)."""
    out: list[dict[str, Any]] = []
    for message in chat.messages:
        if message.tool_calls or message.role == "tool":
            raise BadRequestError("tools are not supported by the llamacpp engine", param="tools")
        if not message.images:
            out.append({"role": message.role, "content": message.text})
            continue
        parts = [
            {"type": "text", "text": marker} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.content
        ]
        out.append({"role": message.role, "content": parts})
    return out


def family_prompt(family: Family, chat: Chat, marker: str) -> str:
    """The family's own prompt format with the marker for each image (GGUFs without a template)."""
    text = family.render_prompt(chat)
    return text.replace(family.image_placeholder, marker) if family.image_placeholder else text


# The request fields llama.cpp's samplers honour beyond temperature / top-p / top-k / stop / seed.
FEATURES = frozenset({"penalties", "logit_bias", "structured_outputs"})


def structured_grammar(structured: StructuredOutput | None, json_schema_to_gbnf: Callable[[str], str]) -> str | None:
    """The GBNF grammar (llama.cpp's grammar sampler) for a structured-output request:
    ``json_schema`` / ``json_object`` through llama-cpp-python's ``json_schema_to_gbnf``, ``choice``
    as alternatives of literal strings, ``grammar`` taken as GBNF.

    Raises:
        BadRequestError: ``regex`` (llama.cpp has no regex constraint), or a schema it cannot convert.
    """
    if structured is None:
        return None
    if structured.kind == "regex":
        raise BadRequestError(
            "a regex constraint is not supported by the llamacpp engine (llama.cpp constrains with "
            "grammars): use a JSON schema, a choice or a GBNF grammar", param=structured.param,
        )  # fmt: skip
    if structured.kind == "choice":
        choices = json.loads(structured.spec)
        return "root ::= " + " | ".join(json.dumps(str(c), ensure_ascii=True) for c in choices)
    if structured.kind == "grammar":
        return structured.spec
    schema = structured.spec if structured.kind == "json_schema" else '{"type": "object"}'
    try:
        return json_schema_to_gbnf(schema)
    except Exception as exc:  # noqa: BLE001 - its converter raises plain exceptions
        raise BadRequestError(f"llama.cpp cannot turn this JSON schema into a grammar: {exc}", param=structured.param) from exc


@dataclass(frozen=True)
class SamplerPlan:
    """llama.cpp's sampler chain for one request, in its order: logit bias, penalties, the
    grammar, then greedy, or top-k, top-p, temperature and a seeded draw."""

    greedy: bool
    grammar: str | None
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    logit_bias: tuple[tuple[int, float], ...]
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float


def sampler_plan(sampling: SamplingParams, n_vocab: int, end_tokens: tuple[int, ...] = (), grammar: str | None = None) -> SamplerPlan:
    """``sampling`` as llama.cpp samplers. ``repeat_penalty`` is 1.0 unless the request asks
    (llama-cpp-python's own default is 1.1, which changes greedy answers); ``ignore_eos`` masks
    ``end_tokens`` with a -inf bias.

    Raises:
        BadRequestError: a ``logit_bias`` token outside the vocabulary.
    """
    bias = dict(sampling.logit_bias)
    for token in bias:
        if not 0 <= token < n_vocab:
            raise BadRequestError(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})", param="logit_bias")
    if sampling.ignore_eos:
        bias.update({token: float("-inf") for token in end_tokens})
    return SamplerPlan(
        greedy=sampling.temperature == 0.0,
        grammar=grammar,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=sampling.seed,
        logit_bias=tuple(sorted(bias.items())),
        repeat_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
    )


class TokenText:
    """Generated token bytes -> text, holding back a UTF-8 sequence split across tokens."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def finish_reason(hit_end: bool, stopped_by_text: bool, cancelled: bool) -> FinishReason:
    if cancelled:
        return "abort"
    return "stop" if hit_end or stopped_by_text else "length"


def default_threads(copies: int, cpus: int | None = None) -> int:
    """Threads per model copy: the machine's CPUs but one, shared among the copies (at least one).

    One core stays with the server's own Python thread (HTTP, images, detokenizing): llama.cpp's
    threads spin while they wait for each other, so a thread count that takes every core collapses
    as soon as anything else runs (measured on 2 cores, nano, 16 concurrent: 2 threads gave 4.2
    req/s, 1 thread 57.7).
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cpus - 1) // max(1, copies))
