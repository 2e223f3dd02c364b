"""Server memory under sustained load (issue 16, item 5): does RSS keep growing after warm-up?

Starts ``vlmlab serve`` (nano, default settings, caches on) as a subprocess and drives it with
CONCURRENCY clients for WARMUP + DURATION seconds. Each request carries a distinct image (a
fresh size and colour, so caches fill and must evict), about a third repeat an earlier image
and question (cache hits), and a fifth stream. The resident memory of the server and its
worker processes is sampled every 5 s; the script prints it, the cache sizes from /stats, and
the growth from the end of the warm-up to the end of the run (goal: under 10%).

    .venv/bin/python benchmarks/memory_soak.py [--duration 600] [--warmup 60] [--concurrency 64]

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import time

import httpx
from PIL import Image, ImageDraw
from served import free_port, start_server, tree_rss


def image_url(rng: random.Random) -> str:
    width, height = rng.randint(32, 640), rng.randint(32, 640)
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def client(url: str, seed: int, stop_at: float, counts: dict[str, int], seen: list[dict]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < stop_at:
            if seen and rng.random() < 0.33:
                body = rng.choice(seen)
            else:
                body = {
                    "model": "nano",
                    "max_tokens": rng.choice([4, 16, 32]),
                    "temperature": rng.choice([0, 0.7]),
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image_url(rng)}},
                        {"type": "text", "text": rng.choice(["What colour is the shape?", "Describe it.", "Count the shapes."])},
                    ]}],
                }  # fmt: skip
                if len(seen) < 200:
                    seen.append(body)
            stream = rng.random() < 0.2
            try:
                if stream:
                    async with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as reply:
                        async for _ in reply.aiter_lines():
                            pass
                        status = reply.status_code
                else:
                    status = (await http.post(f"{url}/v1/chat/completions", json=body)).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            counts[str(status)] = counts.get(str(status), 0) + 1


async def drive(url: str, pid: int, args: argparse.Namespace) -> None:
    start = time.monotonic()
    stop_at = start + args.warmup + args.duration
    counts: dict[str, int] = {}
    seen: list[dict] = []
    tasks = [asyncio.create_task(client(url, i, stop_at, counts, seen)) for i in range(args.concurrency)]
    samples: list[tuple[float, int]] = []
    warm_rss = None
    while time.monotonic() < stop_at:
        await asyncio.sleep(5)
        elapsed = time.monotonic() - start
        rss = tree_rss(pid)
        samples.append((elapsed, rss))
        if warm_rss is None and elapsed >= args.warmup:
            warm_rss = rss
        print(f"{elapsed:6.0f} s  rss {rss / 2**20:7.1f} MiB  requests {sum(counts.values()):,}", flush=True)
    await asyncio.gather(*tasks)
    stats = httpx.get(f"{url}/stats", timeout=30).json()
    final = samples[-1][1]
    peak_after = max(rss for t, rss in samples if t >= args.warmup)
    print(f"\nstatuses: {dict(sorted(counts.items()))}")
    for name in ("preprocess_cache", "encoder_cache", "response_cache"):
        cache = stats.get(name) or {}
        print(f"{name}: {cache.get('entries')} entries, {cache.get('size', 0) / 2**20:.1f} of {cache.get('budget', 0) / 2**20:.1f} MiB")
    print(f"rss at warm-up end {warm_rss / 2**20:.1f} MiB, at the end {final / 2**20:.1f} MiB, peak after warm-up {peak_after / 2**20:.1f} MiB")
    print(f"growth after warm-up: {100 * (final / warm_rss - 1):+.1f}% (end), {100 * (peak_after / warm_rss - 1):+.1f}% (peak); goal < 10%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, ["--log-level", "error", "--max-queue", "256"])
    try:
        asyncio.run(drive(url, server.pid, args))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
