"""Quantization: the method table as each engine and the planner read it, and torchao int8
weight-only on the real nano checkpoint through the transformers engine."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from vlmlab.engines import EngineSpec, GenerationRequest, complete, load_engine
from vlmlab.engines.quantization import (
    METHODS,
    canonical_quantization,
    from_flags,
    hf_quantization,
    plan_dtype,
    tensor_bytes,
    vllm_quantization,
    weight_bytes,
)
from vlmlab.families import canonical_dtype
from vlmlab.nano import checkpoint_path
from vlmlab.nano.tasks import generate
from vlmlab.protocol.core import Chat, ImageData, ImagePart, SamplingParams
from vlmlab.protocol.errors import ConfigError


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmlab", *args], check=False, capture_output=True, text=True, timeout=180)


# -- the table -----------------------------------------------------------------------------------


def test_names_fold_to_one_method_each() -> None:
    assert canonical_quantization(" BNB_4bit ") == "bnb-4bit"
    assert canonical_quantization("4bit") == canonical_quantization("nf4") == "bnb-4bit"
    assert canonical_quantization("8bit") == "bnb-8bit"
    assert canonical_quantization("int8_weight_only") == "int8"
    assert canonical_quantization("awq_marlin") == "awq_marlin"  # a vLLM method vlmlab passes through
    assert from_flags(None, load_in_4bit=True) == "bnb-4bit"
    assert from_flags("bnb-4bit", load_in_4bit=True) == "bnb-4bit"  # the same thing twice is fine
    assert from_flags(None) is None
    with pytest.raises(ConfigError, match="conflicting quantization flags"):
        from_flags(None, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="conflicting"):
        from_flags("fp8", load_in_8bit=True)


def test_every_method_prices_at_a_dtype_the_planner_knows() -> None:
    for name, method in METHODS.items():
        assert canonical_dtype(plan_dtype(name)) == method.weight_dtype
    # the families' own dtype aliases agree with the table where both name a method
    assert canonical_dtype("awq") == plan_dtype("awq") == "int4"
    assert canonical_dtype("gptq") == plan_dtype("gptq") == "int4"
    with pytest.raises(ConfigError, match="unknown quantization 'q3'"):
        plan_dtype("q3")


def test_vllm_gets_its_own_names_and_refuses_hf_only_methods() -> None:
    assert vllm_quantization("fp8") == "fp8"
    assert vllm_quantization("AWQ") == "awq"
    assert vllm_quantization("bnb-4bit") == vllm_quantization("--load-in-4bit".strip("-")) == "bitsandbytes"
    assert vllm_quantization("compressed-tensors") == "compressed-tensors"
    for name in ("int8", "bnb-8bit"):
        with pytest.raises(ConfigError, match="not a vLLM option"):
            vllm_quantization(name)


def test_hf_applies_bnb_on_cuda_only_and_int8_anywhere() -> None:
    import torch

    assert hf_quantization({}, "cpu", torch.float32).method is None
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        hf_quantization({"quantization": "bnb-4bit"}, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="not applied by the hf engine"):
        hf_quantization({"quantization": "awq"}, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="must be a name"):
        hf_quantization({"quantization": 4}, "cpu", torch.float32)
    int8 = hf_quantization({"quantization": "int8"}, "cpu", torch.float32)
    assert int8.method == "int8" and not int8.places_weights and int8.label("fp32") == "fp32+int8"


def test_plan_flag_prices_weights_like_the_dtype() -> None:
    def weights(*args: str) -> int:
        out = cli("plan", "--model", "qwen2_vl", "--image", "640x480", "--json", *args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["rows"][0]["weight_bytes"]

    bf16 = weights()
    assert weights("--quantization", "awq") == weights("--dtype", "int4") == bf16 // 4
    assert weights("--quantization", "bnb-8bit") == weights("--dtype", "int8") == bf16 // 2


# -- torchao int8 on nano ------------------------------------------------------------------------


def test_weight_bytes_counts_shared_tensors_once() -> None:
    """Against the checkpoint file: the safetensors tensors (tied weights saved once) hold
    exactly the bytes of the loaded model's parameters."""
    import torch
    from transformers import AutoModelForImageTextToText

    path = checkpoint_path()
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = sum(tensor_bytes(f.get_tensor(k)) for k in f.keys())  # noqa: SIM118 - safe_open is no dict
    assert weight_bytes(model) == stored


def _requests(n: int) -> list[GenerationRequest]:
    out = []
    for k, sample in enumerate(generate(n, seed=5)):
        parts = [ImagePart(ref=f"{sample.id}-{i}", data=ImageData(im, im.width, im.height, "PNG", f"{k}-{i}", 0))
                 for i, im in enumerate(sample.images)]  # fmt: skip
        out.append(GenerationRequest(Chat.single(sample.question, parts), SamplingParams(max_tokens=8, temperature=0)))
    return out


def test_int8_weight_only_nano_answers_like_fp32_with_a_third_of_the_bytes() -> None:
    import torch

    requests = _requests(6)
    fp32 = load_engine(EngineSpec(model="nano", device="cpu", max_batch_size=8))
    int8 = load_engine(EngineSpec(model="nano", device="cpu", max_batch_size=8, extra={"quantization": "int8"}))
    try:
        assert fp32.info().dtype == "fp32" and int8.info().dtype == "fp32+int8"
        linears = [m for m in int8.model.modules() if isinstance(m, torch.nn.Linear)]
        embeddings = {id(m.weight) for m in int8.model.modules() if isinstance(m, torch.nn.Embedding)}
        converted = [m for m in linears if hasattr(m.weight, "__tensor_flatten__")]  # torchao tensors
        kept = [m for m in linears if m not in converted]
        assert kept and all(id(m.weight) in embeddings for m in kept)  # only the tied lm_head stays
        assert len(converted) > 10
        assert all(tensor_bytes(m.weight) < m.weight.numel() * 2 for m in converted)
        ratio = weight_bytes(int8.model) / weight_bytes(fp32.model)
        assert 0.25 < ratio < 0.4  # 1 byte per weight + scales, the fp32 embedding kept

        async def answers(engine):
            return [r.text for r in await asyncio.gather(*(complete(engine, q) for q in requests))]

        base, quantized = asyncio.run(answers(fp32)), asyncio.run(answers(int8))
        assert quantized == base  # greedy answers survive int8 weights on these tasks
        for q in requests[:2]:  # the prompt does not change with the weights
            assert int8.count_prompt_tokens(q.chat) == fp32.count_prompt_tokens(q.chat)
    finally:
        fp32.close()
        int8.close()


def test_cli_chat_takes_the_flags(tmp_path) -> None:
    image = tmp_path / "color.png"
    generate(1, seed=3, tasks=["color"])[0].images[0].save(image)
    out = cli("chat", "--device", "cpu", "--quantization", "int8", "--max-tokens", "4", "-i", str(image), "What color is the shape?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "image tokens" in out.stderr
    assert "natively supported by torch.compile" not in out.stderr  # torchao's import notice is filtered
    conflict = cli("chat", "--load-in-4bit", "--load-in-8bit", "-i", str(image), "x")
    assert conflict.returncode == 2 and "conflicting quantization flags" in conflict.stderr
    no_gpu = cli("chat", "--device", "cpu", "--load-in-4bit", "-i", str(image), "x")
    assert no_gpu.returncode == 2 and "needs a CUDA GPU" in " ".join(no_gpu.stderr.split())
    assert "Traceback" not in conflict.stderr + no_gpu.stderr
