"""The ``vlmlab`` command: a table of subcommands that parse flags and call library functions.

Errors that a user can cause are :class:`VlmlabError`; :func:`main` prints their message (which
names the bad value and the fix) and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from vlmlab.protocol.errors import ConfigError, VlmlabError

app = typer.Typer(
    name="vlmlab",
    help="Serve, evaluate, benchmark, compare and plan vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _flag_type_hidden() -> None:
    """typer 0.29's rich help prints a type (``<bool>``) beside plain on/off flags, as if they
    took a value. Show no type for a flag; every other option keeps its own."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "vlmlab_flags_hidden", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.vlmlab_flags_hidden = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flag_type_hidden()
# Piped output (CI logs, `| less`) gets a wide table rather than rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def print_version(requested: bool) -> None:
    """``--version`` / ``-V``: print ``vlmlab <version>`` and exit 0 (eager: before any command)."""
    if requested:
        from vlmlab.envreport import vlmlab_version

        typer.echo(f"vlmlab {vlmlab_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Serve, evaluate, benchmark, compare and plan vision-language models."""


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``["num_crops=16", "max_pixels=1003520"]`` -> dict (values typed later by the family)."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt {pair!r} must look like NAME=VALUE, e.g. --opt num_crops=16")
        options[key.strip()] = value.strip()
    return options


def remote_extra(base_url: str | None, api_key: str | None, base: Any = None) -> dict[str, Any] | None:
    """``EngineSpec.extra`` for the remote engine: ``--base-url`` / ``--remote-api-key`` over a
    config file's ``extra`` (``base``); ``None`` when neither flag is given."""
    flags = {k: v for k, v in (("base_url", base_url), ("api_key", api_key)) if v}
    if not flags:
        return None
    return {**(base if isinstance(base, dict) else {}), **flags}


def gguf_extra(extra: dict[str, Any] | None, base: Any = None, **flags: Any) -> dict[str, Any] | None:
    """``extra`` plus the llamacpp engine's flags that were given (``mmproj``, ``gguf_file``,
    ``family``, ``n_threads``): a path is made absolute, so it means the same in a replica."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return extra
    mmproj = given.get("mmproj")
    if mmproj and Path(mmproj).expanduser().exists():
        given["mmproj"] = str(Path(mmproj).expanduser().resolve())
    start = extra if extra is not None else (base if isinstance(base, dict) else {})
    return {**start, **given}


MMPROJ_HELP = "llamacpp engine: the vision projector GGUF (a path, or a file of the --model Hub repository)."
GGUF_FILE_HELP = "llamacpp engine: the model GGUF in a folder or Hub repository holding several (e.g. pixtral-12b-Q4_K_M.gguf)."
FAMILY_HELP = "llamacpp engine: the vlmlab family of the GGUF when its metadata does not say (e.g. pixtral, qwen2_vl)."
THREADS_HELP = "llamacpp engine: CPU threads per model copy (default: the cores shared among --data-parallel-size copies)."

QUANTIZATION_HELP = (
    "Weight quantization: fp8, awq, gptq, bitsandbytes (vllm); bnb-4bit, bnb-8bit (hf on CUDA), "
    "int8 (hf, torchao weight-only)."
)


def with_quantization(extra: dict[str, Any], quantization: str | None, load_in_4bit: bool, load_in_8bit: bool) -> dict[str, Any]:
    """``extra`` plus the ``quantization`` the flags ask for (ConfigError when they conflict)."""
    from vlmlab.engines.quantization import from_flags

    chosen = from_flags(quantization, load_in_4bit, load_in_8bit)
    return {**extra, "quantization": chosen} if chosen else extra


def image_sizes(images: list[str]) -> list[tuple[int, int]]:
    """Each ``--image`` is ``WIDTHxHEIGHT`` or a file / URL whose header gives the size."""
    from vlmlab.plan import parse_size

    sizes = []
    for ref in images:
        looks_like_size = ref.replace(" ", "").lower().replace("×", "x").split("x")
        if len(looks_like_size) == 2 and all(p.isdigit() for p in looks_like_size):
            sizes.append(parse_size(ref))
        else:
            from vlmlab.media import MediaPolicy, probe_image

            # Local files named on the command line are the user's own: allow any path.
            info = probe_image(ref, policy=MediaPolicy(allowed_local_root=Path("/")))
            sizes.append((info.width, info.height))
    return sizes


# A library that a command imports lazily -> the extra that installs it (pyproject.toml).
EXTRA_OF_MODULE = {
    **dict.fromkeys(["torch", "torchvision", "transformers", "tokenizers", "accelerate"], "hf"),
    "safetensors": "hf",
    **dict.fromkeys(["fastapi", "uvicorn", "starlette", "prometheus_client"], "server"),
    "vllm": "vllm",
    **dict.fromkeys(["mlx", "mlx_vlm"], "mlx"),
    **dict.fromkeys(["torchao", "bitsandbytes"], "quant"),
}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """The fix for a missing optional library (a wheel installed without its extras), or None."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return (
        f"{module} is not installed; this command needs vlmlab's '{extra}' extra: "
        f"pip install 'vlmlab[{extra}]' (or the versions CI tested, from a checkout: "
        "pip install --require-hashes -r requirements/lock.txt)"
    )


def configure_logging() -> None:
    """WARNING and above, one line each, ``LEVEL logger: message``.

    huggingface_hub gives its logger a handler of its own and still passes records up to the
    root: every message would print twice. Its handler alone prints them, once."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("huggingface_hub").propagate = False


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    configure_logging()
    from rich.markup import escape  # messages name extras like 'vlmlab[vllm]'

    try:
        app(args=argv)
    except VlmlabError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)


# The subcommands register themselves on `app` (imported last: they import `app` from here).
from vlmlab.cli import models, running, analysis, environment  # noqa: E402,F401,I001 (this order is the --help order)
