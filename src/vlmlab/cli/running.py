"""``vlmlab chat``, ``serve``, ``test-model`` and ``nano``: running models."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vlmlab.cli import (
    FAMILY_HELP,
    GGUF_FILE_HELP,
    MMPROJ_HELP,
    QUANTIZATION_HELP,
    THREADS_HELP,
    app,
    console,
    err_console,
    gguf_extra,
    parse_options,
    remote_extra,
    with_quantization,
)
from vlmlab.protocol.errors import ConfigError


@app.command()
def chat(
    question: Annotated[str, typer.Argument(help="The question about the image(s).")],
    image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image path or URL. Repeatable.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="nano, a family preset, a hub id or a path.")] = "nano",
    engine: Annotated[str, typer.Option(help="Backend: hf, llamacpp (GGUF), vllm (NVIDIA GPU), mlx (Apple Silicon), mistral (mistral-inference) or remote (an OpenAI-compatible server).")] = "hf",
    mmproj: Annotated[str | None, typer.Option(help=MMPROJ_HELP)] = None,
    gguf_file: Annotated[str | None, typer.Option(help=GGUF_FILE_HELP)] = None,
    family: Annotated[str | None, typer.Option(help=FAMILY_HELP)] = None,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
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
    json_schema: Annotated[Path | None, typer.Option("--json-schema", help="Answer as JSON matching this JSON Schema file (enforced token by token).")] = None,
    json_object: Annotated[bool, typer.Option("--json", help="Answer as a JSON object.")] = False,
    regex: Annotated[str | None, typer.Option(help="Answer matching this regular expression.")] = None,
    choice: Annotated[str | None, typer.Option(help="Answer with one of these comma-separated strings, e.g. red,green,blue.")] = None,
) -> None:
    """Ask one question about one or more images; prints the answer and a speed line."""
    from vlmlab.chat import detail_line, nano_hint, run_chat, speed_line, structured_output
    from vlmlab.config import EngineSpec
    from vlmlab.protocol.core import SamplingParams
    from vlmlab.protocol.errors import BadRequestError, ConfigError

    spec = EngineSpec(
        model=model,
        engine=engine,
        device=device,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
        trust_remote_code=trust_remote_code,
        processor_options=parse_options(opt),
        extra=with_quantization(
            gguf_extra(remote_extra(base_url, remote_api_key), mmproj=mmproj, gguf_file=gguf_file, family=family, n_threads=threads) or {},
            quantization, load_in_4bit, load_in_8bit,
        ),
    )
    if engine.strip().lower() == "vllm":
        # vLLM's offline LLM.chat: one batch, and vLLM prints its own progress / speed line.
        spec = dataclasses.replace(spec, extra={"offline": True, **spec.extra})
    structured = structured_output(json_schema, json_object, regex, choice)  # a bad file fails before the model loads
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, structured=structured)

    def on_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    hint = nano_hint(model, question, len(image or []))
    if hint:
        err_console.print(hint, style="yellow", highlight=False)
    try:
        outcome = run_chat(spec, question, image or [], sampling, on_text if stream else None, system)
    except BadRequestError as exc:
        if structured is None or exc.param != "response_format":
            raise  # --regex / --choice errors name their flag already
        # Name the flag, not the wire field the engine saw ("response_format.json_schema.schema").
        reason = exc.message.removeprefix("response_format.json_schema.schema").removeprefix("response_format").lstrip(": ")
        flag = f"--json-schema {json_schema}" if json_schema else "--json"
        raise ConfigError(f"{flag}: {reason}") from exc
    if not stream:
        sys.stdout.write(outcome.result.text)
    sys.stdout.write("\n")
    if structured is not None and outcome.result.finish_reason == "length":
        err_console.print(
            f"note: the answer reached --max-tokens {max_tokens} before the constraint was complete "
            "(the JSON may be cut off); raise --max-tokens", style="yellow", highlight=False,
        )  # fmt: skip
    err_console.print(speed_line(outcome.result, outcome.wall_s), highlight=False)
    err_console.print(detail_line(outcome), style="dim", highlight=False)


@app.command()
def serve(
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="nano, a family preset, hub id or path; repeat it to serve several models (URL#model: one on another server), picked by each request's model field.")] = None,
    engine: Annotated[str | None, typer.Option(help="Engine or fallback chain, e.g. vllm,hf (hf, llamacpp, vllm, mlx, mistral, remote).")] = None,
    mmproj: Annotated[str | None, typer.Option(help=MMPROJ_HELP)] = None,
    gguf_file: Annotated[str | None, typer.Option(help=GGUF_FILE_HELP)] = None,
    family: Annotated[str | None, typer.Option(help=FAMILY_HELP)] = None,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    config: Annotated[str | None, typer.Option(help="YAML/JSON config file or preset name.")] = None,
    base_url: Annotated[str | None, typer.Option(help="remote engine: upstream URL, e.g. http://host:8000/v1.")] = None,
    remote_api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_REMOTE_API_KEY", help="remote engine: upstream API key.")] = None,
    quantization: Annotated[str | None, typer.Option(help=QUANTIZATION_HELP)] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="hf on CUDA: bitsandbytes NF4 (= --quantization bnb-4bit).")] = False,
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="hf on CUDA: bitsandbytes LLM.int8() (= --quantization bnb-8bit).")] = False,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    auth_stats: Annotated[bool | None, typer.Option("--auth-stats/--no-auth-stats", help="/stats and /metrics need the API key too.")] = None,
    max_request_bytes: Annotated[str | None, typer.Option(help="Largest request body, e.g. 128MiB (413 over it).")] = None,
    allowed_local_media_path: Annotated[str | None, typer.Option(help="Directory file:// images may come from.")] = None,
    allowed_media_domains: Annotated[str | None, typer.Option(help="Comma-separated http(s) host allow-list.")] = None,
    trusted_media_hosts: Annotated[str | None, typer.Option(help="Comma-separated hosts exempt from the private-address guard (e.g. a local image server).")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients send.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or fp32.")] = None,
    trust_remote_code: Annotated[bool | None, typer.Option("--trust-remote-code/--no-trust-remote-code")] = None,
    max_model_len: Annotated[int | None, typer.Option()] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Requests decoded together.")] = None,
    data_parallel_size: Annotated[str | None, typer.Option("--data-parallel-size", "-dp", help="Copies of the model decoding side by side (hf: each in its own process; llamacpp: contexts on threads of their own), or auto (the default): from the weights' size, the device and the cores; the start-up line says what it chose and why.")] = None,
    max_images: Annotated[int | None, typer.Option(help="Images per request.")] = None,
    max_image_bytes: Annotated[str | None, typer.Option(help="Per-image byte cap, e.g. 20MiB.")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(
        help="Per-image pixel cap (default: 4x the family's largest canvas, at least 4096x4096; "
        "JPEGs over it are decoded at 1/2-1/8 scale).")] = None,
    image_memory_budget: Annotated[str | None, typer.Option(
        help="Memory for the decoded images of all requests in flight, e.g. 2GiB (default); "
        "a request needing more gets 413, one that does not fit now 429.")] = None,
    fetch_workers: Annotated[int | None, typer.Option(
        help="Threads downloading image URLs (default 32).")] = None,
    fetch_per_host: Annotated[int | None, typer.Option(
        help="Image downloads at once from one host (default 8).")] = None,
    http_header_timeout: Annotated[float | None, typer.Option(
        help="Seconds a client has to send a request's headers (default 10).")] = None,
    http_body_timeout: Annotated[float | None, typer.Option(
        help="Seconds a client has to send a request's body (default 60).")] = None,
    http_max_header_bytes: Annotated[str | None, typer.Option(
        help="Largest request line + headers, e.g. 32KiB (default; 431 over it).")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests in the engine at once.")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Requests waiting beyond that (then 429).")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds per request (then 504).")] = None,
    preprocess_cache: Annotated[str | None, typer.Option(help="Preprocessing cache size, e.g. 256MiB; 0 = off.")] = None,
    response_cache: Annotated[int | None, typer.Option(help="Response cache entries; 0 = off.")] = None,
    response_cache_bytes: Annotated[str | None, typer.Option(help="Response cache size, e.g. 64MiB.")] = None,
    preprocess_mode: Annotated[str | None, typer.Option(help="exact (default) or fast image preprocessing.")] = None,
    preprocess_workers: Annotated[int | None, typer.Option(help="Processes for large images (default: cores; 0 = off).")] = None,
    opt: Annotated[list[str] | None, typer.Option("--opt", help="Processor default NAME=VALUE.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
    ray: Annotated[bool, typer.Option("--ray", help="Serve replicas of the model on a Ray cluster behind this endpoint (pip install 'vlmlab[ray]'); config: ray: {...}.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="--ray: the cluster, auto or ray://host:10001 (default: start a local one).")] = None,
    replicas: Annotated[int | None, typer.Option(help="--ray: copies of the model (default 2), each with its own caches.")] = None,
    ray_router: Annotated[str | None, typer.Option(help="--ray: affinity (default; a seen image goes to the replica holding it) or default (Ray's power of two).")] = None,
    replica_cpus: Annotated[float | None, typer.Option(help="--ray: CPUs one replica reserves (default 1; also its torch threads).")] = None,
    replica_gpus: Annotated[float | None, typer.Option(help="--ray: GPUs one replica reserves (e.g. 1: a GPU each).")] = None,
) -> None:
    """Serve a model behind the OpenAI chat-completions API (default: nano on 127.0.0.1:8000)."""
    import uvicorn

    from vlmlab.config import read_config_file, server_settings

    file_settings = read_config_file(config) if config else None
    first, *more = model or [None]
    if data_parallel_size is None and "data_parallel_size" not in (file_settings or {}):
        data_parallel_size = "auto"
    settings = server_settings(
        file_settings,
        extra=gguf_extra(
            remote_extra(base_url, remote_api_key, (file_settings or {}).get("extra")), (file_settings or {}).get("extra"),
            mmproj=mmproj, gguf_file=gguf_file, family=family, n_threads=threads,
        ),
        model=first, models=more or None, engine=engine, host=host, port=port, api_key=api_key,
        allowed_local_media_path=allowed_local_media_path, allowed_media_domains=allowed_media_domains,
        trusted_media_hosts=trusted_media_hosts,
        served_model_name=served_model_name, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, max_model_len=max_model_len,
        max_batch_size=max_batch_size, data_parallel_size=data_parallel_size, max_images=max_images, max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, max_concurrency=max_concurrency, max_queue=max_queue,
        request_timeout_s=request_timeout, preprocess_cache_bytes=preprocess_cache,
        response_cache_entries=response_cache, response_cache_bytes=response_cache_bytes, processor_options=parse_options(opt) or None,
        preprocess_mode=preprocess_mode, preprocess_workers=preprocess_workers,
        auth_stats=auth_stats, max_request_bytes=max_request_bytes,
        image_memory_budget=image_memory_budget, fetch_workers=fetch_workers,
        fetch_per_host=fetch_per_host,
        http_header_timeout_s=http_header_timeout, http_body_timeout_s=http_body_timeout,
        http_max_header_bytes=http_max_header_bytes,
    )  # fmt: skip
    settings = with_ray(
        settings, ray, address=ray_address, replicas=replicas, router=ray_router, num_cpus=replica_cpus, num_gpus=replica_gpus
    )
    chosen = with_quantization({}, quantization, load_in_4bit, load_in_8bit)
    if chosen:  # every engine of the chain, whatever extra each one has from the config file
        engines = tuple(dataclasses.replace(s, extra={**s.extra, **chosen}) for s in settings.engines)
        settings = dataclasses.replace(settings, engines=engines)
    logging.getLogger("vlmlab").setLevel(log_level.upper())
    # Take the port before loading anything: a busy port fails in a second, not after the model
    # load, and the socket handed to uvicorn leaves no window for another process to take it.
    sock = _listening_socket(settings.host, settings.port)
    host_shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host_shown}:{sock.getsockname()[1]}/v1"
    port_taken = sock.getsockname()[1]
    names = ", ".join(m.model_name for m in settings.each_model())
    from vlmlab.server.http_limits import uvicorn_options

    if settings.ray:
        app = ray_front(settings, sock, names, url, ray_app_name(port_taken))
        if app is None:
            return
    else:
        console.print(f"[bold]vlmlab serve[/bold] loading {names}, to serve on {url} once loaded")
        app = local_app(settings, sock)
        if app is None:
            return
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level.lower(),
        **uvicorn_options(settings),  # header/body deadlines and the header-size limit
    )  # fmt: skip

    class AnnouncingServer(uvicorn.Server):
        """Prints the URL once uvicorn serves it (it logs none for sockets passed in)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                console.print(f"[bold]vlmlab serve[/bold] {names} on {url}")

    server = AnnouncingServer(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # a quiet stop, as uvicorn.run's
        return
    finally:
        sock.close()
        if settings.ray:
            from vlmlab.server.ray_serve import stop

            stop(ray_app_name(port_taken))
    if not server.started:  # uvicorn logged why (what uvicorn.run does)
        raise typer.Exit(3)


def with_ray(settings: Any, on: bool, **flags: Any) -> Any:
    """``settings`` with the ``--ray`` flags over the config file's ``ray:`` section (the
    flags without ``--ray`` or a ``ray:`` section are a mistake worth naming)."""
    from vlmlab.config import RaySettings

    given = {k: v for k, v in flags.items() if v is not None}
    if given and not (on or settings.ray):
        flag = {"address": "ray-address", "router": "ray-router", "num_cpus": "replica-cpus", "num_gpus": "replica-gpus"}
        named = ", ".join("--" + flag.get(k, k) for k in given)
        verb = "need" if len(given) > 1 else "needs"
        raise ConfigError(f"{named} {verb} --ray: add --ray to serve replicas on a Ray cluster")
    if not (on or settings.ray):
        return settings
    base = dataclasses.asdict(settings.ray) if settings.ray else {}
    return dataclasses.replace(settings, ray=RaySettings(**{**base, **given}))


def ray_front(settings: Any, sock: socket.socket, names: str, url: str, app_name: str) -> Any:
    """Deploy the replicas on Ray and return the front's app (``None``: stopped while loading)."""
    from vlmlab.server.ray_serve import front_app, start, stop

    where = settings.ray.address or "a local Ray cluster"
    count = settings.ray.replicas
    copies = f"{settings.ray.min_replicas}-{settings.ray.max_replicas} replicas" if settings.ray.max_replicas else f"{count} replica{'s' * (count != 1)}"
    console.print(f"[bold]vlmlab serve[/bold] starting {copies} of {names} on {where}, to serve on {url} once loaded")
    try:
        from vlmlab.engines import check_model

        for model in settings.each_model():
            if len(model.engines) == 1:
                check_model(model.engines[0])
        front = start(settings, app_name)
    except KeyboardInterrupt:
        sock.close()
        stop(app_name)
        return None
    except BaseException:
        sock.close()
        stop(app_name)
        raise
    return front_app(front, settings)


def ray_app_name(port: int) -> str:
    """The Ray Serve application of the ``serve --ray`` on this port (one cluster can hold several)."""
    return f"vlmlab-{port}"


def local_app(settings: Any, sock: socket.socket) -> Any:
    """Load the engines in this process and return the app (``None``: stopped while loading)."""
    from vlmlab.server import create_app
    from vlmlab.server.engines import EngineChain

    # The engines load here, not in the app's lifespan: a model that cannot load ends in one
    # line (vlmlab.cli.main), not in a start-up traceback from starlette and uvicorn.
    chains = [EngineChain(m.engines, m.engine_failures_before_fallback) for m in settings.each_model()]
    try:
        from vlmlab.engines import check_model

        for chain in chains:  # every model is there before the first one loads
            if len(chain.specs) == 1:
                check_model(chain.specs[0])
        for chain in chains:
            chain.start()
            copies_line(chain.current())
    except KeyboardInterrupt:  # Ctrl-C while a model loads: a quiet stop
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return create_app(settings, chains[0], chains[1:])


def copies_line(engine: Any) -> None:
    """One line on how many copies of the model run and why (``--data-parallel-size``)."""
    info = engine.info()
    details = info.details or {}
    copies = details.get("data_parallel_size")
    reason = details.get("copies_reason")
    if copies and reason:
        threads = details.get("threads_per_copy", details.get("torch_threads"))
        each = f", {threads} thread{'s' if threads != 1 else ''} each" if threads else ""
        console.print(f"[bold]vlmlab serve[/bold] {info.model} ({info.engine}): {copies} cop{'ies' if copies != 1 else 'y'}{each}: {reason}", highlight=False)


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, as uvicorn would open it; a port that
    cannot be bound exits with one line naming it and the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart past TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog; requests made while loading wait here
    except OSError as e:
        sock.close()
        reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        err_console.print(
            f"vlmlab serve: port {port} on {host} {reason}; pass --port N for another port "
            "or stop the process using it",
            highlight=False,
        )
        raise typer.Exit(1) from None
    return sock


@app.command("test-model")
def test_model_command(
    model: Annotated[str, typer.Argument(help="nano, a family preset, a hub id or a path.")] = "nano",
    engine: Annotated[str, typer.Option(help="Backend: hf, llamacpp, vllm, mlx, mistral or remote.")] = "hf",
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


nano_app = typer.Typer(help="The embedded nano model: train it, evaluate it, export it as GGUF.", no_args_is_help=True)
app.add_typer(nano_app, name="nano")


@nano_app.command("export-gguf")
def nano_export_gguf(
    out: Annotated[Path, typer.Argument(help="Folder for vlmlab-nano.gguf and mmproj-vlmlab-nano.gguf.")],
    outtype: Annotated[str, typer.Option(help="Weight type: f16 (default), f32, bf16 or q8_0.")] = "f16",
    model_dir: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: packaged).")] = None,
    llama_cpp: Annotated[Path | None, typer.Option("--llama-cpp", envvar="VLMLAB_LLAMA_CPP", help="A llama.cpp checkout whose convert_hf_to_gguf.py to run (default: the one in llama-cpp-python's source, downloaded once).")] = None,
) -> None:
    """Convert nano to GGUF with llama.cpp's own converter, for --engine llamacpp (or llama.cpp, Ollama, LM Studio)."""
    from vlmlab.engines.llamacpp.convert import export_gguf
    from vlmlab.nano import checkpoint_path

    files = export_gguf(model_dir or checkpoint_path(), out, name="vlmlab-nano", outtype=outtype, llama_cpp=llama_cpp)
    for path in (files.model, files.mmproj):
        console.print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB" if path else "")
    console.print(
        f"try: vlmlab chat --engine llamacpp --model {files.model} --mmproj {files.mmproj} "
        "--image red_square.png \"What colour is the shape?\"", highlight=False, soft_wrap=True,
    )  # fmt: skip


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
    tasks: Annotated[str | None, typer.Option(help="Comma-separated task mix; repeat a task to weight it.")] = None,
    arch: Annotated[str, typer.Option(help="Model sizes of a new run, e.g. vision_layers=4.")] = "",
    grow_from: Annotated[Path | None, typer.Option(help="Start a new run from this checkpoint, vision tower deepened to --arch vision_layers.")] = None,
    data_workers: Annotated[int, typer.Option(help="Processes building batches ahead (for a GPU run).")] = 0,
) -> None:
    """Train the nano model on the synthetic tasks (resumable; runs on CPU or a CUDA GPU)."""
    from vlmlab.nano.train import DEFAULT_MIX, TrainConfig, flush_denormals, parse_arch, train

    flush_denormals()
    accuracy = train(
        TrainConfig(
            out=str(out), minutes=minutes, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            eval_every=eval_every, eval_n=eval_n, checkpoint_minutes=checkpoint_minutes,
            threads=threads, device=device, export=str(export) if export else None,
            tasks=tuple(t.strip() for t in tasks.split(",")) if tasks else DEFAULT_MIX,
            arch=parse_arch(arch), grow_from=str(grow_from) if grow_from else None, data_workers=data_workers,
        )
    )  # fmt: skip
    typer.echo(json.dumps({"accuracy": accuracy}))
