"""`vlmlab serve` on nano, measured from a client in another process, three figures in one run.

1. Server overhead: client end-to-end time minus the engine's own time (``timings.stages_ms.engine``)
   for small text-only requests, p50 and p90. Goal (issue 4): p50 <= 2 ms.
2. Preprocessing cache: the same 4032x3024 JPEG sent twice (as a data URL, different questions so
   the response cache cannot answer): client-side time to first token of the second request as a
   ratio to the first. Goal: <= 0.3x.
3. Throughput: image requests (greedy, ``ignore_eos``) one at a time and 16 at a time, three
   rounds in alternation (medians), as ratios: output tokens/s (wall time, image prefills included) and decode tokens/s
   (concurrency / mean time per output token after the first). Goal: >= 5x. Measured for 32 and
   128 output tokens (128: ``vllm bench serve``'s default output length), with one copy of the
   model and with ``--data-parallel-size 2`` (a second copy in its own process).

    .venv/bin/python benchmarks/server.py [--json out.json] [--tokens 32,128] [--data-parallel 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time

import httpx
import numpy as np
from PIL import Image

from served import free_port, start_server

from vlmlab.nano.tasks import generate


def start_nano_server(port: int, model: str = "nano", data_parallel: int = 1):
    extra = ["--max-queue", "256", "--model", model, "--served-model-name", "nano", "--data-parallel-size", str(data_parallel)]
    return start_server(port, extra)


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def photo_jpeg(w: int = 4032, h: int = 3024, seed: int = 0) -> str:
    """A camera-sized JPEG with photo-like content (smooth gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def overhead(url: str, n: int = 200) -> dict:
    gaps = []
    with httpx.Client(timeout=60) as client:
        for i in range(n + 20):
            body = {"model": "nano", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": f"Say a word {i}."}]}
            start = time.perf_counter()
            response = client.post(f"{url}/v1/chat/completions", json=body)
            e2e = time.perf_counter() - start
            engine_ms = response.json()["timings"]["stages_ms"]["engine"]
            if i >= 20:  # warm-up excluded
                gaps.append(e2e * 1000 - engine_ms)
    gaps.sort()
    return {"requests": n, "overhead_p50_ms": round(statistics.median(gaps), 3), "overhead_p90_ms": round(gaps[int(0.9 * len(gaps))], 3)}


def ttft(client: httpx.Client, url: str, image: str, question: str) -> float:
    body = {"model": "nano", "max_tokens": 4, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}]}  # fmt: skip
    start = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - start
            if line.startswith("data: ") and '"finish_reason":"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token")


def cache_ttft(url: str, repeats: int = 3) -> dict:
    firsts, seconds = [], []
    with httpx.Client(timeout=120) as client:
        # Warm-up with another image: the server starts its preprocessing processes on the first
        # large image, a one-off cost that is not what the cache saves.
        ttft(client, url, photo_jpeg(seed=99), "Warm-up?")
        for seed in range(repeats):
            image = photo_jpeg(seed=seed)
            firsts.append(ttft(client, url, image, "What colour is the shape?"))
            seconds.append(ttft(client, url, image, "What shape is it?"))
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {"image": "4032x3024 JPEG", "ttft_first_ms": round(first * 1000, 1), "ttft_second_ms": round(second * 1000, 1), "ratio": round(second / first, 3)}


def throughput_levels(url: str, tokens: int, rounds: int = 3) -> dict:
    """One at a time (16 requests), then 16 at a time (32 requests), ``rounds`` times in
    alternation so that both levels see the same machine; medians over the rounds. The same
    image requests throughout, with new seeds each time so the response cache cannot answer
    (the image caches hit at both levels)."""
    bodies = []
    for i, sample in enumerate(generate(32, seed=77)):
        parts = [{"type": "image_url", "image_url": {"url": png_url(im)}} for im in sample.images]
        bodies.append({"model": "nano", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "seed": i + 100_000 * tokens,
                       "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": sample.question}]}]})  # fmt: skip

    def fresh(subset: list[dict], k: int) -> list[dict]:
        return [{**b, "seed": b["seed"] + 1000 * k} for b in subset]

    asyncio.run(throughput(url, fresh(bodies, 0), 16))  # warm-up
    ones, sixteens = [], []
    for k in range(rounds):
        ones.append(asyncio.run(throughput(url, fresh(bodies[:16], 2 * k + 1), 1)))
        sixteens.append(asyncio.run(throughput(url, fresh(bodies, 2 * k + 2), 16)))
    one, decode_one = (statistics.median(x) for x in zip(*ones))
    sixteen, decode_sixteen = (statistics.median(x) for x in zip(*sixteens))
    return {
        "tokens": tokens, "rounds": rounds, "tokens_per_s_1": round(one, 1), "tokens_per_s_16": round(sixteen, 1),
        "ratio": round(sixteen / one, 2), "decode_tokens_per_s_1": round(decode_one, 1),
        "decode_tokens_per_s_16": round(decode_sixteen, 1), "decode_ratio": round(decode_sixteen / decode_one, 2),
        "tokens_per_s_1_rounds": [round(x, 1) for x, _ in ones], "tokens_per_s_16_rounds": [round(x, 1) for x, _ in sixteens],
    }  # fmt: skip


async def throughput(url: str, requests: list[dict], concurrency: int) -> tuple[float, float]:
    """(output tokens/s over the wall time, decode tokens/s = concurrency / mean TPOT from each
    response's ``timings.decode_tokens_per_s``)."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:

        async def one(body: dict) -> tuple[int, float]:
            async with gate:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                data = response.json()
                return data["usage"]["completion_tokens"], 1.0 / data["timings"]["decode_tokens_per_s"]

        start = time.perf_counter()
        done = await asyncio.gather(*[one(b) for b in requests])
        wall = time.perf_counter() - start
        mean_tpot = sum(t for _, t in done) / len(done)
        return sum(n for n, _ in done) / wall, concurrency / mean_tpot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--model", default="nano", help="nano (packaged) or a nano-layout checkpoint directory")
    parser.add_argument("--tokens", default="32,128", help="output lengths of the throughput runs")
    parser.add_argument("--data-parallel", default="1,2", help="--data-parallel-size values of the throughput runs")
    args = parser.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    results: dict = {"throughput": []}
    for n, copies in enumerate(int(d) for d in args.data_parallel.split(",")):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_nano_server(port, args.model, copies)
        try:
            if n == 0:
                results["overhead"], results["preprocess_cache"] = overhead(url), cache_ttft(url)
            for tokens in lengths:
                results["throughput"].append({"data_parallel_size": copies, **throughput_levels(url, tokens)})
        finally:
            server.terminate()
            server.wait(timeout=30)
    o, c = results["overhead"], results["preprocess_cache"]
    print(f"server overhead (e2e - engine): p50 {o['overhead_p50_ms']} ms, p90 {o['overhead_p90_ms']} ms   [goal p50 <= 2 ms]")
    print(f"4032x3024 JPEG TTFT: first {c['ttft_first_ms']} ms, second {c['ttft_second_ms']} ms, ratio {c['ratio']}   [goal <= 0.3]")
    print("throughput, image requests one at a time vs 16 at a time (medians of 3 alternating rounds)   [goal >= 5x]")
    print(f"{'copies':>6} {'tokens':>6} {'out tok/s 1':>11} {'out tok/s 16':>12} {'ratio':>6} {'decode tok/s 1':>14} {'decode tok/s 16':>15} {'ratio':>6}")
    for t in results["throughput"]:
        print(f"{t['data_parallel_size']:>6} {t['tokens']:>6} {t['tokens_per_s_1']:>11} {t['tokens_per_s_16']:>12} {t['ratio']:>5}x "
              f"{t['decode_tokens_per_s_1']:>14} {t['decode_tokens_per_s_16']:>15} {t['decode_ratio']:>5}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
