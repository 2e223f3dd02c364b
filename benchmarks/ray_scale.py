"""Evaluation over Ray workers against one process, side by side in one run (issue 20).

The same ``synth`` samples (nano, greedy) are answered by ``vlmlab eval``'s runner in this
process, then by N Ray actors each holding nano (``--ray --workers N``, one CPU each, on a local
cluster), alternating over rounds so both see the same machine. Each round writes a fresh results
folder; the figure is samples/s (answered samples / the runner's own wall time, the models'
loading left out), the median over rounds, and the ratio N workers / one process. Every round's
answers are checked equal to the first one-process round's.

Goal (issue 20): 2 workers / 1 process >= 1.7x on this 2-core machine.

Design (``vlmlab.eval.ray_share``): each worker opens the dataset itself and answers ranges of
``batch_size`` sample positions (two per worker in flight, each to the least busy worker),
building prompts and resume keys with the driver's code (``runner.SampleAnswerer``) and returning
only the result records; the driver writes each range with one fsync. This process's CPU per 100
samples fell from 0.14-0.20 s (driver sends each sample, ``--driver-sends``) to 0.03-0.04 s.
Profiled first (one core, per sample): drawing the image 0.15 ms, prompt and digest 0.05 ms, key
0.02 ms, pickling the request 0.04 ms (40 kB), against nano's ~4 ms (images cached) to ~10 ms (not):
the driver's data work was smaller than Session 6 thought, and it was never the main cost.

Image caches off (since this session): an eval sees each image once, but rounds here repeat the
same 200 samples, so with the engines' preprocess/encoder caches on, the one process hit them for
every sample from round 2 on (2.5x faster) while the Ray workers, handed other ranges each round,
hit them in part: the figure measured the caches, not the work. ``--cache`` keeps them on.

Threads: the hf engine gives nano one torch thread (``engines/hf``: it pays off best under 100M
parameters) and Ray gives each one-CPU worker ``OMP_NUM_THREADS=1``: one torch thread per model
copy on both sides ("torch threads" line). The one process still uses more than one core (images
are prepared and encoded on executor threads, prefills overlap decoding on another thread); a
one-CPU worker loads the hf engine without that prefill overlap (``ray_pool.worker_spec``: pinned
to one core, 9.2 ms of CPU per sample instead of 10.5 ms).

Measured (Session 7, 200 samples x 3 rounds, nothing else running; the load average of 3 is
this script's own cluster and the benchmark that ran just before it):

    one process 89.5 samples/s, 2 Ray workers 156.0/s: 1.74x (goal >= 1.7x);
    the old design (the driver sends the samples) 122.8/s, 1.37x.
    The driver's CPU per 100 samples: 0.03 s (it sends ranges), 0.15 s (it sends samples).

Earlier runs the same session, on a machine shared with other builds and benchmarks (load 2-6),
gave 0.92-1.60x: the ratio is about (cores the workers get) / (cores the one process uses,
1-1.4), so it needs the two cores free. Session 6 (driver sends, caches on): 0.74-0.78x.

    .venv/bin/python benchmarks/ray_scale.py [--samples 200] [--workers 2] [--rounds 3] [--driver-sends] [--cache]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from vlmlab.engines import load_engine
from vlmlab.eval.datasets import get_dataset, load_samples
from vlmlab.eval.runner import EvalConfig, ResultsFile, SampleAnswerer, _answer_here, run_dataset


def answers(folder: Path) -> dict[str, str]:
    lines = (folder / "nano" / "synth.jsonl").read_text().splitlines()
    return {r["key"]: r["prediction"] for r in map(json.loads, lines)}


async def driver_sends(engine, spec, rows, info, config) -> tuple[int, float]:
    """The runner's fallback (this process reads the samples and sends each request to a worker):
    the design before the workers read their own shares."""
    results = ResultsFile(Path(config.output_dir) / "nano" / f"{spec.key}.jsonl")
    answered = []
    start = time.perf_counter()
    answerer = SampleAnswerer(engine.info(), "nano", spec, info, config)
    await _answer_here(engine, answerer, rows, results, config, lambda records: (results.extend(records), answered.extend(records)))
    results.close()
    return len(answered), time.perf_counter() - start


def one_round(engine, samples: int, root: Path, name: str, sends: bool = False) -> tuple[float, float, dict[str, str]]:
    """Samples/s, this process's CPU seconds per 100 samples, the answers."""
    config = EvalConfig(("nano",), ("synth",), root / name, device="cpu", limit=samples, progress=False)
    spec = get_dataset("synth")
    rows, info = load_samples(spec, None, samples)
    cpu = time.process_time()
    if sends:
        answered, seconds = asyncio.run(driver_sends(engine, spec, rows, dict(info), config))
    else:
        run = asyncio.run(run_dataset(engine, "nano", spec, rows, dict(info), config))
        answered, seconds = run.answered, run.seconds
    return answered / seconds, (time.process_time() - cpu) * 100 / answered, answers(root / name)


def torch_threads(engine, scratch) -> int:  # runs in a worker (pickled by value from __main__)
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", action="store_true", help="keep the engines' image caches (later rounds hit them)")
    parser.add_argument("--driver-sends", action="store_true", help="also time the workers sent each sample by this process")
    args = parser.parse_args()

    import ray
    import torch

    from vlmlab.engines.ray_pool import RayEnginePool

    spec = EvalConfig(("nano",), ("synth",), Path("."), device="cpu").engine_spec("nano")
    if not args.cache:  # an eval sees each image once: rounds over the same samples must not hit
        spec = dataclasses.replace(spec, preprocess_cache_bytes=0)
    local = load_engine(spec)
    ray.init(address="local", num_cpus=args.workers, log_to_driver=False)  # a fresh cluster, never one found running
    pool = RayEnginePool(spec, args.workers)
    threads = f"one process {torch.get_num_threads()}, each worker {asyncio.run(pool.call_each(torch_threads))}"
    sides = [("one process", local, False), (f"{args.workers} Ray workers", pool, False)]
    if args.driver_sends:
        sides.append(("driver sends", pool, True))
    rates: dict[str, list[float]] = {label: [] for label, _, _ in sides}
    cpu: dict[str, list[float]] = {label: [] for label in rates}
    load = os.getloadavg()[0]
    reference: dict[str, str] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, engine, sends in sides:  # first-request costs out of the figures
            one_round(engine, 16, root, f"warm-{label}".replace(" ", "-"), sends)
        for number in range(args.rounds):
            for label, engine, sends in sides:
                rate, seconds, got = one_round(engine, args.samples, root, f"{label}-{number}".replace(" ", "-"), sends)
                reference = reference or got
                assert got == reference, f"{label}: answers differ from the one-process run"
                rates[label].append(rate)
                cpu[label].append(seconds)
    pool.close()
    local.close()
    one, many = (statistics.median(v) for v in list(rates.values())[:2])
    print(f"nano, synth x {args.samples} samples, greedy; medians of {args.rounds} rounds (answers equal in every round)")
    print(f"  torch threads: {threads}; load average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    for label, values in rates.items():
        print(
            f"  {label:>14}: {statistics.median(values):7.1f} samples/s  (rounds: {', '.join(f'{v:.1f}' for v in values)}); "
            f"CPU s per 100 samples in this process: {statistics.median(cpu[label]):.2f}"
        )
    print(f"  ratio {args.workers} workers / one process: {many / one:.2f}x  (goal >= 1.7x)")


if __name__ == "__main__":
    main()
