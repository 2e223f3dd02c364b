"""fp32 vs torchao int8 weight-only on the transformers engine (CPU, nano), side by side.

Each variant runs in its own child process (so its peak RSS is its own), loads nano through
``load_engine`` (``extra={"quantization": "int8"}`` for int8), answers the same synthetic-task
questions greedily, then decodes ``--tokens`` tokens per request with ``ignore_eos`` one request
at a time and ``--batch`` at a time. Printed: decode tokens/s, weight bytes, peak RSS, load time,
accuracy and how often int8 answers exactly as fp32, with int8 / fp32 ratios.

    .venv/bin/python benchmarks/quantization.py [--requests 12] [--tokens 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import multiprocessing
import platform
import resource
import sys
import time
from typing import Any


def _requests(n: int, tokens: int, seed: int, exhaust: bool) -> tuple[list[Any], list[str]]:
    from vlmlab.engines import GenerationRequest
    from vlmlab.nano.tasks import generate
    from vlmlab.protocol.core import Chat, ImageData, ImagePart, SamplingParams

    out, answers = [], []
    for sample in generate(n, seed=seed):
        parts = []
        for im in sample.images:
            buf = io.BytesIO()
            im.save(buf, "PNG")
            data = ImageData(im, im.width, im.height, "PNG", hashlib.sha256(buf.getvalue()).hexdigest(), buf.tell())
            parts.append(ImagePart(ref=sample.id, data=data))
        sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=exhaust)
        out.append(GenerationRequest(Chat.single(sample.question, parts), sampling))
        answers.append(sample.answer)
    return out, answers


async def _decode(engine: Any, requests: list[Any], concurrency: int) -> dict[str, float]:
    from vlmlab.engines import complete

    gate = asyncio.Semaphore(concurrency)

    async def one(request: Any) -> Any:
        async with gate:
            return await complete(engine, request)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def run_variant(quantization: str | None, args: dict[str, Any], out: Any) -> None:
    """Child process: load, answer, decode; send the figures back through ``out``."""
    from vlmlab.engines import EngineSpec, complete, load_engine
    from vlmlab.engines.quantization import weight_bytes

    extra = {"quantization": quantization} if quantization else {}
    start = time.perf_counter()
    engine = load_engine(EngineSpec(model="nano", device="cpu", max_batch_size=args["batch"], extra=extra))
    load_s = time.perf_counter() - start
    questions, expected = _requests(args["questions"], 16, seed=1, exhaust=False)
    answers = [asyncio.run(complete(engine, r)).text.strip() for r in questions]
    decode, _ = _requests(args["requests"], args["tokens"], seed=2, exhaust=True)
    asyncio.run(_decode(engine, decode[:2], 1))  # warm-up: allocator, lazy imports, kernels
    single = asyncio.run(_decode(engine, decode, 1))
    batched = asyncio.run(_decode(engine, decode, args["batch"]))
    row = {
        "variant": quantization or "fp32",
        "dtype": engine.info().dtype,
        "load_s": load_s,
        "weight_bytes": weight_bytes(engine.model),
        "tokens_per_s_c1": single["tokens_per_s"],
        f"tokens_per_s_c{args['batch']}": batched["tokens_per_s"],
        "accuracy": sum(a.lower() == e.lower() for a, e in zip(answers, expected)) / len(expected),
        "answers": answers,
        # ru_maxrss: KiB on Linux, bytes on macOS
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
    }
    engine.close()
    out.send(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12, help="decode requests per level")
    parser.add_argument("--tokens", type=int, default=48, help="tokens decoded per request (ignore_eos)")
    parser.add_argument("--batch", type=int, default=8, help="concurrency of the batched level")
    parser.add_argument("--questions", type=int, default=40, help="synthetic questions for accuracy / agreement")
    parser.add_argument("--json", help="write the results here")
    args = vars(parser.parse_args())
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: its own peak RSS
    rows = []
    for quantization in (None, "int8"):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=run_variant, args=(quantization, args, send))
        child.start()
        rows.append(receive.recv())
        child.join()
    base, q = rows
    agree = sum(a == b for a, b in zip(base["answers"], q["answers"])) / len(base["answers"])
    batch_key = f"tokens_per_s_c{args['batch']}"
    print(f"nano on the transformers engine, CPU ({platform.processor() or platform.machine()}), torch threads = cores")
    print(f"{'':>22} {'fp32':>12} {'int8':>12} {'int8/fp32':>10}")
    for key, label, scale, fmt in (
        ("tokens_per_s_c1", "decode tok/s (1 req)", 1, "{:.1f}"),
        (batch_key, f"decode tok/s ({args['batch']} req)", 1, "{:.1f}"),
        ("weight_bytes", "weights MiB", 2**20, "{:.2f}"),
        ("peak_rss_bytes", "peak RSS MiB", 2**20, "{:.0f}"),
        ("load_s", "load s", 1, "{:.2f}"),
        ("accuracy", "accuracy", 1, "{:.2f}"),
    ):
        a, b = base[key] / scale, q[key] / scale
        print(f"{label:>22} {fmt.format(a):>12} {fmt.format(b):>12} {b / a if a else float('nan'):>10.2f}")
    print(f"{'same answer as fp32':>22} {agree:>25.2f}")
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump({"benchmark": "quantization", "settings": args, "rows": rows, "agreement": agree}, f, indent=2)


if __name__ == "__main__":
    main()
