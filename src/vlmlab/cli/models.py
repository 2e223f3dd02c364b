"""``vlmlab plan``, ``families``, ``recommend``: choosing and sizing models before loading one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vlmlab.cli import (
    app,
    console,
    image_sizes,
    parse_options,
)


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
def families(as_json: Annotated[bool, typer.Option("--json", help="Print the families as JSON, for tooling.")] = False) -> None:
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
