"""The nano model's synthetic tasks as a benchmark (key ``synth``), fully offline.

500 held-out samples from :func:`vlmlab.nano.evaluate.eval_samples` (seed 0, i.e. generator
seed ``EVAL_SEED_BASE``: outside the training seeds), dealt round-robin over the task types, so
any ``--limit`` prefix stays balanced. The prompt is the nano chat's: the images, then the
question (``vlmlab.nano.data.sample_chat``); answers are short canonical strings scored by exact
match, 6 new tokens (``vlmlab.nano.evaluate.predict``). Categories are the task types.
The revision is a hash of the generator's source, so a changed generator is a new dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmlab.eval.datasets.base import Benchmark, Row
from vlmlab.eval.types import EvalSample
from vlmlab.nano import tasks
from vlmlab.nano.evaluate import EVAL_SEED_BASE

SIZE = 500  # vlmlab.nano.evaluate.evaluate_model default n
SEED = 0  # eval seed 0 -> generator seed EVAL_SEED_BASE


def _revision() -> str:
    source = Path(tasks.__file__).read_bytes()
    return f"nano-tasks:{hashlib.sha256(source).hexdigest()[:16]}:seed={EVAL_SEED_BASE + SEED}"


def generate(limit: int | None) -> Iterator[dict[str, Any]]:
    """Rows for the first ``min(limit, 500)`` samples, generated one at a time."""
    n = SIZE if limit is None else min(limit, SIZE)
    for sample in tasks.iter_samples(n, seed=EVAL_SEED_BASE + SEED):
        yield {
            "id": sample.id,
            "task": sample.task,
            "images": sample.images,
            "question": sample.question,
            "answer": sample.answer,
        }


def from_row(row: Row, index: int) -> EvalSample:
    return EvalSample(
        id=str(row["id"]),
        images=[image.convert("RGB") for image in row["images"]],
        question=str(row["question"]),
        answers=[str(row["answer"])],
        fields={"task": row["task"], "category": row["task"]},
    )


def _prompt(sample: EvalSample) -> list[str | int]:
    return [*range(len(sample.images)), sample.question]


SPEC = Benchmark(
    key="synth",
    hf_id="vlmlab.nano.tasks",
    split=f"seed={EVAL_SEED_BASE + SEED}",
    expected_rows=SIZE,
    metric="exact_match",
    # "official" exact match strips and lower-cases both sides; the canonical answers are
    # lower-case already, so this is the nano evaluator's ``pred.strip() == answer`` up to case.
    default_mode="official",
    max_tokens=6,  # vlmlab.nano.evaluate.predict max_new_tokens
    from_row=from_row,
    image_columns=("images",),
    generate=generate,
    fixed_revision=_revision(),
    prompts={"default": _prompt},
    source="vlmlab.nano.tasks (generated; see vlmlab.nano.evaluate.eval_samples)",
)
