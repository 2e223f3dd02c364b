"""`vlmlab eval` as fast as `vlmlab serve`? The same synth samples answered both ways, one run.

1. **eval**: `vlmlab eval --model nano --dataset synth --limit N` in a fresh output folder for each
   `--batch-size` in `--batch-sizes`, everything else default (`--data-parallel-size auto`, as
   serve). Its rate is `summary.json`'s `run.samples_per_second` (answered / wall time of the
   answering, model load excluded); the dataset's images are drawn inside that time, as a user's
   eval pays for them.
2. **serve**: `vlmlab serve --model nano` with default settings but both caches off
   (`--response-cache 0 --preprocess-cache 0`: the rounds send the same images again, which eval
   never does), the same N samples as PNG data URLs (encoded before the clock starts), the same
   6-token greedy answers, not streamed, `--concurrency` (16) at a time: requests / wall time.

Rounds alternate eval and serve; the printed figures are medians. The goal (issue 22): eval at its
best batch size >= 0.9x the server's req/s at 16 concurrent.

    .venv/bin/python benchmarks/eval_vs_serve.py [--samples 200] [--rounds 3] [--batch-sizes 8,16,32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from served import free_port, start_server

from vlmlab.eval.datasets.synth import generate


def requests_for(n: int) -> list[dict]:
    """The first ``n`` synth samples as chat requests: images first, then the question (the
    synth prompt), greedy, 6 tokens (the dataset's budget)."""
    out = []
    for row in generate(n):
        parts = []
        for image in row["images"]:
            buf = io.BytesIO()
            image.convert("RGB").save(buf, "PNG")
            parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
        parts.append({"type": "text", "text": row["question"]})
        out.append({"model": "nano", "messages": [{"role": "user", "content": parts}], "max_tokens": 6, "temperature": 0})
    return out


def eval_rate(samples: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory(prefix="eval-vs-serve-") as out:
        command = [sys.executable, "-m", "vlmlab", "eval", "--model", "nano", "--dataset", "synth", "--limit", str(samples),
                   "--batch-size", str(batch_size), "--output-dir", out, "--no-progress"]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=900)
        (summary,) = json.loads((Path(out) / "summary.json").read_text())
        return float(summary["run"]["samples_per_second"])


async def serve_rate(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(body: dict) -> None:
            nonlocal failures
            async with gate:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                failures += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return len(bodies) / (time.perf_counter() - start), failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    bodies = requests_for(args.samples)
    port = free_port()
    server = start_server(port, ["--model", "nano", "--served-model-name", "nano", "--response-cache", "0", "--preprocess-cache", "0", "--max-queue", "1024"])
    url = f"http://127.0.0.1:{port}"
    rounds: list[dict] = []
    started = time.perf_counter()
    try:
        asyncio.run(serve_rate(url, bodies[: min(32, len(bodies))], args.concurrency))  # warm-up
        for index in range(args.rounds):
            figures: dict = {}
            order = ["serve", *sizes] if index % 2 == 0 else [*sizes, "serve"]
            for item in order:
                if item == "serve":
                    rate, failed = asyncio.run(serve_rate(url, bodies, args.concurrency))
                    figures["serve"], figures["serve_failures"] = rate, failed
                else:
                    figures[f"eval_b{item}"] = eval_rate(args.samples, item)
            rounds.append(figures)
            print(f"round {index}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    best = max(sizes, key=lambda b: median[f"eval_b{b}"])
    print(f"\nnano, synth, {args.samples} samples, 6-token greedy answers, medians of {args.rounds} rounds ({time.perf_counter() - started:.0f} s)")
    print(f"  serve, {args.concurrency} concurrent (caches off): {median['serve']:.1f} req/s (failures {int(median['serve_failures'])})")
    for size in sizes:
        print(f"  eval --batch-size {size}: {median[f'eval_b{size}']:.1f} samples/s ({median[f'eval_b{size}'] / median['serve']:.2f}x serve)")
    ratio = median[f"eval_b{best}"] / median["serve"]
    print(f"  eval at its best batch size ({best}) / serve: {ratio:.2f}x (goal >= 0.9x)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "median": median, "best_batch_size": best, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
