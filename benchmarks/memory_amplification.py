"""Memory amplification (issue 16, item 7): small PNGs of huge dimensions sent at once.

Starts ``vlmlab serve`` (nano) as a subprocess per scenario, sends N concurrent requests, each
a few-KB PNG of SIDE x SIDE 1-bit pixels, and prints the server's resident memory (the process
and its preprocessing workers, sampled every 10 ms, plus the server process's own VmHWM) before
and at peak, with the status codes. Scenarios:

* ``old``: the behaviour before admission, as far as flags reproduce it: the old fixed pixel
  cap (178,956,970) and a budget too large to matter;
* ``budget``: the old cap, but the default image-memory budget (2 GiB): the budget alone;
* ``new``: today's defaults (the family's pixel cap, 16.8 MP for nano, and the 2 GiB budget).

    .venv/bin/python benchmarks/memory_amplification.py [--n 4] [--side 13000] [--json out.json]

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from served import free_port, start_server, status_bytes, tree_rss

SCENARIOS = {
    "old": ["--max-image-pixels", "178956970", "--image-memory-budget", "1TiB"],
    "budget": ["--max-image-pixels", "178956970"],
    "new": [],
}


def bilevel_png(side: int, seed: int) -> bytes:
    image = Image.new("1", (side, side), 1)
    ImageDraw.Draw(image).line((0, seed, side, side - seed), fill=0, width=3)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def run(name: str, extra: list[str], images: list[bytes]) -> dict:
    port = free_port()
    proc = start_server(port, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        small = data_url(bilevel_png(64, 0))
        httpx.post(f"{url}/v1/chat/completions", json=body(small), timeout=120)  # warm up
        time.sleep(0.3)
        baseline = tree_rss(proc.pid)
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        results: list[tuple[int, float]] = [(0, 0.0)] * len(images)
        barrier = threading.Barrier(len(images))

        def send(i: int) -> None:
            barrier.wait()
            start = time.perf_counter()
            request = body(data_url(images[i]))
            reply = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=600)
            results[i] = (reply.status_code, time.perf_counter() - start)

        senders = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        done.set()
        sampler.join()
        after = httpx.post(f"{url}/v1/chat/completions", json=body(small), timeout=120).status_code
        health = httpx.get(f"{url}/health").status_code
        stats = httpx.get(f"{url}/stats").json().get("image_memory")
        return {
            "scenario": name,
            "flags": " ".join(extra) or "(defaults)",
            "baseline_rss_mb": round(baseline / 1e6),
            "peak_rss_mb": round(peak[0] / 1e6),
            "peak_growth_mb": round((peak[0] - baseline) / 1e6),
            "server_vmhwm_mb": round(status_bytes(proc.pid, "VmHWM") / 1e6),
            "statuses": [status for status, _ in results],
            "seconds": [round(seconds, 2) for _, seconds in results],
            "after": {"normal_request": after, "health": health},
            "image_memory": stats,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def body(image_url: str) -> dict:
    image = {"type": "image_url", "image_url": {"url": image_url}}
    content = [image, {"type": "text", "text": "What?"}]
    return {"model": "nano", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="concurrent requests")
    parser.add_argument("--side", type=int, default=13000, help="image side in pixels")
    parser.add_argument("--scenarios", default="old,budget,new")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    images = [bilevel_png(args.side, seed) for seed in range(args.n)]
    size = len(images[0]) // 1024
    print(f"{args.n} concurrent {args.side}x{args.side} 1-bit PNGs of ~{size} KB each")
    rows = []
    for name in args.scenarios.split(","):
        row = run(name, SCENARIOS[name], images)
        rows.append(row)
        print(
            f"{name:7} RSS {row['baseline_rss_mb']:>6} MB -> peak {row['peak_rss_mb']:>6} MB "
            f"(+{row['peak_growth_mb']} MB; server VmHWM {row['server_vmhwm_mb']} MB)  "
            f"statuses {row['statuses']}  seconds {row['seconds']}  after: {row['after']}"
        )
        if row["image_memory"]:
            print(f"        /stats image_memory: {row['image_memory']}")
    if args.json:
        report = {"n": args.n, "side": args.side, "results": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
