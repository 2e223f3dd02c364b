"""Held-out exact-match accuracy of a nano checkpoint, per task type.

Questions come fresh from :mod:`vlmlab.nano.tasks` with a seed outside the training range
(training uses seeds below :data:`EVAL_SEED_BASE`), answered by greedy decoding with
transformers directly, in batches of similar length.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmlab.nano.data import question_prompt
from vlmlab.nano.tasks import Sample, generate

EVAL_SEED_BASE = 1_000_000  # training seeds are < this; eval seed s draws from EVAL_SEED_BASE + s


def predict(
    model: Any, processor: Any, samples: Sequence[Sample], batch_size: int = 32, max_new_tokens: int = 6
) -> list[str]:
    """Greedy answers (stripped text) for ``samples``, in order."""
    import torch

    order = sorted(range(len(samples)), key=lambda i: sum(im.width * im.height for im in samples[i].images))
    preds: list[str] = [""] * len(samples)
    device = next(model.parameters()).device
    eos = processor.tokenizer.convert_tokens_to_ids("</s>")
    pad = processor.tokenizer.convert_tokens_to_ids("<pad>")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = [samples[i] for i in order[start : start + batch_size]]
            enc = processor(
                text=[question_prompt(s) for s in chunk],
                images=[s.images for s in chunk],
                padding=True,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                    pad_token_id=pad,
                )  # fmt: skip
            new = out[:, enc["input_ids"].shape[1] :]
            texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, t in zip(order[start : start + batch_size], texts):
                preds[i] = t.strip()
    finally:
        model.train(was_training)
    return preds


def score(samples: Sequence[Sample], preds: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per task plus ``mean`` (the unweighted mean over tasks)."""
    hits: dict[str, list[int]] = defaultdict(list)
    for s, p in zip(samples, preds):
        hits[s.task].append(int(p == s.answer))
    acc = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    acc["mean"] = sum(acc.values()) / len(acc) if acc else 0.0
    return acc


def eval_samples(n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[Sample]:
    """``n`` held-out samples (round-robin over tasks) for eval seed ``seed``."""
    return generate(n, seed=EVAL_SEED_BASE + seed, tasks=tasks)


def evaluate_model(
    model: Any, processor: Any, n: int = 500, seed: int = 0, batch_size: int = 32,
    tasks: Sequence[str] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Per-task exact-match accuracy of an in-memory model on ``n`` held-out samples."""
    samples = eval_samples(n, seed, tasks)
    return score(samples, predict(model, processor, samples, batch_size))


def evaluate(
    model_dir: str | Path | None = None, n: int = 500, seed: int = 1, batch_size: int = 32,
    tasks: Sequence[str] | None = None, device: str | None = None,
) -> dict[str, float]:  # fmt: skip
    """Held-out exact-match accuracy per task type of the checkpoint in ``model_dir``.

    Inputs: the checkpoint (default: the packaged one), how many samples (round-robin over the
    tasks, so ``n / len(tasks)`` each), the eval seed (default 1: training picks its best
    checkpoint on eval seed 0, so seed 1 is untouched by selection), the batch size, a task
    subset, a device.
    Outputs: ``{task: accuracy, ..., "mean": unweighted mean}``.
    Raises:
        ConfigError: the directory holds no checkpoint, or an unknown task name.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmlab.nano import checkpoint_path
    from vlmlab.protocol.errors import ConfigError

    path = Path(model_dir) if model_dir is not None else checkpoint_path()
    if not (path / "config.json").exists():
        raise ConfigError(
            f"no nano checkpoint in {path} (config.json missing); build one with "
            "`python -m vlmlab.nano.train --export DIR`"
        )
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).to(dev)
    return evaluate_model(model, processor, n=n, seed=seed, batch_size=batch_size, tasks=tasks)


def main(argv: list[str] | None = None) -> None:
    """``python -m vlmlab.nano.evaluate [DIR] [--n N] [--seed S]``: print per-task accuracy."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m vlmlab.nano.evaluate", description=main.__doc__)
    p.add_argument("model_dir", nargs="?", help="checkpoint directory (default: the packaged one)")
    p.add_argument("--n", type=int, default=500, help="held-out samples, round-robin over tasks")
    p.add_argument("--seed", type=int, default=1, help="eval seed (training selects on seed 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tasks", help="comma-separated task subset")
    a = p.parse_args(argv)
    tasks = a.tasks.split(",") if a.tasks else None
    acc = evaluate(a.model_dir, n=a.n, seed=a.seed, batch_size=a.batch_size, tasks=tasks)
    print(json.dumps({k: round(v, 4) for k, v in acc.items()}, indent=2))


if __name__ == "__main__":
    main()
