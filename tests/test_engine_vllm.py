"""The vLLM engine.

Everywhere: the translation layer (presets, engine arguments, chat messages, sampling, streamed
deltas, usage, errors) and the refusal on machines without vLLM or an NVIDIA GPU. Where vLLM and a
GPU are present, the contract tests at the end run the real engine on a small checkpoint (the
packaged nano by default; ``VLMLAB_TEST_VLLM_MODEL=Qwen/Qwen2-VL-2B-Instruct`` for a cached hub
model).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import io
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vlmlab.config import PRESET_DIR, EngineSpec
from vlmlab.engines import ENGINES, GenerationRequest, complete, load_engine
from vlmlab.engines.sources import resolve_model
from vlmlab.engines.vllm.engine import cuda_available
from vlmlab.engines.vllm.translate import (
    INSTALL_HINT,
    NO_GPU_HINT,
    PRESETS,
    TextDelta,
    VLLMSettings,
    chat_messages,
    check_arg_names,
    data_url_image_part,
    engine_args,
    family_of,
    find_preset,
    finish_reason,
    image_tokens,
    load_error,
    max_images,
    request_error,
    rule_image_tokens,
    rule_options,
    sampling_kwargs,
    stats_timings,
    structured_outputs_kwargs,
    token_logprobs,
    unavailable_reason,
)
from vlmlab.families import get_family
from vlmlab.nano import checkpoint_path
from vlmlab.protocol.core import (
    Chat,
    GenerationChunk,
    GenerationResult,
    ImageData,
    ImagePart,
    Message,
    SamplingParams,
    StructuredOutput,
)
from vlmlab.protocol.errors import (
    BadRequestError,
    ConfigError,
    ContextLengthError,
    EngineError,
    EngineUnavailableError,
    NotFoundError,
    OverloadedError,
)

MODEL = os.environ.get("VLMLAB_TEST_VLLM_MODEL", "nano")  # read before conftest clears VLMLAB_*
# nano in fp32: greedy answers then do not depend on how vLLM batches them (bf16 rounding would)
DTYPE = "fp32" if MODEL == "nano" else "auto"


def photo(w: int = 64, h: int = 48, colour: str = "red") -> ImagePart:
    im = Image.new("RGB", (w, h), "white")
    im.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    im.putpixel((1, 2), (1, 2, 3))  # a pixel a lossy codec would not keep exactly
    buf = io.BytesIO()
    im.save(buf, "PNG")
    data = buf.getvalue()
    return ImagePart(ref=f"{colour}.png", data=ImageData(im, w, h, "PNG", hashlib.sha256(data).hexdigest(), len(data)))


# -- availability --------------------------------------------------------------------------------


def test_registered_and_importable_without_vllm_or_torch() -> None:
    assert ENGINES.canonical("vllm") == "vllm"
    code = (
        "import sys, vlmlab.engines.vllm.engine, vlmlab.engines.vllm.translate; "
        "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unavailable_reasons_name_the_fix() -> None:
    assert unavailable_reason(True, True) is None
    assert unavailable_reason(False, True) == "vLLM is not installed: pip install 'vlmlab[vllm]'"
    assert unavailable_reason(True, False) == "vLLM needs an NVIDIA GPU; use --engine hf or --engine remote"
    assert NO_GPU_HINT in unavailable_reason(False, False) and INSTALL_HINT in unavailable_reason(False, False)


def test_load_here_refuses_as_unavailable_or_loads() -> None:
    """On this machine: refused with the reason (the fallback chain skips it), or, with vLLM and
    a GPU, the contract tests below cover loading."""
    reason = unavailable_reason(importlib.util.find_spec("vllm") is not None, cuda_available())
    if reason is None:
        return  # covered by the contract tests
    with pytest.raises(EngineUnavailableError) as caught:
        load_engine(EngineSpec(model="mistralai/Pixtral-12B-2409", engine="vllm"))
    assert caught.value.message == reason and caught.value.status_code == 503


def test_chat_cli_says_why_without_a_traceback(tmp_path) -> None:
    if unavailable_reason(importlib.util.find_spec("vllm") is not None, cuda_available()) is None:
        return
    path = tmp_path / "street.png"
    photo().data.image.save(path)
    out = subprocess.run(
        [sys.executable, "-m", "vlmlab", "chat", "--engine", "vllm", "--model", "microsoft/Phi-3.5-vision-instruct",
         "--image", str(path), "Describe this image in one sentence."],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in stderr
    assert "vLLM needs an NVIDIA GPU" in stderr or INSTALL_HINT in stderr
    if importlib.util.find_spec("vllm") is None:
        assert "pip install 'vlmlab[vllm]'" in stderr  # rich markup must not eat "[vllm]"


# -- presets and engine arguments ----------------------------------------------------------------


def test_pixtral_native_needs_mistral_formats_and_the_hf_port_does_not() -> None:
    native = engine_args(EngineSpec(engine="vllm"), "mistralai/Pixtral-12B-2409", find_preset("mistralai/Pixtral-12B-2409", None))
    assert {native[k] for k in ("tokenizer_mode", "config_format", "load_format")} == {"mistral"}
    port = engine_args(EngineSpec(engine="vllm"), "mistral-community/pixtral-12b", find_preset("mistral-community/pixtral-12b", None))
    assert not {"tokenizer_mode", "config_format", "load_format"} & set(port)
    assert native["limit_mm_per_prompt"] == port["limit_mm_per_prompt"] == {"image": 4}


def test_phi_trusts_its_processor_code_and_takes_num_crops() -> None:
    phi = get_family("phi3_5_vision")
    preset = find_preset("microsoft/Phi-3.5-vision-instruct", phi)
    args = engine_args(EngineSpec(engine="vllm"), "microsoft/Phi-3.5-vision-instruct", preset)
    assert args["trust_remote_code"] is True and args["mm_processor_kwargs"] == {"num_crops": 4}
    ocr = engine_args(EngineSpec(engine="vllm", processor_options={"num_crops": 16}), "microsoft/Phi-3.5-vision-instruct", preset)
    assert ocr["mm_processor_kwargs"] == {"num_crops": 16}
    # a fine-tune the table does not list keeps the family's trap
    assert find_preset("someone/phi-3.5-vision-finetune", phi).trust_remote_code
    assert not find_preset("someone/other-model", None).trust_remote_code


def test_presets_agree_with_the_shipped_config_files() -> None:
    """configs/*.yaml name vLLM settings per model; the engine's table must say the same (the
    -ocr preset is a use of Phi-3.5-vision with its own image limit and num_crops)."""
    checked = 0
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        for entry in config.get("engines") or []:
            if entry.get("engine") != "vllm":
                continue
            preset = PRESETS[(entry.get("model") or config["model"]).lower()]
            use_case = path.stem.endswith("-ocr")
            for key, value in (entry.get("extra") or {}).items():
                if not (use_case and key == "limit_mm_per_prompt"):
                    assert preset.engine_args[key] == value, (path.name, key)
            if not use_case:
                wanted = preset.engine_args.get("mm_processor_kwargs", {})
                assert {k: v for k, v in (config.get("processor_options") or {}).items() if k in wanted} == wanted, path.name
            assert preset.engine_args["max_model_len"] == config["max_model_len"], path.name
            assert preset.trust_remote_code == bool(config.get("trust_remote_code")), path.name
            checked += 1
    assert checked >= 4


def test_spec_and_extra_override_the_preset() -> None:
    preset = find_preset("qwen/qwen2-vl-7b-instruct", None)
    spec = EngineSpec(
        engine="vllm", dtype="bf16", max_model_len=8192, max_batch_size=4, revision="abc",
        extra={"quantization": "bnb-4bit", "gpu_memory_utilization": 0.5, "offline": True, "send_images_as": "data_url"},
    )  # fmt: skip
    args = engine_args(spec, "Qwen/Qwen2-VL-7B-Instruct", preset)
    assert args["dtype"] == "bfloat16" and args["max_model_len"] == 8192 and args["max_num_seqs"] == 4
    assert args["quantization"] == "bitsandbytes" and args["gpu_memory_utilization"] == 0.5
    assert args["revision"] == "abc" and "offline" not in args and "send_images_as" not in args
    assert args["limit_mm_per_prompt"] == {"image": 4, "video": 0}
    assert preset.engine_args["max_model_len"] == 32768  # the table itself is not modified
    with pytest.raises(ConfigError, match="vLLM runs on the GPU"):
        engine_args(EngineSpec(engine="vllm", device="cpu"), "x/y", preset)
    with pytest.raises(ConfigError, match="not a vLLM option"):
        engine_args(EngineSpec(engine="vllm", extra={"quantization": "int8"}), "x/y", preset)
    with pytest.raises(ConfigError, match=r"unknown vLLM engine argument\(s\) \['gpu_mem'\]"):
        check_arg_names({"model": "x", "gpu_mem": 1}, ["model", "gpu_memory_utilization"])
    assert VLLMSettings.from_extra({"offline": True}).offline
    with pytest.raises(ConfigError, match="send_images_as"):
        VLLMSettings.from_extra({"send_images_as": "jpeg"})


def test_models_resolve_to_what_vllm_loads(tmp_path) -> None:
    assert resolve_model("nano") == (str(checkpoint_path()), "nano")
    assert resolve_model("pixtral") == ("mistralai/Pixtral-12B-2409", "pixtral")  # native by default
    assert resolve_model(str(tmp_path)) == (str(tmp_path.resolve()), None)
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct") == ("Qwen/Qwen2-VL-2B-Instruct", None)
    with pytest.raises(NotFoundError):
        resolve_model("./no/such/dir")
    assert family_of("Qwen/Qwen2-VL-2B-Instruct", None).name == "qwen2_vl"
    assert family_of("someone/unknown", None) is None
    assert max_images({"image": 4, "video": 0}, None) == 4
    assert max_images({"image": {"count": 2}}, None) == 2
    assert max_images(None, get_family("pixtral")) == get_family("pixtral").max_images
    assert max_images({}, None) == 8


# -- requests ------------------------------------------------------------------------------------


def test_chat_messages_keep_order_and_hand_over_pixels_or_lossless_urls() -> None:
    first, second = photo(colour="red"), photo(32, 32, "blue")
    chat = Chat((
        Message.of("system", "Be brief."),
        Message.of("user", "Compare", first, "with", second),
        Message.of("assistant", "ok"),
        Message.of("user", "and now?"),
    ))  # fmt: skip
    messages = chat_messages(chat)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[3] == {"role": "user", "content": "and now?"}
    kinds = [p["type"] for p in messages[1]["content"]]
    assert kinds == ["text", "image_pil", "text", "image_pil"]
    assert messages[1]["content"][1]["image_pil"] is first.data.image
    assert messages[1]["content"][3]["uuid"] == second.data.sha256

    urls = chat_messages(chat, data_url_image_part)[1]["content"]
    header, payload = urls[1]["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    decoded = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert decoded.tobytes() == first.data.image.tobytes()  # lossless
    mine = "data:image/png;base64," + base64.b64encode(b"\x89PNG...").decode()
    own = ImagePart(ref=mine, data=first.data)
    assert data_url_image_part(own)["image_url"]["url"] == mine  # the user's bytes, untouched
    with pytest.raises(BadRequestError, match="no decoded pixels"):
        chat_messages(Chat.single("x", [ImagePart(ref="a.png", data=ImageData(None, 1, 1, "PNG", "h", 1))]))


def test_sampling_maps_every_field() -> None:
    kwargs = sampling_kwargs(SamplingParams(max_tokens=7, temperature=0.3, top_p=0.9, top_k=5, stop=("\n",), seed=11, ignore_eos=True))
    assert kwargs == {"max_tokens": 7, "temperature": 0.3, "top_p": 0.9, "top_k": 5, "seed": 11, "stop": ["\n"],
                      "ignore_eos": True, "skip_special_tokens": True, "presence_penalty": 0.0,
                      "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": None,
                      "min_tokens": 0, "logprobs": None}  # fmt: skip
    assert sampling_kwargs(SamplingParams(logprobs=True))["logprobs"] == 0  # the chosen token's alone
    assert sampling_kwargs(SamplingParams(logprobs=True, top_logprobs=3))["logprobs"] == 3
    shaped = sampling_kwargs(SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2,
                                            logit_bias=((7, -100.0),), min_tokens=3))  # fmt: skip
    assert (shaped["presence_penalty"], shaped["frequency_penalty"], shaped["repetition_penalty"]) == (0.5, -1.0, 1.2)
    assert shaped["logit_bias"] == {7: -100.0} and shaped["min_tokens"] == 3


def test_vllm_logprobs_become_openai_records() -> None:
    """vLLM's CompletionOutput.logprobs: per token {id: Logprob(logprob, rank, decoded_token)}."""
    from types import SimpleNamespace as Logprob

    steps = [
        {5: Logprob(logprob=-0.1, rank=1, decoded_token="re"), 9: Logprob(logprob=-2.5, rank=2, decoded_token="bl")},
        {7: Logprob(logprob=-1.2, rank=3, decoded_token="d"), 8: Logprob(logprob=-0.3, rank=1, decoded_token="é"),
         4: Logprob(logprob=-0.9, rank=2, decoded_token="x")},
    ]  # fmt: skip
    records = token_logprobs([5, 7], steps, top=2)
    assert [(r.token, r.logprob) for r in records] == [("re", -0.1), ("d", -1.2)]
    assert [a[0] for a in records[1].top] == ["é", "x"]  # by rank; the chosen one need not be among them
    assert records[1].top[0][2] == tuple("é".encode()) and records[0].bytes == (114, 101)
    assert token_logprobs([5], None, 2) == ()


def test_structured_outputs_map_to_vllms_params() -> None:
    assert structured_outputs_kwargs(None) is None
    schema = StructuredOutput("json_schema", '{"type":"object"}')
    assert structured_outputs_kwargs(schema) == {"json": {"type": "object"}}
    assert structured_outputs_kwargs(StructuredOutput("json_object")) == {"json_object": True}
    assert structured_outputs_kwargs(StructuredOutput("choice", '["a","b"]')) == {"choice": ["a", "b"]}
    assert structured_outputs_kwargs(StructuredOutput("regex", "[0-9]+")) == {"regex": "[0-9]+"}
    assert structured_outputs_kwargs(StructuredOutput("grammar", 'root ::= "x"')) == {"grammar": 'root ::= "x"'}
    default = sampling_kwargs(SamplingParams())
    assert default["stop"] is None and default["top_k"] == 0 and default["seed"] is None


# -- outputs -------------------------------------------------------------------------------------


@given(st.text(max_size=60), st.lists(st.integers(0, 60), max_size=8))
def test_deltas_of_cumulative_text_add_up(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts} | {len(text)})
    delta, pieces, tokens = TextDelta(), [], 0
    for n, point in enumerate(points, start=1):
        piece, new = delta.update(text[:point], n)
        pieces.append(piece)
        tokens += new
    assert "".join(pieces) == text and tokens == len(points) and not delta.diverged


def test_a_shrinking_text_is_not_sent_twice() -> None:
    delta = TextDelta()
    assert delta.update("Hello wor", 3) == ("Hello wor", 3)
    assert delta.update("Hello", 3) == ("", 0) and delta.diverged
    assert delta.update("Hello world", 4) == ("ld", 1)


def test_finish_reasons_and_stats() -> None:
    assert [finish_reason(r) for r in ("stop", "length", "abort", "error", None)] == ["stop", "length", "abort", "error", "stop"]
    assert stats_timings(10.0, 10.5, 11.0, 13.0) == {"queue_s": 0.5, "prefill_s": 0.5, "decode_s": 2.0}
    assert stats_timings(0, 0, 0, 0) == {}


def test_image_tokens_follow_the_family_rule_with_the_checkpoints_options() -> None:
    pixtral = get_family("pixtral")
    sizes = [(1024, 768), (333, 500)]
    native = rule_image_tokens(pixtral, sizes, rule_options(pixtral, "mistralai/Pixtral-12B-2409", {}, {}))
    port = rule_image_tokens(pixtral, sizes, rule_options(pixtral, "mistral-community/pixtral-12b", {}, {}))
    assert native == tuple(pixtral.prompt_image_tokens(sizes, variant="mistral"))
    assert port == tuple(pixtral.prompt_image_tokens(sizes, variant="hf"))
    phi = get_family("phi3_5_vision")
    args = {"mm_processor_kwargs": {"num_crops": 16}}
    assert rule_image_tokens(phi, sizes[:1], rule_options(phi, "microsoft/Phi-3.5-vision-instruct", {}, args)) == (
        phi.image_tokens(1024, 768, num_crops=16),
    )
    # an option only vLLM knows, or no family: vLLM's placeholder ranges decide
    assert rule_image_tokens(phi, sizes, {"do_pan_and_scan": True}) is None
    assert image_tokens(None, [100, 20]) == (100, 20)
    assert image_tokens((5,), [100]) == (5,)


def test_vllm_errors_become_vlmlab_errors() -> None:
    # vLLM's exception classes, matched by name (vllm/exceptions.py, vllm/v1/engine/exceptions.py)
    class VLLMValidationError(ValueError): ...
    class EngineDeadError(Exception): ...
    class QueueOverflowError(Exception): ...

    too_long = request_error(VLLMValidationError("The decoder prompt (length 40000) is longer than the maximum model length of 32768."))
    assert isinstance(too_long, ContextLengthError) and too_long.status_code == 400
    assert isinstance(request_error(VLLMValidationError("bad top_p")), BadRequestError)
    assert isinstance(request_error(QueueOverflowError("full")), OverloadedError)
    dead = request_error(EngineDeadError("core died"))
    assert isinstance(dead, EngineError) and "died" in dead.message
    assert isinstance(load_error(OSError("Repository Not Found"), "x/y"), NotFoundError)
    assert "max-model-len" in load_error(ValueError("No available memory for the cache blocks"), "x/y").message
    assert isinstance(load_error(ValueError("max_model_len 10 < ..."), "x/y"), ConfigError)


# -- vLLM's own renderer (needs vLLM, not a GPU) ----------------------------------------------


def test_vllm_renders_nano_as_the_hf_engine_counts_it() -> None:
    """The engine's chat rendering (sync for offline mode, async on its loop thread) against the
    transformers engine: same prompt tokens, same image tokens, and vLLM's placeholder ranges
    equal the family rule. Only the renderer is built: no engine core, no GPU."""
    pytest.importorskip("vllm")
    import dataclasses
    from types import SimpleNamespace

    from vllm import AsyncEngineArgs, EngineArgs
    from vllm.config import DeviceConfig, VllmConfig
    from vllm.renderers.registry import renderer_from_config

    from vlmlab.engines.vllm.engine import VLLMEngine, _LoopThread

    fields = [f.name for f in dataclasses.fields(AsyncEngineArgs)]
    for hub_id, preset in PRESETS.items():  # every preset speaks vLLM's argument names
        args = engine_args(EngineSpec(engine="vllm", extra={"quantization": "fp8"}), hub_id, preset)
        check_arg_names(args, fields)
    path = str(checkpoint_path())
    model_config = EngineArgs(model=path, max_model_len=1024, limit_mm_per_prompt={"image": 4}).create_model_config()
    renderer = renderer_from_config(VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu")))
    backend = SimpleNamespace(renderer=renderer, model_config=model_config)  # the parts rendering uses
    spec, args, family = EngineSpec(model="nano", engine="vllm"), {"limit_mm_per_prompt": {"image": 4}}, get_family("nano")
    loop = _LoopThread()
    offline = VLLMEngine(spec, VLLMSettings(offline=True), backend, None, family, path, args, 0.0)
    online = VLLMEngine(spec, VLLMSettings(), backend, loop, family, path, args, 0.0)
    hf = load_engine(EngineSpec(model="nano", device="cpu"))
    try:
        for chat in (
            Chat.single("What color is the square?", [photo(96, 64)]),
            Chat((Message.of("system", "Be brief."), Message.of("user", photo(40, 120, "blue"), "and", photo(), "?"))),
        ):
            counted = hf.count_prompt_tokens(chat)
            assert offline.count_prompt_tokens(chat) == online.count_prompt_tokens(chat) == counted
            rendered = loop.call(online._render(online._messages(chat), {}, skip_cache=False))
            assert rendered.placeholder_lengths == counted.per_image
        sampled = online._sampling(GenerationRequest(Chat.single("x"), SamplingParams(max_tokens=7, temperature=0.5, top_k=5, stop=("\n",), seed=3, ignore_eos=True)))
        assert (sampled.max_tokens, sampled.temperature, sampled.top_k, sampled.stop, sampled.seed, sampled.ignore_eos) == (7, 0.5, 5, ["\n"], 3, True)
    finally:
        hf.close()
        loop.stop()


# -- contract tests: real vLLM on a GPU ----------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine():
    pytest.importorskip("vllm")
    if not cuda_available():
        pytest.skip("vLLM contract tests need an NVIDIA GPU")
    extra = {"gpu_memory_utilization": 0.3, "enforce_eager": True}
    engine = load_engine(EngineSpec(model=MODEL, engine="vllm", dtype=DTYPE, max_model_len=4096, extra=extra))
    yield engine
    engine.close()


def _question(image: ImagePart, tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(Chat.single("What color is the square?", [image]), SamplingParams(max_tokens=tokens, temperature=0))


def test_contract_streaming_usage_and_counts(vllm_engine) -> None:
    request = _question(photo(320, 240))

    async def stream():
        pieces, result = [], None
        async for item in vllm_engine.generate(request):
            if isinstance(item, GenerationChunk):
                pieces.append(item.text)
            else:
                result = item
        return "".join(pieces), result

    text, result = asyncio.run(stream())
    again = asyncio.run(complete(vllm_engine, request))
    assert isinstance(result, GenerationResult) and text == result.text == again.text
    counted = vllm_engine.count_prompt_tokens(request.chat)
    assert result.prompt_tokens == counted.prompt_tokens and result.image_tokens == counted.image_tokens > 0
    assert 0 < result.completion_tokens <= 12 and result.engine == "vllm"
    assert result.timings.ttft_s is not None and result.timings.ttft_s > 0


def test_contract_cancellation_aborts_in_vllm(vllm_engine) -> None:
    request = GenerationRequest(Chat.single("Count to one thousand.", [photo()]), SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))

    async def cancel_early():
        agen = vllm_engine.generate(request)
        async for item in agen:
            if isinstance(item, GenerationChunk):
                break
        await agen.aclose()
        for _ in range(100):  # vLLM aborts on its loop; wait until nothing is left running
            if vllm_engine.backend.get_num_unfinished_requests() == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(cancel_early())
    assert vllm_engine.counters["cancelled"] >= 1


def test_contract_context_limit_and_ignore_eos(vllm_engine) -> None:
    with pytest.raises(ContextLengthError):
        asyncio.run(complete(vllm_engine, GenerationRequest(Chat.single("hi"), SamplingParams(max_tokens=10_000))))
    result = asyncio.run(complete(vllm_engine, GenerationRequest(Chat.single("hi"), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))))
    assert result.completion_tokens == 20 and result.finish_reason == "length"


def test_contract_offline_batch_matches_the_async_engine(vllm_engine) -> None:
    requests = [_question(photo(160, 120, c), tokens=8) for c in ("red", "green", "blue")]
    streamed = [asyncio.run(complete(vllm_engine, r)) for r in requests]
    vllm_engine.close()  # one GPU: free it for the offline engine
    extra = {"gpu_memory_utilization": 0.3, "enforce_eager": True, "offline": True, "use_tqdm": False}
    offline = load_engine(EngineSpec(model=MODEL, engine="vllm", dtype=DTYPE, max_model_len=4096, extra=extra))
    try:
        batch = offline.generate_batch(requests)
        assert [r.text for r in batch] == [r.text for r in streamed]
        assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in streamed]
        assert not offline.capabilities.streaming
    finally:
        offline.close()
