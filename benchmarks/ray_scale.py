"""Evaluation over Ray workers against one process, side by side in one run (issue 20).

The same ``synth`` samples (nano, greedy) are answered by ``vlmlab eval``'s runner in this
process, then by N Ray actors each holding nano (``--ray --workers N``, one CPU each, on a local
cluster), alternating over rounds so both see the same machine. Each round writes a fresh results
folder; the figure is samples/s (answered samples / the runner's own wall time, the models'
loading left out), the median over rounds, and the ratio N workers / one process. Every round's
answers are checked equal to the first one-process round's.

Goal (issue 20): 2 workers / 1 process >= 1.7x on this 2-core machine.

Before (Session 6): 0.74-0.78x; the driver drew each synthetic image, hashed it for the resume
key and pickled each request to an actor, one Ray call per sample, competing with the two
actors for the two cores. Profiled then (one core, per sample): drawing 0.15 ms, prompt and
digest 0.05 ms, key 0.02 ms, pickling 0.04 ms (40 kB), nano's answer ~4 ms (3.8 ms with two
torch threads, 4.1 ms with one): the data work was small, the per-sample Ray calls were not.

Now (``vlmlab.eval.ray_share``): each worker opens the dataset itself and answers ranges of
``batch_size`` positions (two per worker in flight, handed to the least busy), building the
prompts and keys with the driver's code and returning only the result records; the driver
writes each range with one fsync. Its CPU time for 200 samples went from ~1.5 s to ~0.06 s.

Threads: the one-process side runs torch with its default threads (one per core, 2 here), the
way ``vlmlab eval`` runs; each Ray worker gets ``OMP_NUM_THREADS=1`` from its one CPU, so torch
uses one thread per worker. Both sides use the whole machine; the line "threads" shows it.

    .venv/bin/python benchmarks/ray_scale.py [--samples 200] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from vlmlab.engines import load_engine
from vlmlab.eval.datasets import get_dataset, load_samples
from vlmlab.eval.runner import EvalConfig, run_dataset


def answers(folder: Path) -> dict[str, str]:
    lines = (folder / "nano" / "synth.jsonl").read_text().splitlines()
    return {r["key"]: r["prediction"] for r in map(json.loads, lines)}


def one_round(engine, samples: int, root: Path, name: str) -> tuple[float, dict[str, str]]:
    config = EvalConfig(("nano",), ("synth",), root / name, device="cpu", limit=samples, progress=False)
    spec = get_dataset("synth")
    rows, info = load_samples(spec, None, samples)
    run = asyncio.run(run_dataset(engine, "nano", spec, rows, dict(info), config))
    return run.answered / run.seconds, answers(root / name)


def torch_threads(engine, scratch) -> int:  # runs in a worker (pickled by value from __main__)
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    from vlmlab.engines.ray_pool import RayEnginePool

    spec = EvalConfig(("nano",), ("synth",), Path("."), device="cpu").engine_spec("nano")
    local = load_engine(spec)
    ray.init(address="local", num_cpus=args.workers, log_to_driver=False)  # a fresh cluster, never one found running
    pool = RayEnginePool(spec, args.workers)
    import torch

    threads = f"one process {torch.get_num_threads()}, each worker {asyncio.run(pool.call_each(torch_threads))}"
    rates: dict[str, list[float]] = {"one process": [], f"{args.workers} Ray workers": []}
    reference: dict[str, str] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_round(local, 16, root, "warm-local")  # first-request costs out of the figures
        one_round(pool, 16, root, "warm-ray")
        for number in range(args.rounds):
            for label, engine in (("one process", local), (f"{args.workers} Ray workers", pool)):
                rate, got = one_round(engine, args.samples, root, f"{label}-{number}".replace(" ", "-"))
                reference = reference or got
                assert got == reference, f"{label}: answers differ from the one-process run"
                rates[label].append(rate)
    pool.close()
    local.close()
    one, many = (statistics.median(v) for v in rates.values())
    print(f"nano, synth x {args.samples} samples, greedy; medians of {args.rounds} rounds (answers equal in every round)")
    print(f"  torch threads: {threads}")
    for label, values in rates.items():
        print(f"  {label:>14}: {statistics.median(values):7.1f} samples/s  (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  ratio {args.workers} workers / one process: {many / one:.2f}x  (goal >= 1.7x)")


if __name__ == "__main__":
    main()
