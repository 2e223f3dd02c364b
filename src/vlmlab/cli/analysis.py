"""``vlmlab eval``, ``score``, ``report``, ``compare``, ``sweep``, ``bench``: measuring models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vlmlab.cli import (
    app,
    console,
    err_console,
)
from vlmlab.eval.datasets import DATASETS
from vlmlab.protocol.errors import ConfigError


@app.command("eval")
def eval_command(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model(s): nano, preset, hub id, path. Repeatable or comma-separated.")],
    dataset: Annotated[list[str], typer.Option("--dataset", "-d", help=f"Dataset key(s): {', '.join(DATASETS.names())}.")],
    output_dir: Annotated[Path, typer.Option(help="Results folder (resumes what is already there).")] = Path("outputs/vlm_results"),
    engine: Annotated[str, typer.Option(help="hf, llamacpp (a GGUF file, or a folder with one model GGUF and its mmproj), vllm, mlx, mistral or remote.")] = "hf",
    base_url: Annotated[str | None, typer.Option(help="For --engine remote.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="VLMLAB_REMOTE_API_KEY")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests the engine decodes together.")] = 8,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight (default 2 x batch size, per copy).")] = None,
    data_parallel_size: Annotated[str, typer.Option("--data-parallel-size", "-dp", help="Copies of the model answering side by side, or auto (default): as vlmlab serve chooses them.")] = "auto",
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
    response_format: Annotated[str | None, typer.Option(help="text (default) or json: each answer is an enforced {\"answer\": ...} (option letters, Yes/No or a short string, by dataset) and is scored as it is.")] = None,
    answer_schema: Annotated[list[str] | None, typer.Option("--answer-schema", help="Your own answer JSON Schema (with an \"answer\" property), FILE or DATASET=FILE; implies --response-format json. Repeatable.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Spread the samples over Ray actors that each hold the model (pip install 'vlmlab[ray]').")] = False,
    ray_address: Annotated[str | None, typer.Option(help="--ray: the cluster, auto or ray://host:10001 (default: a local one).")] = None,
    workers: Annotated[int, typer.Option(help="--ray: model copies (Ray actors), one CPU each.")] = 2,
) -> None:
    """Score models on benchmarks; crash-safe (one JSON line per sample) and resumable."""
    from vlmlab.config import parse_data_parallel_size
    from vlmlab.eval.answer_format import read_answer_schemas
    from vlmlab.eval.runner import EvalConfig, run_eval
    from vlmlab.eval.scoring import markdown_table

    def split(values: list[str]) -> tuple[str, ...]:
        return tuple(v.strip() for item in values for v in item.split(",") if v.strip())

    schemas = read_answer_schemas(answer_schema or [])

    config = EvalConfig(
        models=split(model), datasets=split(dataset), output_dir=output_dir, engine=engine,
        base_url=base_url, api_key=api_key, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, batch_size=batch_size, concurrency=concurrency,
        data_parallel_size=parse_data_parallel_size(data_parallel_size),
        limit=limit, max_tokens=max_tokens, seed=seed, prompt_profile=prompt_profile,
        metric_mode=metric_mode, data_dir=data_dir, progress=progress,
        judge_url=judge_url, judge_model=judge_model, judge_api_key=judge_api_key,
        response_format=(response_format or ("json" if schemas else "text")).strip().lower(), answer_schemas=schemas,
        ray=ray, ray_address=ray_address, workers=workers,
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
    from vlmlab.eval.runner import EvalConfig, overview_paths, rescore
    from vlmlab.eval.scoring import markdown_table

    judge = EvalConfig((), (), output_dir, judge_url=judge_url, judge_model=judge_model, judge_api_key=judge_api_key).judge()
    summaries = rescore(output_dir, metric_mode, judge)
    modes = sorted({str(s.get("metric_mode")) for s in summaries})
    console.print(f"metric mode: {', '.join(modes)}" + ("" if metric_mode else " (each dataset's default)"))
    console.print(markdown_table(summaries))
    written = ", ".join(str(p) for p in overview_paths(output_dir, metric_mode))
    console.print(f"written: {written}" + ("" if metric_mode is None else "; the run's own summary.json is kept"))


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
def compare(
    models: Annotated[str, typer.Option(help="Comma-separated: nano, presets, hub ids, paths, URL#model. A model given twice is labelled nano, nano#2.")],
    image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image for --question. Repeatable.")] = None,
    question: Annotated[str | None, typer.Option(help="One question about the --image(s).")] = None,
    questions_file: Annotated[Path | None, typer.Option(help="JSONL: images, question, expected.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Take questions (and answers) from a dataset, e.g. synth.")] = None,
    limit: Annotated[int, typer.Option(help="Questions from --dataset.")] = 20,
    max_tokens: Annotated[int, typer.Option()] = 64,
    output_dir: Annotated[Path, typer.Option(help="Where answers.json and report.html go.")] = Path("compare-out"),
    device: Annotated[str, typer.Option()] = "auto",
    ray: Annotated[bool, typer.Option("--ray", help="Each model on a Ray worker of its own, all at once (pip install 'vlmlab[ray]').")] = False,
    ray_address: Annotated[str | None, typer.Option(help="--ray: the cluster, auto or ray://host:10001 (default: a new local one).")] = None,
    worker_gpus: Annotated[float, typer.Option(help="--ray: GPUs each worker reserves.")] = 0.0,
) -> None:
    """Same questions, several models: answers, latency, TTFT, image tokens, memory side by side."""
    from vlmlab.compare import load_questions, run_compare, summarize, write_outputs

    questions = load_questions(image or [], question, questions_file, dataset, limit)
    jobs = ray_jobs(ray, ray_address, worker_gpus)
    answers = run_compare([m for m in models.split(",") if m.strip()], questions, max_tokens, ray=jobs, device=device)
    path = write_outputs(answers, questions, output_dir, "vlmlab compare")
    _print_summary(summarize(answers), "model")
    console.print(f"report: {path}")


@app.command()
def sweep(
    model: Annotated[str, typer.Option("--model", "-m", help="nano, a family preset, a hub id or a path.")] = "nano",
    image: Annotated[list[str] | None, typer.Option("--image", "-i", help="Image path or URL for --question(s). Repeatable.")] = None,
    question: Annotated[str | None, typer.Option(help="One question about the --image(s).")] = None,
    questions_file: Annotated[Path | None, typer.Option(help="JSONL: images, question, expected.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Questions with answers for accuracy, e.g. synth.")] = None,
    limit: Annotated[int, typer.Option(help="Questions of --dataset to use.")] = 20,
    resolutions: Annotated[str | None, typer.Option(help="Longest sides, e.g. 224,336,512,1024.")] = None,
    images_per_prompt: Annotated[str | None, typer.Option(help="Image counts, e.g. 1,2,3.")] = None,
    max_tokens: Annotated[int, typer.Option()] = 64,
    output_dir: Annotated[Path, typer.Option()] = Path("sweep-out"),
    device: Annotated[str, typer.Option()] = "auto",
    ray: Annotated[bool, typer.Option("--ray", help="Each level (each loading the model) on a Ray worker of its own, all at once (pip install 'vlmlab[ray]').")] = False,
    ray_address: Annotated[str | None, typer.Option(help="--ray: the cluster, auto or ray://host:10001 (default: a new local one).")] = None,
    worker_gpus: Annotated[float, typer.Option(help="--ray: GPUs each worker reserves.")] = 0.0,
) -> None:
    """How resolution (or the number of images) changes answers, accuracy, tokens and latency."""
    from vlmlab.compare import load_questions, run_sweep, summarize, sweep_key, write_outputs

    def ints(text: str | None) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()] if text else []
        except ValueError:
            raise ConfigError(f"expected comma-separated integers, got {text!r}") from None

    sides, counts = ints(resolutions), ints(images_per_prompt)
    if not sides and not counts:
        raise ConfigError("give --resolutions 224,336,512 and/or --images-per-prompt 1,2,3")
    questions = load_questions(image or [], question, questions_file, dataset, limit)
    answers = run_sweep(model, questions, sides, counts, max_tokens, ray=ray_jobs(ray, ray_address, worker_gpus), device=device)
    by = sweep_key(sides, counts)
    path = write_outputs(answers, questions, output_dir, f"vlmlab sweep: {model}", by=by)
    _print_summary(summarize(answers, by), by)
    console.print(f"report: {path}")


def ray_jobs(on: bool, address: str | None, gpus: float) -> Any:
    """The ``--ray`` flags of compare and sweep (``None`` without ``--ray``)."""
    from vlmlab.compare import RayJobs

    if not on:
        if address is not None or gpus:
            raise ConfigError("--ray-address and --worker-gpus need --ray: add --ray to run on a Ray cluster")
        return None
    return RayJobs(address, gpus=gpus)


def _print_summary(rows: list[dict[str, Any]], key: str) -> None:
    from vlmlab.compare import summary_cells

    headers, cells = summary_cells(rows, key)
    table = Table()
    for index, column in enumerate(headers):
        table.add_column(column, justify="right" if index else "left")
    for row in cells:
        table.add_row(*row)
    console.print(table)


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
    from vlmlab.bench.progress import ProgressDisplay
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
    # Progress on stderr (live bars on a terminal, a line per finished run in logs), so stdout
    # carries only the result table.
    with ProgressDisplay(err_console) as show_progress:
        result = run_bench(config, on_progress=show_progress)
    console.print(summary_table(result))
    for run in result["runs"]:
        for message in run["summary"]["errors"] + run["summary"]["warnings"]:
            err_console.print(f"[yellow]{run['label']}:[/yellow] {message}", highlight=False)
    for path in ([output] if output else []) + result["plots"]:
        console.print(f"[dim]wrote {path}[/dim]")
