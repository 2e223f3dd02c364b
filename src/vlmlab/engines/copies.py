"""``--data-parallel-size auto``: how many copies of a model to run side by side, from the
weights' size, the device and the machine's cores and memory, with the reason in words (printed
at start-up and in ``/stats``).

The rule, from what was measured on nano (2.5M parameters) on 2 cores:

- on a GPU, one copy: it already runs requests in parallel;
- a small model (weights up to ``small_bytes``) is dispatch-bound: a second thread inside one
  copy adds synchronisation, a second copy adds a whole decoder. One copy per core, one thread
  each, as many as memory allows (hf, 16 concurrent: output tok/s 4.3-5.6x one request's with
  two copies against 3.6x with one; llamacpp: 1.31-1.55x one copy's, ``benchmarks/llamacpp.py``);
- a large model is bound by its matrix products, which use every core from one copy, and a
  second copy would double the memory: one copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlmlab.units import format_bytes


@dataclass(frozen=True)
class CopyPlan:
    """How many copies, threads per copy (None: the engine's own default), and why (the reason
    alone, without the count: ``"{copies} copies: {reason}"`` reads as a sentence)."""

    copies: int
    threads: int | None
    reason: str


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_copies(
    weight_bytes: int | None,
    *,
    on_gpu: bool,
    per_copy_bytes: int,
    small_bytes: int,
    cpus: int | None = None,
    memory: int | None = None,
    max_copies: int = 8,
) -> CopyPlan:
    """The copies for a model of ``weight_bytes`` (None: unknown), each needing
    ``per_copy_bytes`` of memory, at most ``max_copies``; ``cpus`` and ``memory`` default to
    this machine's."""
    cpus = cpus or available_cpus()
    if on_gpu:
        return CopyPlan(1, None, "the GPU runs its requests in parallel")
    if weight_bytes is None:
        return CopyPlan(1, None, "the weights' size is unknown")
    size = format_bytes(weight_bytes)
    if weight_bytes > small_bytes:
        return CopyPlan(1, None, f"{size} of weights: its matrix products use every core from one copy")
    if cpus < 2:
        return CopyPlan(1, 1, "one CPU")
    memory = memory if memory is not None else available_memory()
    wanted = min(cpus, max_copies)
    fits = wanted if memory is None else max(1, min(wanted, memory // max(1, per_copy_bytes)))
    if fits < wanted:
        return CopyPlan(fits, 1, f"{size} of weights is small, but memory holds only {fits} copies, not one per CPU ({cpus})")
    if wanted < cpus:
        return CopyPlan(wanted, max(1, (cpus - 1) // wanted), f"{size} of weights is small (dispatch-bound): copies decode more than threads in one copy (at most {max_copies})")
    return CopyPlan(cpus, 1, f"{size} of weights is small (dispatch-bound): a copy per CPU decodes more than threads in one copy")


def folder_weight_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of the weight files in a checkpoint folder (``*.safetensors``, ``*.bin``), or of a
    single file (a GGUF); None when there are none."""
    where = Path(path)
    if where.is_file():
        return where.stat().st_size
    if not where.is_dir():
        return None
    total = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.gguf") for p in where.glob(pattern))
    return total or None
