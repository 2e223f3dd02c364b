"""The MLX engine.

Everywhere: the translation layer (INT4 presets, option checks, messages, sampling, stop strings,
finish reasons, timings) and the refusal off Apple Silicon. On an Apple Silicon Mac with
mlx-vlm, the contract tests at the end run the real engine on a small INT4 checkpoint
(``VLMLAB_TEST_MLX_MODEL``, default mlx-community/Qwen2-VL-2B-Instruct-4bit, fetched from the hub
when it is not cached).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import os
import platform
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vlmlab.config import EngineSpec
from vlmlab.engines import ENGINES, GenerationRequest, complete, load_engine
from vlmlab.engines.mlx.translate import (
    INSTALL_HINT,
    NOT_APPLE_HINT,
    StepFigures,
    check_options,
    checkpoint_options,
    finish_reason,
    mlx_messages,
    resolve_checkpoint,
    sampling_kwargs,
    unavailable_reason,
)
from vlmlab.engines.stops import StopText
from vlmlab.families import get_family
from vlmlab.protocol.core import (
    Chat,
    GenerationChunk,
    ImageData,
    ImagePart,
    Message,
    SamplingParams,
)
from vlmlab.protocol.errors import ConfigError, EngineUnavailableError

MODEL = os.environ.get("VLMLAB_TEST_MLX_MODEL", "mlx-community/Qwen2-VL-2B-Instruct-4bit")


def photo(w: int = 64, h: int = 48, colour: str = "red") -> ImagePart:
    im = Image.new("RGB", (w, h), "white")
    im.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    data = buf.getvalue()
    return ImagePart(ref=f"{colour}.png", data=ImageData(im, w, h, "PNG", hashlib.sha256(data).hexdigest(), len(data)))


# -- availability --------------------------------------------------------------------------------


def test_registered_and_importable_without_mlx() -> None:
    assert ENGINES.canonical("mlx") == ENGINES.canonical("mlx-vlm") == "mlx"
    code = "import sys, vlmlab.engines.mlx.engine; print(sorted(m for m in ('mlx', 'mlx_vlm', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unavailable_reasons_name_the_fix() -> None:
    assert unavailable_reason("Darwin", "arm64", True) is None
    assert unavailable_reason("Darwin", "arm64", False) == "mlx-vlm is not installed: pip install 'vlmlab[mlx]'"
    assert unavailable_reason("Linux", "x86_64", True).startswith(NOT_APPLE_HINT)
    assert unavailable_reason("Darwin", "x86_64", True).startswith(NOT_APPLE_HINT)  # Intel Macs have no MLX GPU


def test_load_here_refuses_as_unavailable_or_loads() -> None:
    reason = unavailable_reason(platform.system(), platform.machine(), importlib.util.find_spec("mlx_vlm") is not None)
    if reason is None:
        return  # covered by the contract tests
    with pytest.raises(EngineUnavailableError) as caught:
        load_engine(EngineSpec(model="mistralai/Pixtral-12B-2409", engine="mlx"))
    assert caught.value.message == reason
    assert INSTALL_HINT in reason or NOT_APPLE_HINT in reason


# -- checkpoints and options ---------------------------------------------------------------------


def test_known_models_load_their_int4_conversion() -> None:
    native = resolve_checkpoint("mistralai/Pixtral-12B-2409", {})
    assert native.repo == "mlx-community/pixtral-12b-4bit" and native.bits == 4
    assert native.source == "mistral-community/pixtral-12b" and native.family == "pixtral"
    assert resolve_checkpoint("pixtral", {}) == native  # a family name: its reference checkpoint
    assert resolve_checkpoint("mlx-community/pixtral-12b-4bit", {}) == native
    phi = resolve_checkpoint("microsoft/Phi-3.5-vision-instruct", {"quantization": "4bit"})
    assert phi.repo == "mlx-community/Phi-3.5-vision-instruct-4bit" and phi.trust_remote_code
    other = resolve_checkpoint("mlx-community/SmolVLM-Instruct-bf16", {})
    assert (other.repo, other.bits, other.family) == ("mlx-community/SmolVLM-Instruct-bf16", None, None)
    with pytest.raises(ConfigError, match="does not apply"):
        resolve_checkpoint("mistralai/Pixtral-12B-2409", {"quantization": "fp8"})
    with pytest.raises(ConfigError, match="no known INT4 MLX conversion"):
        resolve_checkpoint("someone/model", {"quantization": "int4"})


def test_processing_is_the_checkpoints_own() -> None:
    pixtral, phi = get_family("pixtral"), get_family("phi3_5_vision")
    # the 4-bit Pixtral is converted from the transformers port: transformers' rounding
    assert checkpoint_options(pixtral, "mistral-community/pixtral-12b") == {"variant": "hf"}
    assert checkpoint_options(phi, "microsoft/Phi-3.5-vision-instruct") == {"num_crops": 4}
    check_options(phi, "microsoft/Phi-3.5-vision-instruct", {"num_crops": "4"}, "--opt")  # the same: fine
    with pytest.raises(ConfigError, match=r"asks for \{'num_crops': 16\}"):
        check_options(phi, "microsoft/Phi-3.5-vision-instruct", {"num_crops": 16}, "--opt")
    with pytest.raises(ConfigError):
        check_options(None, "someone/model", {"max_pixels": 100}, "--opt")


# -- requests and outputs ------------------------------------------------------------------------


def test_messages_keep_images_in_place() -> None:
    chat = Chat((Message.of("system", "Short answers."), Message.of("user", "Is", photo(), "the same as", photo(colour="blue"), "?")))
    assert mlx_messages(chat) == [
        {"role": "system", "content": "Short answers."},
        {"role": "user", "content": [
            {"type": "text", "text": "Is"}, {"type": "image"}, {"type": "text", "text": "the same as"},
            {"type": "image"}, {"type": "text", "text": "?"},
        ]},
    ]  # fmt: skip


def test_sampling_kwargs() -> None:
    assert sampling_kwargs(SamplingParams(max_tokens=9, temperature=0, top_p=0.5)) == {"max_tokens": 9, "temperature": 0, "top_p": 0.5}
    assert sampling_kwargs(SamplingParams(top_k=40, seed=3))["top_k"] == 40
    assert sampling_kwargs(SamplingParams(top_k=40, seed=3))["seed"] == 3


@given(
    st.text(alphabet="ab\n.", max_size=40),
    st.lists(st.integers(1, 6), max_size=12),
    st.lists(st.text(alphabet="ab\n.", min_size=1, max_size=3), max_size=3),
)
def test_stop_strings_over_any_split(text: str, sizes: list[int], stops: list[str]) -> None:
    """Whatever the token boundaries, the shown text is what a per-token stop check gives (vLLM's
    and OpenAI's rule: stop at the first token after which a stop string appears, cut at its
    start), and nothing shown ever includes a stop string."""
    pieces, position = [], 0
    for size in sizes + [len(text)]:
        pieces.append(text[position : position + size])
        position += size
    stop, shown, fed, expected = StopText(tuple(stops)), "", "", None
    for piece in pieces:
        shown += stop.feed(piece)
        fed += piece
        starts = [fed.find(s) for s in stops if s in fed]
        if starts:
            expected = fed[: min(starts)]
            break
    if expected is None:
        shown += stop.flush()
        expected = text
    assert stop.stopped == (expected != text or any(s in text for s in stops))
    assert shown == expected
    assert not any(s in shown for s in stops)


def test_finish_reasons_and_figures() -> None:
    assert finish_reason("length", False, False) == "length"
    assert finish_reason(None, False, False) == "stop"
    assert finish_reason("length", True, False) == "stop"  # a stop string came first
    assert finish_reason("stop", False, True) == "abort"
    figures = StepFigures(prompt_tokens=300, generation_tokens=40, prompt_tps=600.0, generation_tps=20.0, peak_memory_gb=2.5)
    assert figures.timings() == {"prefill_s": 0.5, "decode_s": 2.0, "peak_memory_bytes": 2_500_000_000}
    assert StepFigures().timings() == {}


# -- mlx-vlm's own prompt and input preparation (needs mlx-vlm, not a Mac) ----------------------


def test_mlx_vlm_prepares_nano_as_the_hf_engine_counts_it() -> None:
    """mlx-vlm's chat template application and ``prepare_inputs`` (the engine's prompt and count
    path) on nano's real processor agree with the transformers engine token for token. mlx runs
    on Linux CPUs too (``mlx[cpu]``); only the model is left out, which mlx-vlm cannot build for
    nano's Pixtral vision tower."""
    pytest.importorskip("mlx_vlm")
    import concurrent.futures
    import json
    from types import SimpleNamespace

    from transformers import AutoProcessor

    from vlmlab.engines.mlx.engine import MLXEngine
    from vlmlab.engines.mlx.translate import MLXCheckpoint
    from vlmlab.nano import checkpoint_path

    path = checkpoint_path()
    config = json.loads((path / "config.json").read_text())
    model = SimpleNamespace(config=SimpleNamespace(  # the config fields the engine reads
        model_type=config["model_type"], image_token_index=config["image_token_index"], text_config=config["text_config"]))  # fmt: skip
    worker = concurrent.futures.ThreadPoolExecutor(1)
    engine = MLXEngine(EngineSpec(model="nano", engine="mlx"), MLXCheckpoint(str(path), str(path), "nano"), model,
                       AutoProcessor.from_pretrained(str(path)), get_family("nano"), worker, 0.0)  # fmt: skip
    hf = load_engine(EngineSpec(model="nano", device="cpu"))
    try:
        assert engine.max_model_len == config["text_config"]["max_position_embeddings"]
        for chat in (
            Chat.single("What color is the square?", [photo(96, 64)]),
            Chat((Message.of("system", "Be brief."), Message.of("user", photo(40, 120, "blue"), "and", photo(), "?"))),
        ):
            assert engine._prompt(chat) == hf.render(chat)
            assert engine.count_prompt_tokens(chat) == hf.count_prompt_tokens(chat)
    finally:
        hf.close()
        engine.close()


# -- contract tests: real mlx-vlm on Apple Silicon -----------------------------------------------


@pytest.fixture(scope="module")
def mlx_engine():
    pytest.importorskip("mlx_vlm")
    if unavailable_reason(platform.system(), platform.machine(), True):
        pytest.skip("MLX contract tests need Apple Silicon")
    online = pytest.MonkeyPatch()
    online.delenv("HF_HUB_OFFLINE", raising=False)  # the small checkpoint may have to be fetched once
    engine = load_engine(EngineSpec(model=MODEL, engine="mlx"))
    online.undo()
    yield engine
    engine.close()


def test_contract_streaming_usage_stop_and_cancel(mlx_engine) -> None:
    request = GenerationRequest(Chat.single("What color is the square?", [photo(320, 240)]), SamplingParams(max_tokens=16, temperature=0))

    async def stream():
        pieces, result = [], None
        async for item in mlx_engine.generate(request):
            if isinstance(item, GenerationChunk):
                pieces.append(item.text)
            else:
                result = item
        return "".join(pieces), result

    text, result = asyncio.run(stream())
    assert result is not None and text == result.text == asyncio.run(complete(mlx_engine, request)).text
    counted = mlx_engine.count_prompt_tokens(request.chat)
    assert result.prompt_tokens == counted.prompt_tokens and result.image_tokens == counted.image_tokens > 0
    assert 0 < result.completion_tokens <= 16 and result.timings.peak_memory_bytes > 0

    long = GenerationRequest(Chat.single("Count from 1 to 100, one number per line."), SamplingParams(max_tokens=64, temperature=0, stop=("\n",)))
    stopped = asyncio.run(complete(mlx_engine, long))
    assert "\n" not in stopped.text and stopped.finish_reason == "stop"

    async def cancel_early():
        agen = mlx_engine.generate(GenerationRequest(Chat.single("Write a long story."), SamplingParams(max_tokens=500, temperature=0)))
        async for item in agen:
            if isinstance(item, GenerationChunk):
                break
        await agen.aclose()
        return await complete(mlx_engine, GenerationRequest(Chat.single("Say hi."), SamplingParams(max_tokens=4, temperature=0)))

    assert asyncio.run(cancel_early()).completion_tokens > 0  # the worker was freed
