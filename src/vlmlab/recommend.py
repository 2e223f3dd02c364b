"""``vlmlab recommend``: rank known checkpoints by requirements, published scores and, when given,
your own eval and bench results; one line of reasons per pick.

Published scores are transcribed from each checkpoint's model card or paper (``SOURCES``); they
were produced by different harnesses and prompts, so they rank coarsely and your own ``vlmlab
eval`` numbers (``--results``) take precedence wherever they exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.families import FAMILIES
from vlmlab.plan import PlanInput, plan_family
from vlmlab.protocol.errors import ConfigError

# Benchmark -> score in percent (OCRBench scaled to /10). Values as published by the authors.
PUBLISHED: dict[str, dict[str, float]] = {
    "mistralai/Pixtral-12B-2409": {"mmmu": 52.5, "mathvista": 58.0, "chartqa": 81.8, "docvqa": 90.7, "vqav2": 78.6},
    "microsoft/Phi-3.5-vision-instruct": {"mmmu": 43.0, "mathvista": 43.9, "chartqa": 81.8, "textvqa": 72.0, "mmbench": 81.9},
    "Qwen/Qwen2-VL-7B-Instruct": {"mmmu": 54.1, "mathvista": 58.2, "chartqa": 83.0, "docvqa": 94.5, "textvqa": 84.3, "ocrbench": 84.5, "mmbench": 83.0},
    "Qwen/Qwen2.5-VL-7B-Instruct": {"mmmu": 58.6, "mathvista": 68.2, "chartqa": 87.3, "docvqa": 95.7, "textvqa": 84.9, "ocrbench": 86.4, "mmbench": 83.5},
    "Qwen/Qwen2-VL-2B-Instruct": {"mmmu": 41.1, "mathvista": 43.0, "chartqa": 73.5, "docvqa": 90.1, "textvqa": 79.7, "ocrbench": 79.4, "mmbench": 74.9},
    "llava-hf/llava-v1.6-mistral-7b-hf": {"mmmu": 35.3, "mathvista": 37.7, "textvqa": 65.7, "mmbench": 68.7},
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": {"mmmu": 48.8, "mathvista": 63.2, "chartqa": 80.0, "docvqa": 87.5, "mmbench": 80.8},
    "OpenGVLab/InternVL2-8B": {"mmmu": 51.8, "mathvista": 58.3, "chartqa": 83.3, "docvqa": 91.6, "textvqa": 77.4, "ocrbench": 79.4, "mmbench": 81.7},
    "HuggingFaceM4/idefics2-8b": {"mmmu": 43.0, "mathvista": 51.4, "docvqa": 74.0, "textvqa": 73.0, "mmbench": 76.7},
    "HuggingFaceM4/Idefics3-8B-Llama3": {"mmmu": 46.6, "mathvista": 58.4, "docvqa": 87.7, "textvqa": 74.9},
}
SOURCES: dict[str, str] = {
    "mistralai/Pixtral-12B-2409": "Mistral AI, 'Announcing Pixtral 12B' (2024-09) / Pixtral 12B paper, Table 2",
    "microsoft/Phi-3.5-vision-instruct": "microsoft/Phi-3.5-vision-instruct model card, benchmark table",
    "Qwen/Qwen2-VL-7B-Instruct": "Qwen/Qwen2-VL-7B-Instruct model card, image benchmarks",
    "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct model card, image benchmarks",
    "Qwen/Qwen2-VL-2B-Instruct": "Qwen/Qwen2-VL-2B-Instruct model card, image benchmarks",
    "llava-hf/llava-v1.6-mistral-7b-hf": "LLaVA-NeXT blog (2024-01-30), Mistral-7B column",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "LLaVA-OneVision paper (arXiv 2408.03326), Table 3, 7B OV",
    "OpenGVLab/InternVL2-8B": "OpenGVLab/InternVL2-8B model card, image benchmarks",
    "HuggingFaceM4/idefics2-8b": "HuggingFaceM4/idefics2-8b model card",
    "HuggingFaceM4/Idefics3-8B-Llama3": "HuggingFaceM4/Idefics3-8B-Llama3 model card / Idefics3 paper",
}
OCR_BENCHMARKS = ("docvqa", "textvqa", "ocrbench", "chartqa")
GENERAL_BENCHMARKS = ("mmmu", "mathvista", "mmbench")


@dataclass(frozen=True)
class Requirements:
    max_params_b: float | None = None
    gpu_mem: int | None = None
    multi_image: bool = False
    ocr: bool = False
    image: tuple[int, int] = (1024, 768)
    images_per_request: int = 1
    dtype: str = "bf16"
    include_nano: bool = False


@dataclass
class Pick:
    checkpoint: str
    family: str
    params_b: float
    score: float | None
    fits: bool
    reasons: list[str] = field(default_factory=list)
    excluded: str | None = None
    measured: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return "; ".join(self.reasons) if not self.excluded else f"excluded: {self.excluded}"


def read_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Measured numbers from ``vlmlab eval`` (summary JSON) and ``vlmlab bench`` (result JSON)
    files under ``folder``, keyed by model name."""
    measured: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows = data if isinstance(data, list) else [data]
        for row in rows:
            if isinstance(row, dict) and "dataset" in row and "score" in row and row.get("model") and row["score"] is not None:
                measured.setdefault(row["model"], {}).setdefault("accuracy", {})[row["dataset"]] = row["score"]
            elif isinstance(row, dict) and "summary" in row and isinstance(row.get("settings"), dict):
                model = row["settings"].get("model") or row.get("server", {}).get("id")
                throughput = row["summary"].get("throughput") if isinstance(row["summary"], dict) else None
                if model and throughput:
                    measured.setdefault(model, {})["throughput"] = throughput
    return measured


def recommend(req: Requirements, measured: Mapping[str, Mapping[str, Any]] | None = None) -> list[Pick]:
    """Every known checkpoint, eligible ones first by score; each with its reasons."""
    measured = measured or {}
    picks: list[Pick] = []
    wanted = OCR_BENCHMARKS if req.ocr else GENERAL_BENCHMARKS + OCR_BENCHMARKS
    for name in FAMILIES:
        family = FAMILIES.get(name)
        if family.name == "nano" and not req.include_nano:
            continue
        for ckpt in family.checkpoints:
            row = plan_family(family, PlanInput(images=[req.image] * req.images_per_request, gpu_mem=req.gpu_mem, dtype=req.dtype), ckpt.hub_id)
            params_b = ckpt.params / 1e9
            scores = PUBLISHED.get(ckpt.hub_id, {})
            relevant = [scores[b] for b in wanted if b in scores]
            mine = measured.get(ckpt.hub_id) or measured.get(family.name) or {}
            accuracy = mine.get("accuracy") or {}
            score = (100 * sum(accuracy.values()) / len(accuracy)) if accuracy else (sum(relevant) / len(relevant) if relevant else None)
            pick = Pick(ckpt.hub_id, family.name, params_b, score, bool(row.fits_gpu) if req.gpu_mem else True, measured=dict(mine))
            if req.max_params_b is not None and params_b > req.max_params_b:
                pick.excluded = f"{params_b:.1f}B parameters > {req.max_params_b:g}B"
            elif req.multi_image and family.max_images < 2:
                pick.excluded = f"takes {family.max_images} image per prompt"
            elif row.error:
                pick.excluded = row.error
            elif req.gpu_mem and not row.fits_gpu:
                pick.excluded = f"weights {row.weight_bytes / 2**30:.1f} GiB + KV do not fit the GPU"
            if accuracy:
                pick.reasons.append("your eval: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(accuracy.items())))
            elif relevant:
                shown = ", ".join(f"{b} {scores[b]:g}" for b in wanted if b in scores)
                pick.reasons.append(f"published {'OCR' if req.ocr else 'mean'} {sum(relevant) / len(relevant):.1f} ({shown}; {SOURCES.get(ckpt.hub_id, 'source unknown')})")
            else:
                pick.reasons.append("no published scores recorded")
            tokens = row.image_tokens[0] if row.image_tokens else None
            pick.reasons.append(f"{params_b:.1f}B params, {tokens} tokens per {req.image[0]}x{req.image[1]} image, KV {row.kv_bytes_per_request / 2**20:.0f} MiB/request")
            if req.gpu_mem and row.fits_gpu:
                pick.reasons.append(f"{row.concurrent_requests} such requests fit at once")
            if "throughput" in mine:
                pick.reasons.append(f"measured throughput {mine['throughput']}")
            picks.append(pick)
    eligible = sorted((p for p in picks if not p.excluded), key=lambda p: (p.score is None, -(p.score or 0), p.params_b))
    return eligible + [p for p in picks if p.excluded]


def parse_requirements(max_params: float | None, gpu_mem: str | None, multi_image: bool, ocr: bool, image: str, dtype: str, images_per_request: int = 1) -> Requirements:
    from vlmlab.plan import parse_bytes, parse_size

    if max_params is not None and max_params <= 0:
        raise ConfigError(f"--max-params must be positive (billions), got {max_params}")
    return Requirements(max_params, parse_bytes(gpu_mem) if gpu_mem else None, multi_image, ocr, parse_size(image), max(images_per_request, 2 if multi_image else 1), dtype)


def ranked(picks: Sequence[Pick]) -> list[dict[str, Any]]:
    return [{"rank": i + 1 if not p.excluded else None, "checkpoint": p.checkpoint, "family": p.family, "params_b": round(p.params_b, 2), "score": p.score, "why": p.line()} for i, p in enumerate(picks)]
