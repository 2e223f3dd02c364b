"""What a JSON schema costs on `vlmlab serve` (nano, hf engine): decode speed with
``response_format: json_schema`` against the same requests without it, at 1 and 16 concurrent.

The schema (an object holding exactly 16 integers 0..99) makes nano write 40-55 tokens under
the grammar whatever it would have said, and the answer ends when the grammar is complete
(``ignore_eos`` false). The requests without a schema then decode exactly as many tokens as their
structured twin did (``max_tokens`` = its completion tokens, ``ignore_eos``), so both sides do
the same work apart from the grammar: masks on every step, compile on the first request (the
compiled grammar is cached after it, and the warm-up pays it).

Per level and side: output tok/s (completion tokens / wall time, image prefills included) and mean
TPOT (time per output token after the first, from each response's ``timings``), as ratios
with/without. Rounds alternate with/without so both see the same machine; medians over rounds.
Every structured answer is checked with json.loads and jsonschema.

    .venv/bin/python benchmarks/structured_overhead.py [--rounds 3] [--requests 16] [--json out.json]
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
import jsonschema

from served import free_port, start_server

from vlmlab.nano.tasks import generate

SCHEMA = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "minItems": 16,
            "maxItems": 16,
        }
    },
    "required": ["values"],
    "additionalProperties": False,
}
# Compact JSON: `{"values":[` + 16 x (1-2 digits) + 15 commas + `]}` stays under 64 tokens.
MAX_TOKENS = 64
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
LEVELS = (1, 16)


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def base_bodies(n: int) -> list[dict]:
    """nano's own kind of request (a synthetic-task image and question), greedy."""
    bodies = []
    for sample in generate(n, seed=31):
        parts = [{"type": "image_url", "image_url": {"url": png_url(im)}} for im in sample.images]
        question = f"{sample.question} Answer in JSON."
        bodies.append({"model": "nano", "temperature": 0, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]})  # fmt: skip
    return bodies


def structured(bodies: list[dict], seed: int) -> list[dict]:
    # a new seed per run: the response cache must not answer
    return [{**b, "seed": seed + i, "max_tokens": MAX_TOKENS, "ignore_eos": False, "response_format": RESPONSE_FORMAT}
            for i, b in enumerate(bodies)]  # fmt: skip


def plain(bodies: list[dict], lengths: list[int], seed: int) -> list[dict]:
    return [{**b, "seed": seed + i, "max_tokens": max(n, 2), "ignore_eos": True} for i, (b, n) in enumerate(zip(bodies, lengths))]


class Refused(Exception):
    """The server answered a request with an error (e.g. response_format not supported yet)."""


async def run(url: str, requests: list[dict], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:

        async def one(body: dict) -> dict:
            async with gate:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
            data = response.json()
            if response.status_code != 200:
                raise Refused(f"HTTP {response.status_code}: {data.get('error', data)}")
            return data

        start = time.perf_counter()
        answers = await asyncio.gather(*[one(b) for b in requests])
        wall = time.perf_counter() - start
    lengths = [a["usage"]["completion_tokens"] for a in answers]
    tpots = [1.0 / a["timings"]["decode_tokens_per_s"] for a in answers if a["timings"].get("decode_tokens_per_s")]
    valid = 0
    for answer in answers:
        try:
            jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return {
        "lengths": lengths,
        "tokens_per_s": sum(lengths) / wall,
        "tpot_ms": 1000 * statistics.fmean(tpots) if tpots else float("nan"),
        "valid_json": valid,
        "finish": sorted({a["choices"][0]["finish_reason"] for a in answers}),
        "sample": answers[0]["choices"][0]["message"]["content"],
    }


def level(url: str, bodies: list[dict], concurrency: int, rounds: int, seed: int) -> dict:
    withs, withouts = [], []
    for k in range(rounds):
        schema_run = asyncio.run(run(url, structured(bodies, seed + 2 * k * 1000), concurrency))
        withs.append(schema_run)
        withouts.append(asyncio.run(run(url, plain(bodies, schema_run["lengths"], seed + (2 * k + 1) * 1000), concurrency)))

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    w_tps, o_tps, w_tpot, o_tpot = median(withs, "tokens_per_s"), median(withouts, "tokens_per_s"), median(withs, "tpot_ms"), median(withouts, "tpot_ms")  # fmt: skip
    return {
        "concurrency": concurrency, "requests": len(bodies), "rounds": rounds,
        "mean_tokens": round(statistics.fmean(n for r in withs for n in r["lengths"]), 1),
        "tokens_per_s_with": round(w_tps, 1), "tokens_per_s_without": round(o_tps, 1), "tokens_per_s_ratio": round(w_tps / o_tps, 3),
        "tpot_ms_with": round(w_tpot, 3), "tpot_ms_without": round(o_tpot, 3), "tpot_ratio": round(w_tpot / o_tpot, 3),
        "valid_json": f"{sum(r['valid_json'] for r in withs)}/{len(bodies) * rounds}",
        "finish_reasons": sorted({f for r in withs for f in r["finish"]}), "sample": withs[-1]["sample"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16, help="requests per run at concurrency 1 (twice that at 16)")
    parser.add_argument("--model", default="nano", help="nano (packaged) or a nano-layout checkpoint directory")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, ["--model", args.model, "--served-model-name", "nano", "--max-queue", "256", "--max-batch-size", "16"])  # fmt: skip
    rows = []
    try:
        bodies = base_bodies(2 * args.requests)
        try:
            # Warm-up: compiles the schema once (then cached) and warms the model at both levels.
            asyncio.run(run(url, structured(bodies[:16], 10**6), 16))
        except Refused as refused:
            # The engine integration is not there yet: measure the requests without a schema,
            # so the script is known to work up to the structured half.
            print(f"the server refused response_format json_schema: {refused}")
            print(f"without a schema only ({MAX_TOKENS} tokens, ignore_eos), for reference:")
            for concurrency in LEVELS:
                subset = bodies[: args.requests] if concurrency == 1 else bodies
                r = asyncio.run(run(url, plain(subset, [MAX_TOKENS] * len(subset), 7 * 10**6 + concurrency), concurrency))
                print(f"  concurrency {concurrency:>2}: {r['tokens_per_s']:.1f} output tok/s, mean TPOT {r['tpot_ms']:.2f} ms")
            raise SystemExit(1) from None
        for concurrency in LEVELS:
            subset = bodies[: args.requests] if concurrency == 1 else bodies
            rows.append(level(url, subset, concurrency, args.rounds, seed=concurrency * 10**5))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"nano, response_format json_schema (16 integers, compact JSON) vs none, same output lengths; medians of {args.rounds} rounds")
    print(f"{'conc.':>5} {'tokens':>6} {'out tok/s with':>14} {'without':>8} {'ratio':>6} {'TPOT ms with':>12} {'without':>8} {'ratio':>6} {'valid JSON':>10}  finish")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['mean_tokens']:>6} {r['tokens_per_s_with']:>14} {r['tokens_per_s_without']:>8} {r['tokens_per_s_ratio']:>6} "
              f"{r['tpot_ms_with']:>12} {r['tpot_ms_without']:>8} {r['tpot_ratio']:>6} {r['valid_json']:>10}  {','.join(r['finish_reasons'])}")  # fmt: skip
    print(f"sample answer: {rows[-1]['sample'][:200]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "structured_overhead", "schema": SCHEMA, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
