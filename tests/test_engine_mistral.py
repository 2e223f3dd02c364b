"""The mistral engine (mistral-inference on native Pixtral checkpoints).

Everywhere (mistral_common only): the translation layer against the real Tekken v3 tokenizer
that mistral_common ships (``tekken_240911.json``, Pixtral-12B-2409's): tokens equal
mistral_common's own encoding of the same request, image tokens equal the pixtral family rule,
streamed text, stop strings, refused fields, and load errors (missing extra, no GPU, missing
folder, unreachable Hub).

With mistral-inference installed: a tiny random native checkpoint (params.json with a vision
encoder + consolidated.safetensors + the real tekken.json) generated through the engine. On a
CPU, xformers has no attention kernel, so those tests swap mistral-inference's
``memory_efficient_attention`` for PyTorch's SDPA over the same xformers masks (materialised);
the engine itself refuses a CPU. On a CUDA GPU the last test loads through ``MistralEngine.load``
with the real xformers kernels.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmlab.config import EngineSpec
from vlmlab.engines import ENGINES, check_model, complete
from vlmlab.engines.base import GenerationRequest, check_features
from vlmlab.engines.mistral.translate import (
    INSTALL_HINT,
    NATIVE_FILES,
    NO_GPU_HINT,
    ROPE_POSITIONS,
    IncrementalText,
    check_sampling,
    context_limit,
    encode_chat,
    finish_reason,
    image_token_runs,
    missing_files,
    mistral_messages,
    spec_options,
    unavailable_reason,
)
from vlmlab.engines.stops import StopText
from vlmlab.families import get_family
from vlmlab.families.pixtral import encode_chat as family_encode_chat
from vlmlab.protocol.core import (
    Chat,
    GenerationChunk,
    GenerationResult,
    Message,
    SamplingParams,
    StructuredOutput,
    Tool,
    ToolCall,
)
from vlmlab.protocol.errors import (
    BadRequestError,
    ConfigError,
    ContextLengthError,
    EngineUnavailableError,
    NotFoundError,
)
from vlmlab.testing import image_part

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ImageChunk,
    SystemMessage,
    TextChunk,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

TEKKEN_JSON = Path(os.path.dirname(mistral_common.__file__)) / "data" / "tekken_240911.json"
HAS_MISTRAL_INFERENCE = importlib.util.find_spec("mistral_inference") is not None
PIXTRAL = get_family("pixtral")


@pytest.fixture(scope="module")
def tekken() -> MistralTokenizer:
    return MistralTokenizer.from_file(str(TEKKEN_JSON))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (width, height), (seed * 40 % 255, 90, 200))
    image.putpixel((0, 0), (255, 255, 255))
    return image


def multi_turn(first: Image.Image, second: Image.Image) -> tuple[Chat, list[Any]]:
    """The same conversation as vlmlab's Chat and as mistral_common messages."""
    ours = Chat(
        (
            Message.of("system", "You are a careful assistant."),
            Message.of("user", image_part(first, "a"), "What colour is this?"),
            Message.of("assistant", "Mostly blue.  "),
            Message.of("user", "Now compare it with", image_part(second, "b"), "this one."),
        )
    )
    theirs = [
        SystemMessage(content="You are a careful assistant."),
        UserMessage(content=[ImageChunk(image=first), TextChunk(text="What colour is this?")]),
        AssistantMessage(content="Mostly blue.  "),
        UserMessage(content=[TextChunk(text="Now compare it with"), ImageChunk(image=second), TextChunk(text="this one.")]),
    ]
    return ours, theirs


# -- registry, availability -----------------------------------------------------------------------


def test_registered_under_both_names() -> None:
    assert ENGINES.canonical("mistral") == ENGINES.canonical("mistral-inference") == "mistral"
    assert ENGINES.get("mistral").__name__ == "MistralEngine"
    assert ENGINES.get("mistral").name == "mistral"


def test_unavailable_reasons_name_the_fix() -> None:
    assert unavailable_reason(False, False, "auto") == INSTALL_HINT
    assert "pip install 'vlmlab[mistral]'" in INSTALL_HINT
    assert unavailable_reason(True, False, "auto") == f"{NO_GPU_HINT} (torch sees no CUDA device here)"
    assert "--engine hf" in NO_GPU_HINT and "xformers" in NO_GPU_HINT
    # Asked for a CPU: the GPU is the problem, whether or not the extra is installed.
    assert unavailable_reason(False, False, "cpu").startswith(NO_GPU_HINT)
    assert unavailable_reason(True, True, "auto") is None
    assert unavailable_reason(True, True, "cuda") is None


def native_folder(root: Path, tokenizer: bool = True) -> Path:
    """A folder with the native files' names (contents are not read before the load)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.json").write_text("{}")
    (root / "consolidated.safetensors").write_bytes(b"")
    if tokenizer:
        shutil.copy(TEKKEN_JSON, root / "tekken.json")
    return root


@pytest.mark.skipif(HAS_MISTRAL_INFERENCE, reason="mistral_inference is installed here")
def test_load_without_mistral_inference_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailableError) as caught:
        ENGINES.get("mistral").load(EngineSpec(model=str(native_folder(tmp_path / "ckpt")), engine="mistral"))
    assert caught.value.message == INSTALL_HINT


def test_load_on_cpu_is_refused_with_the_hf_alternative(tmp_path: Path) -> None:
    spec = EngineSpec(model=str(native_folder(tmp_path / "ckpt")), engine="mistral", device="cpu")
    with pytest.raises(EngineUnavailableError, match="needs an NVIDIA GPU.*--engine hf"):
        ENGINES.get("mistral").load(spec)


def test_missing_folder_and_missing_files_are_not_found(tmp_path: Path) -> None:
    engine = ENGINES.get("mistral")
    with pytest.raises(NotFoundError, match="does not exist"):
        engine.load(EngineSpec(model=str(tmp_path / "nowhere"), engine="mistral"))
    partial = native_folder(tmp_path / "partial", tokenizer=False)
    with pytest.raises(NotFoundError, match="lacks tekken.json"):
        engine.load(EngineSpec(model=str(partial), engine="mistral"))
    assert missing_files(partial) == ["tekken.json"]
    port = tmp_path / "hf-port"
    port.mkdir()
    (port / "config.json").write_text("{}")
    with pytest.raises(NotFoundError, match="use --engine hf or vllm"):
        engine.load(EngineSpec(model=str(port), engine="mistral"))


def test_hub_id_that_cannot_be_fetched_is_not_found() -> None:
    """conftest sets HF_HUB_OFFLINE: the Hub is not asked, the cache does not hold it."""
    for model in ("mistralai/Pixtral-12B-2409", "pixtral"):  # the family name picks the native repo
        spec = EngineSpec(model=model, engine="mistral")
        with pytest.raises(NotFoundError, match=f"model '{model}' .*HF_HUB_OFFLINE") as caught:
            ENGINES.get("mistral").load(spec)
        assert "not on this machine" in caught.value.message
        with pytest.raises(NotFoundError):
            check_model(spec)


def test_hub_cache_with_params_json_counts_as_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A native checkpoint in the cache has params.json and no config.json: check_model must not
    call it missing."""
    repo = tmp_path / "models--mistralai--Pixtral-12B-2409"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "params.json").write_text("{}")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    check_model(EngineSpec(model="mistralai/Pixtral-12B-2409", engine="mistral"))
    with pytest.raises(NotFoundError):
        check_model(EngineSpec(model="mistralai/Pixtral-12B-2409", engine="hf"))


def test_processor_options_quantization_and_context_limit(tmp_path: Path) -> None:
    folder = str(native_folder(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match="does not apply") as caught:
        ENGINES.get("mistral").load(EngineSpec(model=folder, engine="mistral", extra={"quantization": "bnb-4bit"}))
    assert caught.value.param == "quantization"
    with pytest.raises(ConfigError, match="takes no processor options"):
        ENGINES.get("mistral").load(EngineSpec(model=folder, engine="mistral", processor_options={"max_pixels": 1000}))
    spec_options({})
    spec_options({"variant": "mistral"})
    with pytest.raises(ConfigError, match="takes no processor options"):
        spec_options({"max_pixels": 1000})
    assert context_limit(None) == ROPE_POSITIONS == 128_000
    assert context_limit(4096) == 4096
    with pytest.raises(ConfigError, match="128000 positions") as caught:
        context_limit(131_072)
    assert caught.value.param == "max_model_len"


# -- prompts ------------------------------------------------------------------------------------


def test_tokens_equal_mistral_common_for_one_and_two_images(tekken: MistralTokenizer) -> None:
    first, second = picture(640, 480, 1), picture(1500, 900, 2)
    ours, theirs = multi_turn(first, second)
    expected = tekken.encode_chat_completion(ChatCompletionRequest(messages=theirs))
    prompt = encode_chat(tekken, ours)
    assert prompt.tokens == expected.tokens
    assert len(prompt.images) == 2
    for mine, reference in zip(prompt.images, expected.images, strict=True):
        assert mine.shape == reference.shape and (mine == reference).all()
    # One image, text only before it: mistral_common's own layout (image moved first) is kept.
    single = Chat.single("Describe it.", [image_part(first, "a")])
    reference = tekken.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=[ImageChunk(image=first), TextChunk(text="Describe it.")])]))
    assert encode_chat(tekken, single).tokens == reference.tokens
    # Text only.
    text = Chat((Message.of("system", "Be brief."), Message.of("user", "Hello")))
    reference = tekken.encode_chat_completion(ChatCompletionRequest(messages=[SystemMessage(content="Be brief."), UserMessage(content="Hello")]))
    assert encode_chat(tekken, text).tokens == reference.tokens
    assert encode_chat(tekken, text).per_image == ()


@pytest.mark.parametrize(
    "sizes",
    [[(1, 1)], [(16, 16)], [(17, 33)], [(1024, 1024)], [(1025, 1024)], [(4032, 3024)], [(10000, 3)], [(640, 480), (1920, 1080)], [(33, 2000), (700, 700), (50, 50)]],
)
def test_image_tokens_equal_the_pixtral_family_rule(tekken: MistralTokenizer, sizes: list[tuple[int, int]]) -> None:
    parts = [image_part(picture(w, h, k), f"img{k}") for k, (w, h) in enumerate(sizes)]
    chat = Chat.single("What is shown?", parts)
    prompt = encode_chat(tekken, chat)
    assert list(prompt.per_image) == PIXTRAL.prompt_image_tokens(sizes, variant="mistral")
    text_tokenizer = tekken.instruct_tokenizer.tokenizer
    assert prompt.tokens == family_encode_chat(chat, lambda s: text_tokenizer.encode(s, bos=False, eos=False), sizes)


def test_image_token_runs() -> None:
    # 2 rows x 3 cols: [IMG]*3 [IMG_BREAK] [IMG]*3 [IMG_END]; then a 1x1 image: [IMG] [IMG_END].
    tokens = [1, 3, 10, 10, 10, 12, 10, 10, 10, 13, 500, 10, 13, 4]
    assert image_token_runs(tokens, 10, 12, 13) == (8, 2)
    assert image_token_runs([1, 3, 500, 4], 10, 12, 13) == ()


def test_refused_chats_name_the_field(tekken: MistralTokenizer) -> None:
    with pytest.raises(BadRequestError) as caught:
        mistral_messages(Chat((Message.of("user", "hi"), Message("assistant", (), tool_calls=(ToolCall("1", "f", "{}"),)))))
    assert caught.value.param == "messages"
    with pytest.raises(BadRequestError) as caught:  # mistral_common wants the chat to end with a user turn
        encode_chat(tekken, Chat((Message.of("user", "hi"), Message.of("assistant", "hello"))))
    assert caught.value.param == "messages"


# -- sampling -----------------------------------------------------------------------------------


def test_refused_sampling_fields_are_named() -> None:
    capabilities = ENGINES.get("mistral").capabilities
    for fields, param in [
        ({"top_k": 20}, "top_k"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"logit_bias": ((5, 1.0),)}, "logit_bias"),
        ({"min_tokens": 3}, "min_tokens"),
        ({"structured": StructuredOutput("json_object")}, "response_format"),
    ]:
        sampling = SamplingParams(tool_choice="none", **fields)  # "none": what a request without tools maps to
        with pytest.raises(BadRequestError) as caught:
            check_features("mistral", capabilities, sampling)
            check_sampling(sampling)
        assert caught.value.param == param
    with pytest.raises(BadRequestError) as caught:
        check_features("mistral", capabilities, SamplingParams(), tools_offered=True)
    assert caught.value.param == "tools"
    # What it honours: temperature, top_p, seed, stop, ignore_eos, max_tokens.
    honoured = SamplingParams(temperature=0.7, top_p=0.9, seed=3, stop=("\n",), ignore_eos=True, max_tokens=5, tool_choice="none")
    check_features("mistral", capabilities, honoured)
    check_sampling(honoured)


def test_finish_reasons() -> None:
    assert finish_reason(True, False, False) == "stop"
    assert finish_reason(False, True, False) == "stop"
    assert finish_reason(False, False, False) == "length"
    assert finish_reason(True, False, True) == "abort"


def test_incremental_text_equals_whole_decode(tekken: MistralTokenizer) -> None:
    """Pieces joined equal decoding all tokens, also where a character spans tokens."""
    text_tokenizer = tekken.instruct_tokenizer.tokenizer
    for text in ["Hello world, this is Pixtral.", "日本語のテキストと絵文字 🐈‍⬛🎉 mixed", "  spaces\n\nand lines  "]:
        tokens = text_tokenizer.encode(text, bos=False, eos=False)
        incremental = IncrementalText(text_tokenizer, [])
        pieces = [incremental.add(t) for t in tokens] + [incremental.flush()]
        assert "".join(pieces) == text_tokenizer.decode(tokens) == text
        assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_over_streamed_tokens(tekken: MistralTokenizer) -> None:
    text_tokenizer = tekken.instruct_tokenizer.tokenizer
    tokens = text_tokenizer.encode("The answer is 42. END of the answer", bos=False, eos=False)
    incremental, stop = IncrementalText(text_tokenizer, []), StopText(("END", "nothing"))
    shown = []
    for token in tokens:
        shown.append(stop.feed(incremental.add(token)))
        if stop.stopped:
            break
    assert "".join(shown) == "The answer is 42. "
    assert stop.stopped and len(incremental.tokens) < len(tokens)


# -- generation: a tiny random native checkpoint through mistral-inference -------------------------

TINY_PARAMS = {
    "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
    "rope_theta": 1_000_000_000.0, "norm_eps": 1e-5, "vocab_size": 131_072,
    "vision_encoder": {
        "hidden_size": 32, "num_channels": 3, "image_size": 1024, "patch_size": 16, "rope_theta": 10_000.0,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_token_id": 10,
    },
}  # fmt: skip  (Pixtral-12B-2409 params.json's keys, tiny sizes; tekken.json is the real one)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mistral_inference")
    import torch
    from mistral_inference.args import TransformerArgs
    from mistral_inference.transformer import Transformer
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("pixtral-tiny")
    (folder / "params.json").write_text(json.dumps(TINY_PARAMS))
    shutil.copy(TEKKEN_JSON, folder / "tekken.json")
    torch.manual_seed(0)
    model = Transformer(TransformerArgs.from_dict(TINY_PARAMS))
    save_file({k: (torch.randn_like(v) * 0.05).contiguous() for k, v in model.state_dict().items()}, str(folder / "consolidated.safetensors"))
    assert not missing_files(folder) and sorted(p.name for p in folder.iterdir()) == sorted(NATIVE_FILES)
    return folder


def sdpa_attention(q: Any, k: Any, v: Any, attn_bias: Any = None) -> Any:
    """xformers' ``memory_efficient_attention`` (B, S, H, D) by PyTorch's SDPA, the xformers mask
    materialised: the same arithmetic, on a CPU."""
    import torch

    bias = None if attn_bias is None else attn_bias.materialize((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=q.dtype, device=q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)


@pytest.fixture
def cpu_engine(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The engine around the tiny model on the CPU (load() refuses a CPU: built from its parts)."""
    import mistral_inference.transformer_layers
    import torch
    from mistral_inference.transformer import Transformer

    monkeypatch.setattr(mistral_inference.transformer_layers, "memory_efficient_attention", sdpa_attention)
    tokenizer = MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json"))
    model = Transformer.from_folder(tiny_checkpoint, max_batch_size=1, device="cpu", dtype=torch.float32)
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    engine = ENGINES.get("mistral")(EngineSpec(model=str(tiny_checkpoint), engine="mistral", max_model_len=2048), tiny_checkpoint, tokenizer, model, worker, 0.0)
    yield engine
    engine.close()


async def stream(engine: Any, request: GenerationRequest) -> tuple[list[GenerationChunk], GenerationResult]:
    chunks, result = [], None
    async for item in engine.generate(request):
        if isinstance(item, GenerationChunk):
            chunks.append(item)
        else:
            result = item
    assert result is not None
    return chunks, result


def two_image_chat() -> Chat:
    return Chat(
        (
            Message.of("system", "Be brief."),
            Message.of("user", image_part(picture(40, 30, 1), "a"), "What is this?"),
            Message.of("assistant", "A box."),
            Message.of("user", "And", image_part(picture(20, 50, 2), "b"), "?"),
        )
    )


def reference_tokens(engine: Any, chat: Chat, max_tokens: int, eos: bool = True) -> list[int]:
    """mistral-inference's own ``generate`` (greedy) on the same prompt."""
    from mistral_inference.generate import generate

    prompt = encode_chat(engine.tokenizer, chat)
    out, _ = generate([prompt.tokens], engine.model, [prompt.images], max_tokens=max_tokens, temperature=0.0, eos_id=engine.text_tokenizer.eos_id if eos else None)
    return out[0]


def test_greedy_answer_equals_mistral_inference_generate(cpu_engine: Any) -> None:
    chat = two_image_chat()
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    chunks, result = asyncio.run(stream(cpu_engine, GenerationRequest(chat, greedy)))
    expected = reference_tokens(cpu_engine, chat, 12, eos=False)
    assert result.text == cpu_engine.text_tokenizer.decode(expected)
    assert "".join(c.text for c in chunks) == result.text
    assert result.completion_tokens == 12 and sum(c.token_count for c in chunks) <= 12
    assert result.finish_reason == "length"
    count = cpu_engine.count_prompt_tokens(chat)
    assert (result.prompt_tokens, result.image_tokens) == (count.prompt_tokens, count.image_tokens)
    assert list(count.per_image) == PIXTRAL.prompt_image_tokens([(40, 30), (20, 50)], variant="mistral")
    info = cpu_engine.info()
    assert (info.engine, info.family, info.max_images, info.max_model_len) == ("mistral", "pixtral", 8, 2048)


def test_stop_seed_eos_and_context(cpu_engine: Any) -> None:
    chat = Chat.single("Say something.", [image_part(picture(32, 32), "a")])
    full = asyncio.run(complete(cpu_engine, GenerationRequest(chat, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))))
    # A stop string from the greedy answer itself: the text ends before it, finish "stop".
    cut = full.text[len(full.text) // 2 :][:3]
    if cut.strip():
        stopped = asyncio.run(complete(cpu_engine, GenerationRequest(chat, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=(cut,)))))
        assert stopped.text == full.text[: full.text.find(cut)] and stopped.finish_reason == "stop"
    # Seeded sampling repeats; top_p is the request's.
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    first = asyncio.run(complete(cpu_engine, GenerationRequest(chat, seeded)))
    second = asyncio.run(complete(cpu_engine, GenerationRequest(chat, seeded)))
    assert first.text == second.text and first.completion_tokens == 8
    # Without ignore_eos the answer equals generate() with eos_id, stopping there if it comes.
    eos_result = asyncio.run(complete(cpu_engine, GenerationRequest(chat, SamplingParams(max_tokens=10, temperature=0.0))))
    assert eos_result.text == cpu_engine.text_tokenizer.decode(reference_tokens(cpu_engine, chat, 10))
    with pytest.raises(ContextLengthError, match="maximum context length is 2048"):
        asyncio.run(complete(cpu_engine, GenerationRequest(chat, SamplingParams(max_tokens=2040))))
    with pytest.raises(BadRequestError) as caught:
        asyncio.run(complete(cpu_engine, GenerationRequest(chat, SamplingParams(top_k=5))))
    assert caught.value.param == "top_k"
    with pytest.raises(BadRequestError) as caught:
        asyncio.run(complete(cpu_engine, GenerationRequest(Chat((Message.of("user", "hi"),), tools=(Tool("f"),)))))
    assert caught.value.param == "tools"


def test_xformers_on_a_cpu_is_reported_as_unavailable(tiny_checkpoint: Path) -> None:
    """Without the SDPA stand-in, xformers finds no CPU kernel: the error says what to do."""
    import torch
    from mistral_inference.transformer import Transformer

    tokenizer = MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json"))
    model = Transformer.from_folder(tiny_checkpoint, device="cpu", dtype=torch.float32)
    engine = ENGINES.get("mistral")(EngineSpec(model=str(tiny_checkpoint), engine="mistral"), tiny_checkpoint, tokenizer, model, concurrent.futures.ThreadPoolExecutor(1), 0.0)
    try:
        with pytest.raises(EngineUnavailableError, match="no attention kernel.*NVIDIA GPU"):
            asyncio.run(complete(engine, GenerationRequest(Chat.single("hi"), SamplingParams(max_tokens=2))))
    finally:
        engine.close()


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (xformers attention)")
def test_load_and_generate_on_cuda_equals_generate(tiny_checkpoint: Path) -> None:
    engine = ENGINES.get("mistral").load(EngineSpec(model=str(tiny_checkpoint), engine="mistral", dtype="bf16"))
    try:
        chat = two_image_chat()
        chunks, result = asyncio.run(stream(engine, GenerationRequest(chat, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))))
        assert result.text == engine.text_tokenizer.decode(reference_tokens(engine, chat, 8, eos=False))
        assert "".join(c.text for c in chunks) == result.text
        assert result.timings.peak_memory_bytes and engine.info().device == "cuda"
    finally:
        engine.close()
