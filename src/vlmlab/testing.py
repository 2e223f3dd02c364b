"""The model tester: ``vlmlab test-model MODEL`` / ``from vlmlab.testing import test_model``.

A quick end-to-end check that a model works behind vlmlab's engine interface: it loads, answers
one question per synthetic task type (the nano tasks: colour, shape, position, count, OCR, chart,
document, two-image), streams the same text it returns, takes several images in one prompt,
refuses a bad image with a clear error, and reports usage that adds up. It returns a report
(and the CLI prints it); it never raises for a failed check.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmlab.config import EngineSpec
from vlmlab.engines import Engine, GenerationRequest, complete, load_engine
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult, ImageData, ImagePart, SamplingParams
from vlmlab.protocol.errors import VlmlabError

__test__ = False  # not a pytest test module, despite the name


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0


@dataclass
class ModelReport:
    model: str
    engine: str
    family: str | None = None
    load_s: float = 0.0
    checks: list[Check] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "engine": self.engine,
            "family": self.family,
            "load_s": round(self.load_s, 3),
            "passed": self.passed,
            "checks": [c.__dict__ for c in self.checks],
            "answers": self.answers,
        }


def image_part(image: Any, label: str) -> ImagePart:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    return ImagePart(ref=label, data=ImageData(image, image.width, image.height, "PNG", digest, buf.tell()))


async def _stream_text(engine: Engine, request: GenerationRequest) -> tuple[str, GenerationResult | None]:
    pieces, result = [], None
    async for item in engine.generate(request):
        if isinstance(item, GenerationChunk):
            pieces.append(item.text)
        else:
            result = item
    return "".join(pieces), result


def _timed(report: ModelReport, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
    start = time.perf_counter()
    try:
        passed, detail = fn()
    except VlmlabError as exc:
        passed, detail = False, f"{type(exc).__name__}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - a tester reports every failure
        passed, detail = False, f"{type(exc).__name__}: {exc}"
    report.checks.append(Check(name, passed, detail, time.perf_counter() - start))


def test_model(spec: EngineSpec | str, max_tokens: int = 16, seed: int = 7) -> ModelReport:
    """Load ``spec`` and run the checks; returns the report (never raises for a failed check)."""
    from vlmlab.nano.tasks import TASKS, make_sample

    spec = EngineSpec(model=spec) if isinstance(spec, str) else spec
    report = ModelReport(model=spec.model, engine=spec.engine)
    start = time.perf_counter()
    try:
        engine = load_engine(spec)
    except VlmlabError as exc:
        report.checks.append(Check("load", False, exc.message, time.perf_counter() - start))
        return report
    report.load_s = time.perf_counter() - start
    info = engine.info()
    report.family = info.family
    report.checks.append(Check("load", True, f"{info.engine} on {info.device} ({info.dtype}), context {info.max_model_len}", report.load_s))
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)
    run = asyncio.run
    try:
        correct = 0
        for task in TASKS:
            sample = make_sample(0, seed=seed, tasks=[task])
            if len(sample.images) > info.max_images:
                continue
            parts = [image_part(im, f"{task}-{k}") for k, im in enumerate(sample.images)]
            request = GenerationRequest(Chat.single(sample.question, parts), greedy)
            result = run(complete(engine, request))
            ok = result.text.strip().lower() == sample.answer.lower()
            correct += ok
            report.answers.append({"task": task, "question": sample.question, "answer": result.text, "expected": sample.answer, "correct": ok})
        report.checks.append(Check("answers", True, f"{correct}/{len(report.answers)} synthetic tasks answered exactly"))

        first = make_sample(1, seed=seed, tasks=["color"])
        request = GenerationRequest(Chat.single(first.question, [image_part(first.images[0], "stream")]), greedy)

        def streaming() -> tuple[bool, str]:
            text, result = run(_stream_text(engine, request))
            plain = run(complete(engine, request))
            same = result is not None and text == result.text == plain.text
            return same, f"streamed {text!r}, returned {plain.text!r}"

        _timed(report, "streaming", streaming)

        def usage() -> tuple[bool, str]:
            result = run(complete(engine, request))
            counted = engine.count_prompt_tokens(request.chat)
            ok = (
                result.prompt_tokens == counted.prompt_tokens
                and result.image_tokens == counted.image_tokens > 0
                and 0 < result.completion_tokens <= max_tokens
            )
            return ok, f"prompt {result.prompt_tokens} (counted {counted.prompt_tokens}), image {result.image_tokens}, completion {result.completion_tokens}"

        _timed(report, "usage", usage)

        def multi_image() -> tuple[bool, str]:
            if info.max_images < 2:
                return True, f"skipped: the model takes {info.max_images} image per prompt"
            pair = make_sample(0, seed=seed, tasks=["compare_count"])
            parts = [image_part(im, f"pair-{k}") for k, im in enumerate(pair.images)]
            result = run(complete(engine, GenerationRequest(Chat.single(pair.question, parts), greedy)))
            singles = sum(engine.count_prompt_tokens(Chat.single("x", [p])).image_tokens for p in parts)
            return result.image_tokens >= singles - 8 and result.completion_tokens > 0, f"{len(parts)} images, {result.image_tokens} image tokens, answer {result.text!r}"

        _timed(report, "multi_image", multi_image)

        def bad_image() -> tuple[bool, str]:
            from vlmlab.media import load_image

            try:
                load_image(b"definitely not an image")
            except VlmlabError as exc:
                return exc.status_code == 400, f"refused with {exc.status_code}: {exc.message}"
            return False, "a non-image was accepted"

        _timed(report, "bad_image", bad_image)
    finally:
        engine.close()
    return report
