"""Issue 17 item 4: the streaming usage chunk carries timings; plan sizes nano by its real weights."""

from __future__ import annotations

import json
import math

import httpx
from safetensors import safe_open

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.families import get_family
from vlmlab.families.base import DTYPE_BYTES
from vlmlab.nano import checkpoint_path
from vlmlab.plan import PlanInput, plan


def test_stream_usage_chunk_carries_the_finish_chunks_timings() -> None:
    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), default_max_tokens=8)
    body = {
        "model": "nano",
        "messages": image_message("What colour is the shape?", data_url(png_bytes(80, 80, "green"))),
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with running_server(settings) as server, httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finish = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    usage = chunks[-1]
    assert len(finish) == 1 and usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert usage["timings"] is not None and usage["timings"]["total_ms"] > 0
    # the finish chunk is written without null fields, the usage chunk with them: same values
    assert {k: v for k, v in usage["timings"].items() if v is not None} == finish[0]["timings"]


def shipped_parameter_count() -> int:
    """Sum of numel over the tensors in the shipped nano checkpoint (tied lm_head is not stored)."""
    with safe_open(str(checkpoint_path() / "model.safetensors"), "np") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def test_plan_sizes_nano_by_the_shipped_checkpoints_parameter_count() -> None:
    count = shipped_parameter_count()
    assert count == 2_513_728  # the figure issue 17 reports
    assert get_family("nano").checkpoint(None).params == count
    (row,) = plan(["nano"], PlanInput(images=[(64, 64)], dtype="bf16"))
    assert row.weight_bytes == count * DTYPE_BYTES["bf16"]
    (row32,) = plan(["nano"], PlanInput(images=[(64, 64)], dtype="fp32"))
    assert row32.weight_bytes == (checkpoint_path() / "model.safetensors").stat().st_size - _header_bytes()


def _header_bytes() -> int:
    """safetensors layout: an 8-byte little-endian header length, the JSON header, then the data."""
    raw = (checkpoint_path() / "model.safetensors").read_bytes()[:8]
    return 8 + int.from_bytes(raw, "little")
