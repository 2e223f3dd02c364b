"""nano throughput on the transformers engine at concurrency 1, 4 and 16, side by side.

Every level runs the same requests (synthetic-task images and questions, greedy, ``ignore_eos``
so every request decodes exactly ``--tokens`` tokens) against one loaded engine. Two figures per
level, each as a ratio to concurrency 1 (goal, issue 3: decode tokens/s >= 5x at 16):

* output tokens/s: completion tokens / wall time, image preprocessing and prefills included;
* decode tokens/s: ``concurrency / mean TPOT``, TPOT being a request's time per output token
  after its first (prefills of other requests that interrupt its decoding included).

On nano the two differ because a request's prefill (a 4-layer vision tower and ~80 prompt
tokens) costs about as much compute batched as alone, while decode steps batch well.

    .venv/bin/python benchmarks/engine_hf.py [--requests 32] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import platform
import time

from vlmlab.engines import EngineSpec, GenerationRequest, complete, load_engine
from vlmlab.nano.tasks import generate
from vlmlab.protocol.core import Chat, ImageData, ImagePart, SamplingParams


def requests_from_tasks(n: int, tokens: int) -> list[GenerationRequest]:
    out = []
    for sample in generate(n, seed=123):
        parts = []
        for im in sample.images:
            buf = io.BytesIO()
            im.save(buf, "PNG")
            data = ImageData(im, im.width, im.height, "PNG", hashlib.sha256(buf.getvalue()).hexdigest(), buf.tell())
            parts.append(ImagePart(ref=sample.id, data=data))
        sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        out.append(GenerationRequest(Chat.single(sample.question, parts), sampling))
    return out


async def run_level(engine, requests: list[GenerationRequest], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def one(request: GenerationRequest):
        async with gate:
            return await complete(engine, request)

    start = time.perf_counter()
    results = await asyncio.gather(*[one(r) for r in requests])
    wall = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    ttfts = sorted(r.timings.ttft_s for r in results)
    # Decode phase: each request's tokens after its first over the time they took (other
    # requests' prefills that interrupt it included); `concurrency` streams decode at once.
    tpots = sorted(r.timings.decode_s / (r.completion_tokens - 1) for r in results)
    mean_tpot = sum(tpots) / len(tpots)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1),
        "tpot_p50_ms": round(tpots[len(tpots) // 2] * 1000, 3),
        "decode_tokens_per_s": round(concurrency / mean_tpot, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--model", default="nano", help="nano (packaged) or a nano-layout checkpoint directory")
    parser.add_argument("--extra", action="append", default=[], help="engine extra NAME=INT, e.g. prefill_threads=1")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    extra = {k: int(v) for k, _, v in (e.partition("=") for e in args.extra)}
    engine = load_engine(EngineSpec(model=args.model, device="cpu", max_batch_size=max(levels), extra=extra))
    requests = requests_from_tasks(args.requests, args.tokens)
    # Warm-up: one pass at the highest level, not measured (allocator, caches, lazy imports).
    asyncio.run(run_level(engine, requests[: max(levels)], max(levels)))
    engine.preprocess_cache.clear()
    rows = []
    for level in levels:
        engine.preprocess_cache.clear()  # every level pays the same preprocessing
        rows.append(asyncio.run(run_level(engine, requests, level)))
    engine.close()
    base, decode_base = rows[0]["tokens_per_s"], rows[0]["decode_tokens_per_s"]
    print(f"nano throughput, {args.requests} requests x {args.tokens} tokens, {platform.processor() or platform.machine()}")
    print("  output tok/s = completion tokens / wall time (image prefills included)")
    print("  decode tok/s = concurrency / mean time per output token after the first (TPOT)")
    print(f"{'concurrency':>11} {'output tok/s':>12} {'x vs 1':>7} {'decode tok/s':>12} {'x vs 1':>7} {'wall s':>7} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    for row in rows:
        row["ratio_vs_1"] = round(row["tokens_per_s"] / base, 2)
        row["decode_ratio_vs_1"] = round(row["decode_tokens_per_s"] / decode_base, 2)
        print(f"{row['concurrency']:>11} {row['tokens_per_s']:>12} {row['ratio_vs_1']:>7} {row['decode_tokens_per_s']:>12} "
              f"{row['decode_ratio_vs_1']:>7} {row['wall_s']:>7} {row['ttft_p50_ms']:>12} {row['tpot_p50_ms']:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "engine_hf", "requests": args.requests, "tokens": args.tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
