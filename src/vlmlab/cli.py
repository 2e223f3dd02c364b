"""The ``vlmlab`` command: a table of subcommands that parse flags and call library functions.

Errors that a user can cause are :class:`VlmlabError`; :func:`main` prints their message (which
names the bad value and the fix) and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vlmlab.protocol.errors import ConfigError, VlmlabError

app = typer.Typer(
    name="vlmlab",
    help="Serve, evaluate, benchmark, compare and plan vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, `| less`) gets a wide table rather than rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


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


@app.command()
def plan(
    model: Annotated[
        list[str], typer.Option("--model", "-m", help="Family, hub id, or 'all'. Repeatable.")
    ],
    image: Annotated[
        list[str], typer.Option("--image", "-i", help="WIDTHxHEIGHT or an image file / URL.")
    ],
    opt: Annotated[
        list[str] | None, typer.Option("--opt", help="Processor option NAME=VALUE.")
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Text tokens besides the images.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 256,
    max_model_len: Annotated[int | None, typer.Option(help="Context length to plan for.")] = None,
    gpu_mem: Annotated[str | None, typer.Option(help="GPU memory, e.g. 24GiB.")] = None,
    dtype: Annotated[str, typer.Option(help="Weight dtype: bf16, fp16, fp32, fp8, int8, int4.")] = "bf16",
    kv_dtype: Annotated[str, typer.Option(help="KV-cache dtype.")] = "bf16",
    quantization: Annotated[str | None, typer.Option(help="Price weights as this method stores them: awq/gptq/bnb-4bit -> int4, bnb-8bit/int8 -> int8, fp8 (overrides --dtype).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Image tokens, prompt size, KV-cache and weight memory per model, before loading any."""
    from vlmlab.engines.quantization import plan_dtype
    from vlmlab.plan import PlanInput, format_bytes, parse_bytes
    from vlmlab.plan import plan as make_plan

    if quantization:
        dtype = plan_dtype(quantization)

    spec = PlanInput(
        images=image_sizes(image),
        options=parse_options(opt),
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        max_model_len=max_model_len,
        gpu_mem=parse_bytes(gpu_mem) if gpu_mem else None,
        dtype=dtype,
        kv_dtype=kv_dtype,
    )
    rows = make_plan(model, spec)
    if as_json:
        payload: dict[str, Any] = {
            "images": [list(s) for s in spec.images],
            "options": spec.options,
            "rows": [r.to_dict() for r in rows],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    sizes = ", ".join(f"{w}x{h}" for w, h in spec.images)
    table = Table(title=f"vlmlab plan: {sizes}, {prompt_tokens} text + {max_tokens} new tokens")
    for column in ("model", "image tokens (grid)", "prompt", "KV / request", "weights"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_column("context")
    if spec.gpu_mem is not None:
        table.add_column(f"fits {format_bytes(spec.gpu_mem)}")
        table.add_column("concurrent", justify="right")
    for row in rows:
        name = f"{row.display_name}\n[dim]{row.checkpoint}[/dim]"
        if row.error:
            table.add_row(name, f"[red]{row.error}[/red]", "", "", format_bytes(row.weight_bytes))
            continue
        tokens = " + ".join(f"{t} ({g})" for t, g in zip(row.image_tokens, row.grids))
        context = (
            f"[green]ok[/green] / {row.max_model_len}"
            if row.fits_context
            else f"[red]over[/red] {row.request_tokens}/{row.max_model_len}"
        )
        cells = [
            name,
            tokens,
            str(row.prompt_tokens),
            format_bytes(row.kv_bytes_per_request),
            format_bytes(row.weight_bytes),
            context,
        ]
        if spec.gpu_mem is not None:
            cells += ["[green]yes[/green]" if row.fits_gpu else "[red]no[/red]", str(row.concurrent_requests)]
        table.add_row(*cells)
    console.print(table)
    notes = [f"{r.family}: {n}" for r in rows for n in r.notes]
    for note in dict.fromkeys(notes):
        console.print(f"[dim]note: {note}[/dim]")


@app.command()
def families(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the model families vlmlab knows, with options and checkpoints."""
    from vlmlab.families import FAMILIES

    rows = []
    for name in FAMILIES:
        fam = FAMILIES.get(name)
        rows.append(
            {
                "name": fam.name,
                "display_name": fam.display_name,
                "options": fam.default_options,
                "max_images": fam.max_images,
                "checkpoints": [c.hub_id for c in fam.checkpoints],
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="model families")
    for column in ("name", "model", "default options", "max images", "checkpoints"):
        table.add_column(column)
    for row in rows:
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
        table.add_row(
            row["name"], row["display_name"], opts, str(row["max_images"]), "\n".join(row["checkpoints"])
        )
    console.print(table)


@app.command()
def chat(
    question: Annotated[str, typer.Argument(help="The question about the image(s).")],
    image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image path or URL. Repeatable.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="nano, a family preset, a hub id or a path.")] = "nano",
    engine: Annotated[str, typer.Option(help="Backend: hf, vllm (NVIDIA GPU), mlx (Apple Silicon) or remote (an OpenAI-compatible server).")] = "hf",
    base_url: Annotated[str | None, typer.Option(help="remote engine: server URL, e.g. http://host:8000/v1.")] = None,
    remote_api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_REMOTE_API_KEY", help="remote engine: API key (default: MISTRAL_API_KEY / OPENAI_API_KEY for their URLs).")] = None,
    quantization: Annotated[str | None, typer.Option(help=QUANTIZATION_HELP)] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="hf on CUDA: bitsandbytes NF4 (= --quantization bnb-4bit).")] = False,
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="hf on CUDA: bitsandbytes LLM.int8() (= --quantization bnb-8bit).")] = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the checkpoint's own code.")] = False,
    opt: Annotated[list[str] | None, typer.Option("--opt", help="Processor option NAME=VALUE.")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print text as it is generated.")] = True,
) -> None:
    """Ask one question about one or more images; prints the answer and a speed line."""
    from vlmlab.chat import detail_line, run_chat, speed_line
    from vlmlab.config import EngineSpec
    from vlmlab.protocol.core import SamplingParams

    spec = EngineSpec(
        model=model,
        engine=engine,
        device=device,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
        trust_remote_code=trust_remote_code,
        processor_options=parse_options(opt),
        extra=with_quantization(remote_extra(base_url, remote_api_key) or {}, quantization, load_in_4bit, load_in_8bit),
    )
    if engine.strip().lower() == "vllm":
        # vLLM's offline LLM.chat: one batch, and vLLM prints its own progress / speed line.
        spec = dataclasses.replace(spec, extra={"offline": True, **spec.extra})
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def on_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    outcome = run_chat(spec, question, image or [], sampling, on_text if stream else None, system)
    if not stream:
        sys.stdout.write(outcome.result.text)
    sys.stdout.write("\n")
    err_console.print(speed_line(outcome.result, outcome.wall_s), highlight=False)
    err_console.print(detail_line(outcome), style="dim", highlight=False)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", help="nano, a family preset, hub id or path.")] = None,
    engine: Annotated[str | None, typer.Option(help="Engine or fallback chain, e.g. vllm,hf.")] = None,
    config: Annotated[str | None, typer.Option(help="YAML/JSON config file or preset name.")] = None,
    base_url: Annotated[str | None, typer.Option(help="remote engine: upstream URL, e.g. http://host:8000/v1.")] = None,
    remote_api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_REMOTE_API_KEY", help="remote engine: upstream API key.")] = None,
    quantization: Annotated[str | None, typer.Option(help=QUANTIZATION_HELP)] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="hf on CUDA: bitsandbytes NF4 (= --quantization bnb-4bit).")] = False,
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="hf on CUDA: bitsandbytes LLM.int8() (= --quantization bnb-8bit).")] = False,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    allowed_local_media_path: Annotated[str | None, typer.Option(help="Directory file:// images may come from.")] = None,
    allowed_media_domains: Annotated[str | None, typer.Option(help="Comma-separated http(s) host allow-list.")] = None,
    trusted_media_hosts: Annotated[str | None, typer.Option(help="Comma-separated hosts exempt from the private-address guard (e.g. a local image server).")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients send.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or fp32.")] = None,
    trust_remote_code: Annotated[bool | None, typer.Option("--trust-remote-code/--no-trust-remote-code")] = None,
    max_model_len: Annotated[int | None, typer.Option()] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Requests decoded together.")] = None,
    max_images: Annotated[int | None, typer.Option(help="Images per request.")] = None,
    max_image_bytes: Annotated[str | None, typer.Option(help="Per-image byte cap, e.g. 20MiB.")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="Per-image pixel cap.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests in the engine at once.")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Requests waiting beyond that (then 429).")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds per request (then 504).")] = None,
    preprocess_cache: Annotated[str | None, typer.Option(help="Preprocessing cache size, e.g. 256MiB; 0 = off.")] = None,
    response_cache: Annotated[int | None, typer.Option(help="Response cache entries; 0 = off.")] = None,
    opt: Annotated[list[str] | None, typer.Option("--opt", help="Processor default NAME=VALUE.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Serve a model behind the OpenAI chat-completions API (default: nano on 127.0.0.1:8000)."""
    import uvicorn

    from vlmlab.config import read_config_file, server_settings
    from vlmlab.server import create_app

    file_settings = read_config_file(config) if config else None
    settings = server_settings(
        file_settings,
        extra=remote_extra(base_url, remote_api_key, (file_settings or {}).get("extra")),
        model=model, engine=engine, host=host, port=port, api_key=api_key,
        allowed_local_media_path=allowed_local_media_path, allowed_media_domains=allowed_media_domains,
        trusted_media_hosts=trusted_media_hosts,
        served_model_name=served_model_name, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, max_model_len=max_model_len,
        max_batch_size=max_batch_size, max_images=max_images, max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, max_concurrency=max_concurrency, max_queue=max_queue,
        request_timeout_s=request_timeout, preprocess_cache_bytes=preprocess_cache,
        response_cache_entries=response_cache, processor_options=parse_options(opt) or None,
    )  # fmt: skip
    chosen = with_quantization({}, quantization, load_in_4bit, load_in_8bit)
    if chosen:  # every engine of the chain, whatever extra each one has from the config file
        engines = tuple(dataclasses.replace(s, extra={**s.extra, **chosen}) for s in settings.engines)
        settings = dataclasses.replace(settings, engines=engines)
    logging.getLogger("vlmlab").setLevel(log_level.upper())
    console.print(f"[bold]vlmlab serve[/bold] {settings.model_name} on http://{settings.host}:{settings.port}/v1")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level.lower())


@app.command("test-model")
def test_model_command(
    model: Annotated[str, typer.Argument(help="nano, a family preset, a hub id or a path.")] = "nano",
    engine: Annotated[str, typer.Option(help="Backend.")] = "hf",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option()] = False,
    max_tokens: Annotated[int, typer.Option()] = 16,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check a model end to end: load, one answer per task type, streaming, multi-image, usage."""
    from vlmlab.config import EngineSpec
    from vlmlab.testing import test_model

    spec = EngineSpec(model=model, engine=engine, device=device, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]
    report = test_model(spec, max_tokens=max_tokens)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(title=f"vlmlab test-model {model} ({report.family or 'unknown family'})")
        for column in ("check", "result", "detail", "s"):
            table.add_column(column)
        for check in report.checks:
            mark = "[green]pass[/green]" if check.passed else "[red]FAIL[/red]"
            table.add_row(check.name, mark, check.detail, f"{check.seconds:.2f}")
        console.print(table)
        answers = Table(title="answers")
        for column in ("task", "question", "answer", "expected"):
            answers.add_column(column)
        for row in report.answers:
            answers.add_row(row["task"], row["question"], repr(row["answer"]), row["expected"] + (" ✓" if row["correct"] else ""))
        console.print(answers)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def compare(
    models: Annotated[str, typer.Option(help="Comma-separated: nano, presets, hub ids, paths, URL#model.")],
    image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image for --question. Repeatable.")] = None,
    question: Annotated[str | None, typer.Option(help="One question about the --image(s).")] = None,
    questions_file: Annotated[Path | None, typer.Option(help="JSONL: images, question, expected.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Take questions (and answers) from a dataset, e.g. synth.")] = None,
    limit: Annotated[int, typer.Option(help="Questions from --dataset.")] = 20,
    max_tokens: Annotated[int, typer.Option()] = 64,
    output_dir: Annotated[Path, typer.Option(help="Where answers.json and report.html go.")] = Path("compare-out"),
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Same questions, several models: answers, latency, TTFT, image tokens, memory side by side."""
    from vlmlab.compare import load_questions, run_compare, summarize, write_outputs

    questions = load_questions(image or [], question, questions_file, dataset, limit)
    answers = run_compare([m for m in models.split(",") if m.strip()], questions, max_tokens, device=device)
    path = write_outputs(answers, questions, output_dir, "vlmlab compare")
    _print_summary(summarize(answers), "model")
    console.print(f"report: {path}")


@app.command()
def sweep(
    model: Annotated[str, typer.Option("--model", "-m")] = "nano",
    image: Annotated[list[str] | None, typer.Option("--image", "-i")] = None,
    question: Annotated[str | None, typer.Option()] = None,
    questions_file: Annotated[Path | None, typer.Option()] = None,
    dataset: Annotated[str | None, typer.Option(help="Questions with answers for accuracy, e.g. synth.")] = None,
    limit: Annotated[int, typer.Option()] = 20,
    resolutions: Annotated[str | None, typer.Option(help="Longest sides, e.g. 224,336,512,1024.")] = None,
    images_per_prompt: Annotated[str | None, typer.Option(help="Image counts, e.g. 1,2,3.")] = None,
    max_tokens: Annotated[int, typer.Option()] = 64,
    output_dir: Annotated[Path, typer.Option()] = Path("sweep-out"),
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """How resolution (or the number of images) changes answers, accuracy, tokens and latency."""
    from vlmlab.compare import load_questions, run_sweep, summarize, write_outputs

    def ints(text: str | None) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()] if text else []
        except ValueError:
            raise ConfigError(f"expected comma-separated integers, got {text!r}") from None

    sides, counts = ints(resolutions), ints(images_per_prompt)
    if not sides and not counts:
        raise ConfigError("give --resolutions 224,336,512 and/or --images-per-prompt 1,2,3")
    questions = load_questions(image or [], question, questions_file, dataset, limit)
    answers = run_sweep(model, questions, sides, counts, max_tokens, device=device)
    by = "resolution" if sides else "images_per_prompt"
    path = write_outputs(answers, questions, output_dir, f"vlmlab sweep: {model}", by=by)
    _print_summary(summarize(answers, by), by)
    console.print(f"report: {path}")


def _print_summary(rows: list[dict[str, Any]], key: str) -> None:
    table = Table()
    for column in (key, "questions", "errors", "accuracy", "latency ms", "TTFT ms", "image tokens", "peak mem"):
        table.add_column(column)
    for row in rows:
        def fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
            return "-" if value is None else f"{value * scale:.{digits}f}"

        table.add_row(
            str(row[key]), str(row["questions"]), str(row["errors"]), fmt(row["accuracy"], 1, 3),
            fmt(row["mean_latency_s"], 1000), fmt(row["mean_ttft_s"], 1000), fmt(row["mean_image_tokens"], 1, 0),
            "-" if not row["peak_memory_bytes"] else f"{row['peak_memory_bytes'] / 2**20:.0f} MiB",
        )  # fmt: skip
    console.print(table)


@app.command("eval")
def eval_command(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model(s): nano, preset, hub id, path. Repeatable or comma-separated.")],
    dataset: Annotated[list[str], typer.Option("--dataset", "-d", help="Dataset key(s), e.g. synth, chartqa_test_human.")],
    output_dir: Annotated[Path, typer.Option(help="Results folder (resumes what is already there).")] = Path("outputs/vlm_results"),
    engine: Annotated[str, typer.Option(help="hf, vllm, mlx or remote.")] = "hf",
    base_url: Annotated[str | None, typer.Option(help="For --engine remote.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_REMOTE_API_KEY")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests the engine decodes together.")] = 8,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight (default 2 x batch size).")] = None,
    limit: Annotated[int | None, typer.Option(help="First K samples of each dataset.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Override the dataset's generation budget.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    prompt_profile: Annotated[str, typer.Option(help="default, vlmevalkit, mistral or damqa.")] = "default",
    metric_mode: Annotated[str | None, typer.Option(help="official, lmms-eval, vlmevalkit, mistral, ...")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Local copies instead of the Hugging Face Hub.")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
    trust_remote_code: Annotated[bool, typer.Option()] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    judge_url: Annotated[str | None, typer.Option(help="OpenAI-compatible URL of an extraction judge (off by default).")] = None,
    judge_model: Annotated[str | None, typer.Option(help="The judge's model id.")] = None,
    judge_api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_JUDGE_API_KEY")] = None,
) -> None:
    """Score models on benchmarks; crash-safe (one JSON line per sample) and resumable."""
    from vlmlab.eval.runner import EvalConfig, run_eval
    from vlmlab.eval.scoring import markdown_table

    def split(values: list[str]) -> tuple[str, ...]:
        return tuple(v.strip() for item in values for v in item.split(",") if v.strip())

    config = EvalConfig(
        models=split(model), datasets=split(dataset), output_dir=output_dir, engine=engine,
        base_url=base_url, api_key=api_key, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, batch_size=batch_size, concurrency=concurrency,
        limit=limit, max_tokens=max_tokens, seed=seed, prompt_profile=prompt_profile,
        metric_mode=metric_mode, data_dir=data_dir, progress=progress,
        judge_url=judge_url, judge_model=judge_model, judge_api_key=judge_api_key,
    )  # fmt: skip
    summaries = run_eval(config)
    console.print(markdown_table(summaries))
    console.print(f"results: {output_dir}/summary.json, {output_dir}/summary.md")


@app.command("score")
def score_command(
    output_dir: Annotated[Path, typer.Argument(help="A folder written by vlmlab eval.")],
    metric_mode: Annotated[str | None, typer.Option(help="Re-score with this mode (default: each dataset's official one).")] = None,
    judge_url: Annotated[str | None, typer.Option(help="OpenAI-compatible URL of an extraction judge.")] = None,
    judge_model: Annotated[str | None, typer.Option()] = None,
    judge_api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_JUDGE_API_KEY")] = None,
) -> None:
    """Re-score stored eval outputs without inference (another metric mode, a fixed metric)."""
    from vlmlab.eval.runner import EvalConfig, rescore
    from vlmlab.eval.scoring import markdown_table

    judge = EvalConfig((), (), output_dir, judge_url=judge_url, judge_model=judge_model, judge_api_key=judge_api_key).judge()
    console.print(markdown_table(rescore(output_dir, metric_mode, judge)))


@app.command()
def bench(
    base_url: Annotated[str | None, typer.Option(help="Server to measure, e.g. http://host:8000/v1 (default: start `vlmlab serve --model MODEL`).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model id to send (with --base-url), else the model to serve (default nano).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_BENCH_API_KEY", help="Bearer token for the server.")] = None,
    endpoint: Annotated[str, typer.Option(help="Chat-completions path.")] = "/v1/chat/completions",
    serve_arg: Annotated[list[str] | None, typer.Option("--serve-arg", help="Extra `vlmlab serve` flag for the local server, e.g. --serve-arg=--device=cpu. Repeatable.")] = None,
    dataset: Annotated[str, typer.Option(help="random (synthetic photos) or synth (nano tasks).")] = "random",
    image_size: Annotated[list[str] | None, typer.Option("--image-size", help="WxH[:weight] or 4k/1080p/720p/360p/12mp; comma-separated or repeated (default 1024x1024).")] = None,
    images_per_request: Annotated[int, typer.Option(help="Images per request (random dataset).")] = 1,
    image_format: Annotated[str, typer.Option(help="jpeg or png.")] = "jpeg",
    image_pool: Annotated[int | None, typer.Option(help="Reuse N distinct images (cache hits); default: every image unique.")] = None,
    unique_images: Annotated[bool, typer.Option("--unique-images", help="Every image unique (the default).")] = False,
    transport: Annotated[str, typer.Option(help="data (base64 data URLs) or http (URLs served by the bench).")] = "data",
    image_host: Annotated[str, typer.Option(help="Address the bench's image server binds and puts in URLs (http transport).")] = "127.0.0.1",
    prompt: Annotated[str, typer.Option(help="Question asked about the images (random dataset).")] = "Describe the image in one sentence.",
    prompt_words: Annotated[int, typer.Option(help="Random filler words before the question.")] = 0,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per request.")] = 64,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Generate max_tokens exactly (vLLM extension; vlmlab supports it).")] = False,
    temperature: Annotated[float, typer.Option()] = 0.0,
    request_rate: Annotated[float, typer.Option(help="Requests per second (inf: all at once).")] = float("inf"),
    burstiness: Annotated[float, typer.Option(help="Gamma shape of arrivals: 1 Poisson, <1 burstier.")] = 1.0,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests in flight at most.")] = None,
    concurrency: Annotated[str | None, typer.Option(help="Sweep of concurrency caps, e.g. 1,4,16.")] = None,
    num_requests: Annotated[int | None, typer.Option(help="Requests per level (default 100).")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds per level instead of --num-requests.")] = None,
    warmups: Annotated[int, typer.Option("--warmups", "--num-warmups", help="Unmeasured requests before each level.")] = 1,
    seed: Annotated[int, typer.Option(help="Images, prompts and arrivals; vary it between runs on one server.")] = 0,
    request_timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 600.0,
    slo: Annotated[str | None, typer.Option(help="Goodput SLOs in ms, e.g. ttft=500,tpot=50,e2el=2000.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Result JSON path.")] = None,
    plots: Annotated[str | None, typer.Option(help="Plot directory (default: next to --output).")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Draw no plots.")] = False,
    no_metrics: Annotated[bool, typer.Option("--no-metrics", help="Do not scrape the server's /metrics.")] = False,
) -> None:
    """Measure a server with image workloads: TTFT, TPOT, ITL, E2EL, throughput, goodput, cache hits."""
    from vlmlab.bench import run_bench
    from vlmlab.bench.config import bench_config
    from vlmlab.bench.report import summary_table

    config = bench_config(
        image_size=image_size, max_concurrency=max_concurrency, concurrency=concurrency,
        image_pool=image_pool, unique_images=unique_images, slo=slo,
        base_url=base_url, model=model, api_key=api_key, endpoint=endpoint, serve_args=tuple(serve_arg or ()),
        dataset=dataset, images_per_request=images_per_request, image_format=image_format.lower(),
        transport=transport, image_host=image_host, prompt=prompt, prompt_words=prompt_words,
        max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=temperature, request_rate=request_rate,
        burstiness=burstiness, num_requests=num_requests, duration_s=duration, warmups=warmups, seed=seed,
        request_timeout_s=request_timeout, output=output, plots=plots, make_plots=not no_plots,
        scrape_metrics=not no_metrics,
    )  # fmt: skip
    result = run_bench(config)
    console.print(summary_table(result))
    for run in result["runs"]:
        for message in run["summary"]["errors"] + run["summary"]["warnings"]:
            err_console.print(f"[yellow]{run['label']}:[/yellow] {message}", highlight=False)
    for path in ([output] if output else []) + result["plots"]:
        console.print(f"[dim]wrote {path}[/dim]")


@app.command("report")
def report_command(
    output_dir: Annotated[Path, typer.Argument(help="A folder written by vlmlab eval.")],
    html: Annotated[bool, typer.Option("--html", help="Also write report.html with plots.")] = False,
    metric_mode: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Models x datasets with bootstrap CIs, per category, paired comparisons, disagreements."""
    from vlmlab.eval.report import write_report

    report, page = write_report(output_dir, metric_mode, html)
    table = Table(title="vlmlab report (95% bootstrap CI)")
    for column in ("model", "dataset", "n", "score %", "95% CI"):
        table.add_column(column)
    for row in report["table"]:
        table.add_row(row["model"], row["dataset"], str(row["n"]), f"{100 * row['score']:.1f}", f"{100 * row['ci95'][0]:.1f} – {100 * row['ci95'][1]:.1f}")
    console.print(table)
    for p in report["paired"]:
        console.print(f"{p['dataset']}: {p['b']} − {p['a']} = {100 * p['mean_diff']:+.1f} points on {p['items']} shared items (95% CI {100 * p['ci95'][0]:+.1f} … {100 * p['ci95'][1]:+.1f})")
    console.print(f"written: {output_dir}/report.json" + (f", {page}" if page else ""))


@app.command()
def recommend(
    max_params: Annotated[float | None, typer.Option(help="Largest model, in billions of parameters.")] = None,
    gpu_mem: Annotated[str | None, typer.Option(help="GPU memory to fit, e.g. 24GiB.")] = None,
    multi_image: Annotated[bool, typer.Option("--multi-image", help="Needs several images per prompt.")] = False,
    ocr: Annotated[bool, typer.Option("--ocr", help="Rank by document/OCR benchmarks.")] = False,
    image: Annotated[str, typer.Option(help="Typical image size for memory planning.")] = "1024x768",
    dtype: Annotated[str, typer.Option(help="Weight dtype: bf16, fp8, int8, int4.")] = "bf16",
    results: Annotated[Path | None, typer.Option(help="Folder with vlmlab eval / bench JSON results.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rank known checkpoints by your requirements and by published or measured results."""
    from vlmlab.recommend import parse_requirements, ranked, read_results
    from vlmlab.recommend import recommend as rank

    picks = rank(parse_requirements(max_params, gpu_mem, multi_image, ocr, image, dtype), read_results(results) if results else None)
    rows = ranked(picks)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="vlmlab recommend")
    for column in ("#", "checkpoint", "params", "score", "why"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["rank"] or "-"), row["checkpoint"], f"{row['params_b']:.1f}B",
            "-" if row["score"] is None else f"{row['score']:.1f}", row["why"],
            style=None if row["rank"] else "dim",
        )  # fmt: skip
    console.print(table)


nano_app = typer.Typer(help="The embedded nano model: train it, evaluate it.", no_args_is_help=True)
app.add_typer(nano_app, name="nano")


@nano_app.command("eval")
def nano_eval(
    n: Annotated[int, typer.Option("--n", help="Held-out samples (spread over the task types).")] = 500,
    seed: Annotated[int, typer.Option(help="Eval seed (held out from training).")] = 1,
    model_dir: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: packaged).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {\"accuracy\": {...}}.")] = False,
) -> None:
    """Exact-match accuracy per task type on freshly generated samples."""
    from vlmlab.nano.evaluate import evaluate

    accuracy = evaluate(model_dir, n=n, seed=seed)
    if as_json:
        typer.echo(json.dumps({"accuracy": accuracy, "n": n, "seed": seed}))
        return
    table = Table(title=f"nano held-out exact match (n={n}, seed={seed})")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    for task, value in accuracy.items():
        table.add_row(task, f"{value:.3f}")
    console.print(table)


@nano_app.command("train")
def nano_train(
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, metrics, best/ (resumes from it).")],
    minutes: Annotated[float | None, typer.Option(help="Training-time budget in minutes.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer-step budget.")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    lr: Annotated[float, typer.Option()] = 3e-4,
    seed: Annotated[int, typer.Option()] = 0,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations.")] = 500,
    eval_n: Annotated[int, typer.Option(help="Held-out samples per evaluation.")] = 300,
    checkpoint_minutes: Annotated[float, typer.Option()] = 5.0,
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 2,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    export: Annotated[Path | None, typer.Option(help="Write the final HF checkpoint here.")] = None,
) -> None:
    """Train the nano model on the synthetic tasks (resumable; runs on CPU or a CUDA GPU)."""
    from vlmlab.nano.train import TrainConfig, flush_denormals, train

    flush_denormals()
    accuracy = train(
        TrainConfig(
            out=str(out), minutes=minutes, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            eval_every=eval_every, eval_n=eval_n, checkpoint_minutes=checkpoint_minutes,
            threads=threads, device=device, export=str(export) if export else None,
        )
    )  # fmt: skip
    typer.echo(json.dumps({"accuracy": accuracy}))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv)
    except VlmlabError as exc:
        from rich.markup import escape  # messages name extras like 'vlmlab[vllm]'

        err_console.print(f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
