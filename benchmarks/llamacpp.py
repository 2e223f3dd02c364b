"""The llamacpp engine on nano (GGUF) against the hf engine, against itself with other copy and
thread settings, and against bare llama-cpp-python, side by side in one run.

1. **hf vs llamacpp through ``vlmlab serve``**: every server (below) is a subprocess on its own
   loopback port, all alive for the whole run and driven one at a time (the order rotated each
   round), in alternating rounds. Each round sends the same new requests to every server: a
   shipped sample image (nano's 9 one-image samples, cycled) scaled to a size drawn per request
   (longest side 256-640 px) with one pixel changed, as a PNG data URL, with the sample's
   question; greedy, streamed, ``ignore_eos`` with ``--max-tokens`` (32), so every answer decodes
   the same number of tokens. ``--response-cache 0`` for all; the preprocessing cache stays on
   (its default) but cannot hit, since no image is sent twice to a server (its hits over the
   rounds, from ``/stats``, are printed: 0 expected). At 1 and 16 concurrent: requests/s, TTFT
   p50/p99 (first content chunk of the SSE stream), decode tok/s per request (``(tokens - 1) /
   (last chunk - first chunk)``, the median over requests: the inverse of the mean inter-token
   latency) and output tok/s over the round's wall time; llamacpp / hf for each.
2. **Copies**: llamacpp with ``--data-parallel-size 1 --threads 2`` (the engine's default on 2
   cores), ``--data-parallel-size 2`` (1 thread each) and ``--data-parallel-size 1 --threads 1``,
   in the same rounds as 1 (``--omp-passive`` adds dp1 t2 with ``OMP_WAIT_POLICY=passive``). The
   fastest at 16 concurrent is printed as the recommended default.
3. **vlmlab vs bare llama-cpp-python, no HTTP**, one request at a time, the same threads (the
   machine's cores), each side in a process of its own (see :func:`side_worker` for why): bare is
   ``Llama(chat_handler=MTMDChatHandler(...)).create_chat_completion(stream=True)``, whose prompt
   is the GGUF's chat template with mtmd's marker, as vlmlab's is; vlmlab is
   ``load_engine(EngineSpec(engine="llamacpp", ...)).generate``. Both start from the same PNG
   data URL, already at the size nano's rule resizes to, so both see identical pixels, and both
   decode it inside the timing (bare: base64 + stb_image inside mtmd; vlmlab:
   ``vlmlab.media.load_image``). Two workloads, alternating which side runs first per round:
   - *natural*: greedy, ``max_tokens`` 32, both stop at the model's end token (nano answers in
     1-3 tokens, so this is image encoding, prefill and per-request overhead);
   - *32 tokens*: the end tokens banned on both sides, so both decode exactly 32 tokens: vlmlab
     with ``ignore_eos`` (a -inf logit bias on the end tokens in llama.cpp's own sampler chain),
     bare with ``logit_bias={end: -inf}`` (which llama-cpp-python applies in a Python logits
     processor, a per-token cost vlmlab does not pay).
   Per-request latency p50, TTFT p50, decode tok/s, vlmlab's speed relative to bare (bare time /
   vlmlab time; goal >= 0.95x), and how many answers are identical (the first differing ones
   printed).

    .venv/bin/python benchmarks/llamacpp.py [--rounds 3] [--requests 64] [--skip-serve] [--skip-bare] [--omp-passive] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from served import free_port

SAMPLES = Path(__file__).resolve().parents[1] / "src/vlmlab/nano/samples"
LEVELS = (1, 16)


def samples() -> list[tuple[Image.Image, str]]:
    """Nano's shipped one-image samples: (image, question)."""
    listed = json.loads((SAMPLES / "samples.json").read_text())
    return [(Image.open(SAMPLES / s["images"][0]).convert("RGB"), s["question"]) for s in listed if len(s["images"]) == 1]


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def scaled(image: Image.Image, rng: random.Random) -> Image.Image:
    """``image`` scaled to a longest side of 256-640 px, one pixel changed: new bytes every time."""
    side = rng.randrange(256, 641)
    ratio = side / max(image.size)
    out = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.Resampling.BICUBIC)
    out.putpixel((rng.randrange(out.width), rng.randrange(out.height)), tuple(rng.randrange(256) for _ in range(3)))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


# -- 1 and 2: servers over HTTP ------------------------------------------------------------------


@dataclass
class Level:
    """One round at one concurrency on one server."""

    seconds: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    decode_rates: list[float] = field(default_factory=list)
    tokens: int = 0
    answers: list[str] = field(default_factory=list)
    errors: int = 0

    def figures(self) -> dict[str, float]:
        done = len(self.ttfts)
        return {
            "req_s": done / self.seconds,
            "ttft_p50_ms": 1000 * percentile(self.ttfts, 50),
            "ttft_p99_ms": 1000 * percentile(self.ttfts, 99),
            "decode_tok_s": statistics.median(self.decode_rates) if self.decode_rates else float("nan"),
            "output_tok_s": self.tokens / self.seconds,
            "errors": self.errors,
        }


async def drive(base: str, bodies: list[dict], concurrency: int) -> Level:
    """Stream ``bodies``, ``concurrency`` at a time; per request TTFT, decode rate and answer."""
    out = Level()
    out.answers = [""] * len(bodies)
    todo = list(reversed(range(len(bodies))))

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            index = todo.pop()
            start = time.perf_counter()
            first = last = None
            text: list[str] = []
            tokens = 0
            async with client.stream("POST", "/v1/chat/completions", json=bodies[index]) as response:
                if response.status_code != 200:
                    out.errors += 1
                    await response.aread()
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            last = time.perf_counter()
                            first = first or last
                            text.append(content)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            end = time.perf_counter()
            out.ttfts.append((first or end) - start)
            if first is not None and last is not None and last > first and tokens > 1:
                out.decode_rates.append((tokens - 1) / (last - first))
            out.tokens += tokens
            out.answers[index] = "".join(text)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        begin = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        out.seconds = time.perf_counter() - begin
    return out


def body(url: str, question: str, max_tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {
        "model": "nano", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip


def start(label: str, flags: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``vlmlab serve`` with ``flags`` (and ``env`` added to the environment) on a free port, once
    /health answers; (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "vlmlab", "serve", "--port", str(port), "--log-level", "warning", "--device", "cpu",
               "--model", "nano", "--response-cache", "0", "--max-queue", "256", *flags]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    environment.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})})
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{label} did not start: {' '.join(command)}\n{process.stderr.read().decode()[-3000:]}")
        time.sleep(0.3)


def cache_hits(base: str) -> int:
    stats = httpx.get(base + "/stats", timeout=30).json()
    return int((stats.get("totals") or {}).get("mm_cache_hits", 0))


# label -> (flags, environment).
SERVERS: dict[str, tuple[list[str], dict[str, str]]] = {
    "hf": (["--engine", "hf"], {}),
    "llamacpp dp1 t2": (["--engine", "llamacpp", "--data-parallel-size", "1", "--threads", "2"], {}),
    "llamacpp dp2 t1": (["--engine", "llamacpp", "--data-parallel-size", "2", "--threads", "1"], {}),
    "llamacpp dp1 t1": (["--engine", "llamacpp", "--data-parallel-size", "1", "--threads", "1"], {}),
}
# llama-cpp-python's wheels run llama.cpp's threads on OpenMP (libgomp), whose idle threads spin
# between parallel regions. With OMP_WAIT_POLICY=passive they sleep at once: better when other
# processes want the cores, ~4x slower on an idle machine (every op then pays a futex wake-up).
PASSIVE = {"llamacpp dp1 t2 passive": (["--engine", "llamacpp", "--data-parallel-size", "1", "--threads", "2"], {"OMP_WAIT_POLICY": "passive"})}


def serve_part(args: argparse.Namespace) -> dict:
    pictures = samples()
    rng = random.Random(0)

    def bodies(n: int) -> list[dict]:
        chosen = [pictures[i % len(pictures)] for i in range(n)]
        return [body(png_url(scaled(image, rng)), question, args.max_tokens) for image, question in chosen]

    processes: dict[str, subprocess.Popen] = {}
    bases: dict[str, str] = {}
    try:
        for label, (flags, env) in {**SERVERS, **(PASSIVE if args.omp_passive else {})}.items():
            processes[label], bases[label] = start(label, flags, env)
        warm = bodies(8)
        for base in bases.values():
            asyncio.run(drive(base, warm, 4))
        hits_before = {label: cache_hits(base) for label, base in bases.items()}
        rounds: dict[str, dict[int, list[dict]]] = {label: {c: [] for c in LEVELS} for label in bases}
        same: dict[str, list[int]] = {label: [0, 0] for label in bases}
        order = list(bases)
        for k in range(args.rounds):
            for concurrency in LEVELS:
                sent = bodies(args.requests)
                answers: dict[str, list[str]] = {}
                # Rotate the order each round so no server always runs first (or last).
                for label in order[k % len(order):] + order[: k % len(order)]:
                    level = asyncio.run(drive(bases[label], sent, concurrency))
                    rounds[label][concurrency].append(level.figures())
                    answers[label] = level.answers
                for label in bases:
                    pairs = list(zip(answers[label], answers["llamacpp dp1 t2"]))
                    same[label][0] += sum(a == b for a, b in pairs)
                    same[label][1] += len(pairs)
        hits = {label: cache_hits(base) - hits_before[label] for label, base in bases.items()}
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    medians = {
        label: {c: {key: statistics.median(r[key] for r in levels[c]) for key in levels[c][0]} for c in LEVELS}
        for label, levels in rounds.items()
    }
    return {"rounds": rounds, "medians": medians, "preprocess_cache_hits": hits, "answers_same_as_llamacpp_dp1_t2": same}


def print_serve(report: dict, args: argparse.Namespace) -> None:
    medians = report["medians"]
    keys = (("req_s", "req/s", "{:8.2f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:11.1f}"), ("ttft_p99_ms", "TTFT p99 ms", "{:11.1f}"),
            ("decode_tok_s", "decode tok/s/req", "{:16.1f}"), ("output_tok_s", "output tok/s", "{:12.1f}"))  # fmt: skip
    print(f"\n1+2. vlmlab serve on nano, streamed, greedy, ignore_eos, {args.max_tokens} tokens, {args.requests} requests a round,"
          f" medians of {args.rounds} rounds (servers alive together, driven one at a time, order rotated per round)")  # fmt: skip
    width = max(len(label) for label in medians) + len(" / hf")
    for concurrency in LEVELS:
        print(f"  {concurrency} concurrent:")
        print(f"    {'server':<{width}}" + "".join(f" {title:>{len(fmt.format(0))}}" for _, title, fmt in keys))
        for label in medians:
            row = medians[label][concurrency]
            print(f"    {label:<{width}}" + "".join(" " + fmt.format(row[key]) for key, _, fmt in keys))
        hf = medians["hf"][concurrency]
        for label in ("llamacpp dp1 t2", "llamacpp dp2 t1"):
            row = medians[label][concurrency]
            print(f"    {label + ' / hf':<{width}}" + "".join(" " + f"{row[key] / hf[key]:>{len(fmt.format(0)) - 1}.2f}x" for key, _, fmt in keys))
    print("  (ratios are value / value: above 1 is better for req/s and tok/s, worse for TTFT)")
    errors = {label: sum(r["errors"] for c in LEVELS for r in report["rounds"][label][c]) for label in medians}
    if any(errors.values()):
        print(f"  requests that failed (not in the figures): {errors}")
    print(f"  preprocessing-cache hits during the rounds (distinct images, 0 expected): {report['preprocess_cache_hits']}")
    print("  answers identical to llamacpp dp1 t2's: " + ", ".join(f"{label} {a}/{n}" for label, (a, n) in report["answers_same_as_llamacpp_dp1_t2"].items()))
    copies = {label: medians[label] for label in medians if label.startswith("llamacpp")}
    for concurrency in LEVELS:
        base = copies["llamacpp dp1 t2"][concurrency]["output_tok_s"]
        ratios = ", ".join(f"{label} {copies[label][concurrency]['output_tok_s'] / base:.2f}x" for label in copies)
        best = max(copies, key=lambda label: copies[label][concurrency]["output_tok_s"])
        print(f"  copies, {concurrency} concurrent, output tok/s relative to dp1 t2 (the engine's default here): {ratios}; fastest: {best}")
    best16 = max(copies, key=lambda label: copies[label][16]["output_tok_s"])
    print(f"  recommended default on this machine (fastest at 16 concurrent): {best16}"
          f" (at 1 concurrent: {max(copies, key=lambda label: copies[label][1]['output_tok_s'])})")


# -- 3: in-process, bare llama-cpp-python vs the vlmlab engine ---------------------------------


@dataclass
class Timed:
    latency: float
    ttft: float
    tokens: int
    decode_s: float
    text: str


def bare_one(llama: Any, url: str, question: str, max_tokens: int, bias: dict[int, float] | None) -> Timed:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]
    start = time.perf_counter()
    first = last = None
    text: list[str] = []
    tokens = 0
    stream = llama.create_chat_completion(messages=messages, temperature=0, max_tokens=max_tokens, repeat_penalty=1.0, stream=True, logit_bias=bias)
    for chunk in stream:
        content = chunk["choices"][0]["delta"].get("content")
        if content:  # one chunk per token (empty pieces aside)
            last = time.perf_counter()
            first = first or last
            tokens += 1
            text.append(content)
    end = time.perf_counter()
    return Timed(end - start, (first or end) - start, tokens, (last or end) - (first or end), "".join(text))


async def vlmlab_one(engine: Any, url: str, question: str, max_tokens: int, ignore_eos: bool) -> Timed:
    from vlmlab.engines.base import GenerationRequest
    from vlmlab.media import load_image
    from vlmlab.protocol.core import Chat, GenerationResult, ImagePart, SamplingParams

    start = time.perf_counter()
    chat = Chat.single(question, [ImagePart(ref="sample", data=load_image(url))])
    request = GenerationRequest(chat, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos))
    first = last = None
    text: list[str] = []
    tokens = 0
    async for item in engine.generate(request):
        if isinstance(item, GenerationResult):
            tokens = item.completion_tokens
        elif item.text:
            last = time.perf_counter()
            first = first or last
            text.append(item.text)
    end = time.perf_counter()
    return Timed(end - start, (first or end) - start, tokens, (last or end) - (first or end), "".join(text))


def summary(runs: list[Timed]) -> dict[str, float]:
    # Answers of a few tokens say nothing about decoding (their chunks can arrive together).
    rates = [(r.tokens - 1) / r.decode_s for r in runs if r.tokens >= 8 and r.decode_s > 0]
    return {
        "latency_p50_ms": 1000 * percentile([r.latency for r in runs], 50),
        "ttft_p50_ms": 1000 * percentile([r.ttft for r in runs], 50),
        "decode_tok_s": statistics.median(rates) if rates else float("nan"),
        "tokens_mean": sum(r.tokens for r in runs) / len(runs),
    }


def side_worker(side: str, threads: int, max_tokens: int, connection: Any) -> None:
    """In a process of its own: load one side (``bare`` or ``vlmlab``), then answer each
    ``(inputs, ban_end)`` received with the timed runs (as dicts), until ``None``.

    One process per side: libgomp (llama-cpp-python's wheels run llama.cpp's threads on OpenMP)
    keeps a team of worker threads per calling thread, and once two teams exist in a process
    (bare on this thread, vlmlab's engine on its pool thread) their threads outnumber the 2
    cores, libgomp stops spinning between parallel regions and every decode step pays futex
    wake-ups: measured here, both sides then decode ~9x slower (7,500 -> 840 tok/s at 2 threads).
    """
    from vlmlab.engines.llamacpp.convert import nano_gguf

    files = nano_gguf()
    if side == "bare":
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp.llama_chat_format import MTMDChatHandler

        # verbose=False does not reach mtmd's per-request log lines (stderr, ~20 a request):
        # silence them as vlmlab's engine does, so bare pays no printing vlmlab does not pay.
        quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        mtmd.mtmd_log_set(quiet, None)
        mtmd.mtmd_helper_log_set(quiet, None)
        bare = llama_cpp.Llama(model_path=str(files.model), chat_handler=MTMDChatHandler(clip_model_path=str(files.mmproj), verbose=False),
                               n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
        vocab = llama_cpp.llama_model_get_vocab(bare.model)
        # The same end tokens vlmlab's ignore_eos bans (every end-of-generation token).
        end_bias = {t: float("-inf") for t in range(bare.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}

        def run(url: str, question: str, ban_end: bool) -> Timed:
            return bare_one(bare, url, question, max_tokens, end_bias if ban_end else None)

        close = bare.close
    else:
        from vlmlab.config import EngineSpec
        from vlmlab.engines import load_engine

        engine = load_engine(EngineSpec(model=str(files.model), engine="llamacpp", max_model_len=1024,
                                        extra={"mmproj": str(files.mmproj), "n_threads": threads}))  # fmt: skip
        loop = asyncio.new_event_loop()

        def run(url: str, question: str, ban_end: bool) -> Timed:
            return loop.run_until_complete(vlmlab_one(engine, url, question, max_tokens, ban_end))

        def close() -> None:
            loop.close()
            engine.close()

    try:
        connection.send("ready")
        while (job := connection.recv()) is not None:
            inputs, ban_end = job
            connection.send([dataclasses.asdict(run(url, question, ban_end)) for url, question in inputs])
    finally:
        close()


def bare_part(args: argparse.Namespace) -> dict:
    from vlmlab.families import get_family

    family = get_family("nano")
    rng = random.Random(1)
    pictures = samples()

    def inputs(n: int) -> list[tuple[str, str]]:
        out = []
        for i in range(n):
            image, question = pictures[i % len(pictures)]
            image = scaled(image, rng)
            # Both sides get the pixels vlmlab would give llama.cpp: nano's resize, done here.
            out.append((png_url(image.resize(family.image_layout(*image.size).resized, Image.Resampling.BICUBIC)), question))
        return out

    context = multiprocessing.get_context("spawn")
    sides: dict[str, tuple[Any, Any]] = {}
    report: dict[str, Any] = {"threads": args.threads}
    try:
        for side in ("bare", "vlmlab"):
            mine, theirs = context.Pipe()
            process = context.Process(target=side_worker, args=(side, args.threads, args.max_tokens, theirs), daemon=True)
            process.start()
            sides[side] = (process, mine)
            if mine.recv() != "ready":
                raise RuntimeError(f"the {side} process did not start")

        def call(side: str, sent: list[tuple[str, str]], ban_end: bool) -> list[Timed]:
            connection = sides[side][1]
            connection.send((sent, ban_end))
            return [Timed(**run) for run in connection.recv()]

        warm = inputs(4)
        for side in sides:
            call(side, warm, False)
        for mode, ban_end in (("natural", False), ("32 tokens", True)):
            rounds: dict[str, list[dict]] = {"bare": [], "vlmlab": []}
            same = total = 0
            differing: list[dict] = []
            for k in range(args.rounds):
                sent = inputs(args.requests)
                done = {side: call(side, sent, ban_end) for side in (("bare", "vlmlab") if k % 2 == 0 else ("vlmlab", "bare"))}
                for side, figures in rounds.items():
                    figures.append(summary(done[side]))
                for index, (a, b) in enumerate(zip(done["bare"], done["vlmlab"])):
                    same += a.text == b.text
                    if a.text != b.text and len(differing) < 5:
                        differing.append({"round": k, "request": index, "question": sent[index][1], "bare": a.text, "vlmlab": b.text})
                total += len(sent)
            medians = {side: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for side, rs in rounds.items()}
            report[mode] = {"rounds": rounds, "medians": medians, "answers_same": [same, total], "differing": differing}
    finally:
        for process, connection in sides.values():
            with contextlib.suppress(OSError):
                connection.send(None)
        for process, _ in sides.values():
            process.join(30)
            if process.is_alive():
                process.kill()
    return report


def print_bare(report: dict, args: argparse.Namespace) -> None:
    print(f"\n3. vlmlab's llamacpp engine vs bare llama-cpp-python, no HTTP (a process each), one request at a time, {report['threads']} threads,"
          f" {args.requests} requests a round, medians of {args.rounds} rounds (alternating)")  # fmt: skip
    for mode in ("natural", "32 tokens"):
        medians = report[mode]["medians"]
        bare, ours = medians["bare"], medians["vlmlab"]
        print(f"  {mode} ({'end token banned on both' if mode != 'natural' else 'both stop at the end token'}):")
        print(f"    {'':8} {'latency p50 ms':>14} {'TTFT p50 ms':>11} {'decode tok/s':>12} {'tokens/answer':>13}")
        for side, row in (("bare", bare), ("vlmlab", ours)):
            decode = f"{row['decode_tok_s']:12.1f}" if not math.isnan(row["decode_tok_s"]) else f"{'-':>12}"
            print(f"    {side:8} {row['latency_p50_ms']:14.2f} {row['ttft_p50_ms']:11.2f} {decode} {row['tokens_mean']:13.1f}")
        speed = bare["latency_p50_ms"] / ours["latency_p50_ms"]
        ttft = bare["ttft_p50_ms"] / ours["ttft_p50_ms"]
        decode = ours["decode_tok_s"] / bare["decode_tok_s"]
        a, n = report[mode]["answers_same"]
        decoded = f", decode {decode:.2f}x" if not math.isnan(decode) else ""
        print(f"    vlmlab speed / bare: latency {speed:.2f}x, TTFT {ttft:.2f}x{decoded}  (goal >= 0.95x); answers identical {a}/{n}")
        for example in report[mode]["differing"]:
            print(f"      differs: round {example['round']} request {example['request']} ({example['question']}): bare {example['bare']!r}, vlmlab {example['vlmlab']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64, help="requests per round and level (and per side in part 3)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of both sides in part 3")
    parser.add_argument("--skip-serve", action="store_true", help="skip parts 1 and 2 (the servers)")
    parser.add_argument("--skip-bare", action="store_true", help="skip part 3 (bare llama-cpp-python)")
    parser.add_argument("--omp-passive", action="store_true", help="also serve dp1 t2 with OMP_WAIT_POLICY=passive")
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()
    report: dict[str, Any] = {"args": vars(args)}
    began = time.perf_counter()
    if not args.skip_serve:
        report["serve"] = serve_part(args)
        print_serve(report["serve"], args)
    if not args.skip_bare:
        report["bare"] = bare_part(args)
        print_bare(report["bare"], args)
    print(f"\n({time.perf_counter() - began:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
