"""Train the nano checkpoint on the procedural tasks, resumably, within a step or time budget.

Recipe (from a CPU spike, transformers 5.23): AdamW at 3e-4 (>= 1e-3 made the model ignore the
image), init std 0.06, batches of similar length, several questions about one image packed as
a multi-turn chat with loss on answer tokens only, a constant rate then a linear decay over the
last 25% of the budget. The budget is steps or minutes, whichever ends first; elapsed training
time is part of the checkpoint so a resumed run continues the same schedule.

Output directory layout::

    base/          the untrained HF checkpoint the run started from (tokenizer, processor)
    state.pt       model + optimizer + schedule + step + data position + RNG (atomic replace)
    best/          HF export of the best held-out mean accuracy so far
    metrics.jsonl  one JSON line per evaluation
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.nano.tasks import TASKS

log = logging.getLogger("vlmlab.nano.train")

# Harder tasks appear more often; colour / shape / position share images (and packed turns).
DEFAULT_MIX: tuple[str, ...] = (
    "color", "shape", "position", "count", "count", "ocr", "ocr", "chart_value", "chart_value",
    "chart_extreme", "document", "document", "compare_count", "compare_color",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a run needs; saved in the checkpoint so ``--resume`` reuses it."""

    out: str = "nano-run"
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    decay_frac: float = 0.25
    warmup_steps: int = 50
    seed: int = 0
    tasks: tuple[str, ...] = DEFAULT_MIX
    max_extra_turns: int = 6  # questions beyond the first are nearly free: the image is shared
    pool_batches: int = 8  # batches built at once and grouped by length
    eval_every: int = 500
    eval_n: int = 300
    checkpoint_minutes: float = 5.0
    threads: int = 2
    data_workers: int = 0  # processes building pools ahead of the trainer (0: in-process)
    arch: dict[str, int] = field(default_factory=dict)  # NanoArch overrides for a new run
    grow_from: str | None = None  # a new run starts from this checkpoint, vision tower deepened
    device: str | None = None
    bf16: bool = True
    export: str | None = None
    log_every: int = 50
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class BudgetSchedule:
    """Learning rate from the fraction of the budget used (steps or seconds, whichever is
    further along): a short warm-up, constant, then linear decay to 0 over ``decay_frac``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.step = 0
        self.elapsed_s = 0.0

    def progress(self) -> float:
        p = 0.0
        if self.cfg.steps:
            p = max(p, self.step / self.cfg.steps)
        if self.cfg.minutes:
            p = max(p, self.elapsed_s / (60 * self.cfg.minutes))
        return p

    def done(self) -> bool:
        return self.progress() >= 1.0

    def lr(self) -> float:
        base = self.cfg.lr * min(1.0, (self.step + 1) / max(1, self.cfg.warmup_steps))
        p = self.progress()
        start = 1.0 - self.cfg.decay_frac
        return base if p < start else base * max(0.0, (1.0 - p) / self.cfg.decay_frac)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_export(model: Any, processor: Any, target: Path) -> None:
    """HF export into ``target``, replacing it only once the new copy is complete."""
    from vlmlab.nano.build import save_checkpoint

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, processor, tmp)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def forward_loss(model: Any, batch: dict[str, Any], per_image: bool = True) -> Any:
    """The model's training loss, with the vision tower run one image at a time.

    Same result as ``model(**batch).loss`` (a test checks it), but faster on a CPU: Pixtral's
    tower concatenates a batch's patches into one sequence with a block-diagonal mask, whose
    attention cost grows with the square of the whole batch's patch count. On a GPU that
    quadratic term is cheap and one call beats dozens of small launches: ``per_image=False``.
    """
    import torch

    if not per_image:
        return model(**batch).loss

    inner = model.model
    tower = inner.vision_tower
    feats = []
    for pix, (h, w) in zip(batch["pixel_values"], batch["image_sizes"].tolist()):
        out = tower(pix[None, :, :h, :w], image_sizes=torch.tensor([[h, w]]))
        feats.append(out.last_hidden_state[0])
    image_features = inner.multi_modal_projector(torch.cat(feats))
    ids = batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, image_features.to(embeds.dtype))
    return model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


def build_pool(processor: Any, cfg: TrainConfig, pad_id: int, start: int) -> list[dict[str, Any]]:
    """``pool_batches`` batches from samples ``start, ...``, grouped by length and shuffled;
    a function of ``(seed, start)`` only, so a resumed run rebuilds the same pool."""
    from vlmlab.nano.data import collate, encode_training
    from vlmlab.nano.tasks import make_sample

    n = cfg.batch_size * cfg.pool_batches
    encoded = []
    for i in range(start, start + n):
        sample = make_sample(i, seed=cfg.seed, tasks=cfg.tasks)
        encoded.append(
            encode_training(sample, processor, random.Random(f"{cfg.seed}:{i}"), cfg.max_extra_turns)
        )
    encoded.sort(key=lambda e: len(e.input_ids))
    batches = [collate(encoded[k : k + cfg.batch_size], pad_id) for k in range(0, n, cfg.batch_size)]
    random.Random(f"{cfg.seed}:pool:{start}").shuffle(batches)
    return batches


class _Pools:
    """Map-style dataset: item ``k`` is the pool that starts at sample ``k * pool size``. Each
    worker process loads the processor once, on its first item."""

    def __init__(self, base: Path, cfg: TrainConfig, pad_id: int) -> None:
        self.base, self.cfg, self.pad_id = base, cfg, pad_id
        self.processor: Any = None

    def __getitem__(self, k: int) -> list[dict[str, Any]]:
        if self.processor is None:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.base)
        start = k * self.cfg.batch_size * self.cfg.pool_batches
        return _half_pixels(build_pool(self.processor, self.cfg, self.pad_id, start))


def _half_pixels(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pixels in fp16: half the shared memory in flight from the workers (the trainer casts
    back to fp32; bf16 autocast rounds further anyway)."""
    for batch in pool:
        batch["pixel_values"] = batch["pixel_values"].half()
    return pool


def _pool_loader(base: Path, cfg: TrainConfig, pad_id: int, first: int) -> Any:
    """Pools ``first, first + 1, ...`` built by ``cfg.data_workers`` processes, in order,
    handed over in shared memory (torch's DataLoader, one pool per item, no collation)."""
    import itertools

    from torch.utils.data import DataLoader

    return DataLoader(
        _Pools(base, cfg, pad_id), batch_size=None, sampler=itertools.count(first),
        num_workers=cfg.data_workers, prefetch_factor=2, persistent_workers=False,
        multiprocessing_context="spawn",
    )  # fmt: skip


class Trainer:
    """Holds the model, optimizer, schedule and data position of one run."""

    def __init__(self, cfg: TrainConfig) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from vlmlab.nano.build import NanoArch, build_checkpoint, grow_checkpoint
        from vlmlab.protocol.errors import ConfigError

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        base = self.out / "base"
        if not (base / "config.json").exists() and cfg.grow_from:
            # Keep what a trained checkpoint knows; add vision layers (block expansion).
            layers = cfg.arch.get("vision_layers")
            if not layers:
                raise ConfigError("--grow-from needs --arch vision_layers=N (more than the checkpoint has)")
            grow_checkpoint(cfg.grow_from, base, vision_layers=layers, seed=cfg.seed)
        elif not (base / "config.json").exists():
            build_checkpoint(base, seed=cfg.seed, arch=NanoArch(**cfg.arch))
        self.processor = AutoProcessor.from_pretrained(base)
        self.model = AutoModelForImageTextToText.from_pretrained(base).to(self.device)
        self.model.train()
        self.pad_id = self.processor.tokenizer.convert_tokens_to_ids("<pad>")
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
        )
        self.sched = BudgetSchedule(cfg)
        self.next_index = 0  # first generator index after the current pool
        self.pool_start = 0  # first generator index of the current pool
        self.pool_used = 0  # batches of the current pool already trained on
        self.rng = random.Random(cfg.seed)
        self.best = -1.0
        self.queue: list[dict[str, Any]] = []  # the current pool (rebuilt lazily on resume)
        self._feed: Any = None  # iterator over pools built by worker processes
        self._feed_next = -1  # the pool start that iterator yields next
        state = self.out / "state.pt"
        if state.exists():
            self.load(state)

    # -- state ------------------------------------------------------------------------------
    def save(self) -> None:
        import torch

        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedule": self.sched.state_dict(),
            "next_index": self.next_index,
            "pool_start": self.pool_start,
            "pool_used": self.pool_used,
            "best": self.best,
            "python_rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "config": asdict(self.cfg),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        _atomic_save(state, self.out / "state.pt")

    def load(self, path: Path) -> None:
        import torch

        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        self.next_index = state["next_index"]
        # older states had no pool position: start a fresh pool after the last one
        self.pool_start = state.get("pool_start", self.next_index)
        self.pool_used = state.get("pool_used", 0)
        if self.pool_used:
            self.queue = self._build_pool(self.pool_start)
        self.best = state.get("best", -1.0)
        self.rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        log.info("resumed from %s at step %d", path, self.sched.step)

    # -- data -------------------------------------------------------------------------------
    def _build_pool(self, start: int) -> list[dict[str, Any]]:
        """The pool of batches for samples ``start, ...`` (see :func:`build_pool`), with pixels
        in fp16 when worker processes build the others, so a resumed pool matches theirs."""
        pool = build_pool(self.processor, self.cfg, self.pad_id, start)
        return _half_pixels(pool) if self.cfg.data_workers > 0 else pool

    def _pool_at(self, start: int) -> list[dict[str, Any]]:
        """The pool at ``start``: from the worker processes when they are building pools
        (they run ahead, in order), else built here. Same batches either way."""
        n = self.cfg.batch_size * self.cfg.pool_batches
        if self.cfg.data_workers <= 0 or start % n:
            return self._build_pool(start)
        if self._feed is None or self._feed_next != start:
            self._feed = iter(_pool_loader(self.out / "base", self.cfg, self.pad_id, start // n))
        self._feed_next = start + n
        return next(self._feed)

    def next_batch(self) -> dict[str, Any]:
        if self.pool_used >= len(self.queue):
            if self.queue:
                self.pool_start = self.next_index
            self.queue = self._pool_at(self.pool_start)
            self.next_index = self.pool_start + self.cfg.batch_size * self.cfg.pool_batches
            self.pool_used = 0
        batch = self.queue[self.pool_used]
        self.pool_used += 1
        return batch

    # -- loop -------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> float:
        import torch

        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].float()
        for g in self.opt.param_groups:
            g["lr"] = self.sched.lr()
        use_bf16 = self.cfg.bf16
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = forward_loss(self.model, batch, per_image=self.device.type == "cpu")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step += 1
        return loss.detach().item()

    def evaluate(self) -> dict[str, float]:
        from vlmlab.nano.evaluate import evaluate_model

        tasks = [t for t in TASKS if t in self.cfg.tasks]
        return evaluate_model(self.model, self.processor, n=self.cfg.eval_n, seed=0, tasks=tasks)

    def run(self) -> dict[str, float]:
        """Train until the budget is spent; returns the last evaluation."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        last_ckpt = time.monotonic()
        acc: dict[str, float] = {}
        losses: list[float] = []
        progress = Progress(
            TextColumn("nano"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("step {task.fields[step]} loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(), disable=not self.cfg.progress,
        )  # fmt: skip
        with progress:
            bar = progress.add_task("train", total=1000, step=self.sched.step, loss=0.0)
            while not self.sched.done():
                t0 = time.monotonic()
                losses.append(self.train_step(self.next_batch()))
                self.sched.elapsed_s += time.monotonic() - t0
                step = self.sched.step
                progress.update(bar, completed=int(1000 * min(1.0, self.sched.progress())),
                                step=step, loss=losses[-1])  # fmt: skip
                if step % self.cfg.log_every == 0:
                    log.info(
                        "step %d loss %.4f lr %.2e elapsed %.1f min", step,
                        sum(losses) / len(losses), self.sched.lr(), self.sched.elapsed_s / 60,
                    )  # fmt: skip
                    losses.clear()
                if step % self.cfg.eval_every == 0:
                    acc = self._eval_and_keep_best()
                if time.monotonic() - last_ckpt > 60 * self.cfg.checkpoint_minutes:
                    self.save()
                    last_ckpt = time.monotonic()
        self._feed = None  # stops the data workers
        acc = self._eval_and_keep_best()
        self.save()
        if self.cfg.export:
            _atomic_export(self.model, self.processor, Path(self.cfg.export))
            log.info("exported final checkpoint to %s", self.cfg.export)
        return acc

    def _eval_and_keep_best(self) -> dict[str, float]:
        acc = self.evaluate()
        record = {"step": self.sched.step, "elapsed_min": round(self.sched.elapsed_s / 60, 2), **acc}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("eval %s", " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in record.items()))  # fmt: skip
        if acc["mean"] > self.best:
            self.best = acc["mean"]
            _atomic_export(self.model, self.processor, self.out / "best")
            (self.out / "best" / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        self.save()
        return acc


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train (or resume, when ``cfg.out/state.pt`` exists) and return the final held-out accuracy.

    Raises:
        ConfigError: neither ``steps`` nor ``minutes`` is set, or an unknown task name.
    """
    from vlmlab.nano.tasks import _check_tasks
    from vlmlab.protocol.errors import ConfigError

    if not cfg.steps and not cfg.minutes:
        raise ConfigError("give a budget: steps (--steps N) and/or minutes (--minutes M)")
    _check_tasks(cfg.tasks)
    return Trainer(cfg).run()


def _parse(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="python -m vlmlab.nano.train",
        description="Train the vlmlab nano VLM on procedural tasks (resumes from --out/state.pt).",
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, best/)")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--minutes", type=float, help="stop after this much training time in total")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", help=f"comma-separated task mix (default weighted; from {TASKS})")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out evals")
    p.add_argument("--eval-n", type=int, default=300, help="held-out samples per evaluation")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes that build batches ahead of the trainer (for a GPU run)")
    p.add_argument("--arch", default="",
                   help="model sizes for a new run, e.g. vision_layers=4,vision_hidden=192")
    p.add_argument("--grow-from", help="start a new run from this checkpoint with --arch vision_layers=N")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (no bf16 autocast)")
    p.add_argument("--export", help="write the final HF checkpoint here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return TrainConfig(
        out=a.out, steps=a.steps, minutes=a.minutes, batch_size=a.batch_size, lr=a.lr,
        seed=a.seed, tasks=tuple(a.tasks.split(",")) if a.tasks else DEFAULT_MIX,
        eval_every=a.eval_every, eval_n=a.eval_n, checkpoint_minutes=a.checkpoint_minutes,
        threads=a.threads, data_workers=a.data_workers, arch=parse_arch(a.arch), device=a.device,
        grow_from=a.grow_from,
        bf16=not a.no_bf16, export=a.export,
        progress=not a.no_progress,
    )  # fmt: skip


def parse_arch(text: str) -> dict[str, int]:
    """``"vision_layers=4,vision_hidden=192"`` -> a dict of NanoArch overrides (names checked)."""
    from dataclasses import fields

    from vlmlab.nano.build import NanoArch
    from vlmlab.protocol.errors import ConfigError

    known = {f.name for f in fields(NanoArch) if f.type in ("int", int)}
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value.strip().isdigit():
            raise ConfigError(f"bad --arch item {item!r}: use NAME=INT with NAME one of {sorted(known)}")
        out[key] = int(value)
    return out


def flush_denormals() -> None:
    """Tiny late-training values (Adam moments, small activations) must not hit the slow denormal
    path on CPU; flushing them to zero changes nothing measurable in training. Process-wide, so
    only the training entry points call it, never library code (it breaks float-exact work,
    e.g. hypothesis's subnormal checks, in the same process)."""
    import torch

    torch.set_flush_denormal(True)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    flush_denormals()
    acc = train(_parse(argv))
    print(json.dumps(acc, indent=2))


if __name__ == "__main__":
    main()
