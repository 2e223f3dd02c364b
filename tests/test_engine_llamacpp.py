"""The llama.cpp engine on nano converted to GGUF by llama.cpp's own converter: the export, greedy
parity with the transformers engine on every shipped sample, streaming, stops, cancellation,
seeds, copies, errors, and `vlmlab serve --engine llamacpp` driven by the openai client."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vlmlab.chat import load_images
from vlmlab.config import ServerSettings
from vlmlab.engines import EngineSpec, GenerationRequest, complete, load_engine
from vlmlab.engines.llamacpp.run_converter import digit_split_then_byte_level
from vlmlab.engines.llamacpp.translate import (
    GGUFFiles,
    TokenText,
    family_of,
    resized_size,
    resolve_files,
    sampler_plan,
    template_messages,
)
from vlmlab.families import get_family
from vlmlab.nano import checkpoint_path
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult, Message, SamplingParams
from vlmlab.protocol.errors import BadRequestError, ConfigError, ContextLengthError, NotFoundError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (pip install 'vlmlab[llamacpp]')")

SAMPLES = checkpoint_path().parent / "samples"
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> GGUFFiles:
    """nano exported by `vlmlab nano export-gguf`'s code path (llama.cpp's converter)."""
    from vlmlab.engines.llamacpp.convert import export_gguf

    return export_gguf(checkpoint_path(), tmp_path_factory.mktemp("gguf"), name="vlmlab-nano")


@pytest.fixture(scope="module")
def engine(gguf):
    eng = load_engine(EngineSpec(model=str(gguf.model), engine="llamacpp", extra={"mmproj": str(gguf.mmproj)}))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_engine():
    eng = load_engine(EngineSpec(model="nano"))
    yield eng
    eng.close()


def sample_chats() -> list[tuple[str, Chat]]:
    samples = json.loads((SAMPLES / "samples.json").read_text())
    return [(s["task"], Chat.single(s["question"], load_images([str(SAMPLES / f) for f in s["images"]]))) for s in samples]


# -- the export ------------------------------------------------------------------------------------


def test_export_writes_a_loadable_pair_with_the_two_fixes(gguf):
    from gguf import GGUFReader

    text = GGUFReader(str(gguf.model))
    projector = GGUFReader(str(gguf.mmproj))
    assert text.fields["general.name"].contents() == "vlmlab-nano"
    # nano's digits-then-byte-level pre-tokenizer, named as llama.cpp's equal "starcoder" one
    assert text.fields["tokenizer.ggml.pre"].contents() == "starcoder"
    assert projector.fields["clip.projector_type"].contents() == "pixtral"
    # the [IMG_BREAK] row the converter's --mmproj filter used to drop
    names = {t.name for t in projector.tensors}
    assert "v.token_embd.img_break" in names


def test_gguf_tokenizer_splits_text_as_the_checkpoint_tokenizer(gguf):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(checkpoint_path() / "tokenizer.json"))
    llama = llama_cpp.Llama(str(gguf.model), vocab_only=True, verbose=False)
    try:
        for text in ["What colour is the shape?", "Value 1234 at 56.7%, then 8 - 9!", "  two  spaces\tand tabs", "x=y+3*(z-10)/2"]:
            assert llama.tokenize(text.encode(), add_bos=False, special=False) == reference.encode(text, add_special_tokens=False).ids, text
    finally:
        llama.close()


def test_pre_tokenizer_rule_is_narrow(tmp_path):
    assert digit_split_then_byte_level(checkpoint_path() / "tokenizer.json")
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    assert not digit_split_then_byte_level(other)
    other.write_text(json.dumps({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated"}, {"type": "ByteLevel"}]}}))  # fmt: skip
    assert not digit_split_then_byte_level(other)


def test_cli_export_gguf_then_chat_answers_red(tmp_path):
    from typer.testing import CliRunner

    from vlmlab.cli import app

    runner = CliRunner()
    exported = runner.invoke(app, ["nano", "export-gguf", str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    model, mmproj = tmp_path / "out" / "vlmlab-nano.gguf", tmp_path / "out" / "mmproj-vlmlab-nano.gguf"
    assert model.is_file() and mmproj.is_file()
    answer = runner.invoke(app, ["chat", "--engine", "llamacpp", "--model", str(model), "--mmproj", str(mmproj),
                                 "--image", str(SAMPLES / "red_square.png"), "What colour is the shape?"])  # fmt: skip
    assert answer.exit_code == 0, answer.output
    assert answer.stdout.strip().splitlines()[0] == "red"
    assert "TTFT" in answer.output and "image tokens 54" in answer.output


# -- parity with the transformers engine ---------------------------------------------------------


def test_greedy_parity_with_hf_on_every_shipped_sample(engine, hf_engine):
    """Same answers and the same usage; with EOS masked, the same 8-token continuations too."""
    for task, chat in sample_chats():
        for sampling in (GREEDY, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
            ours = run(complete(engine, GenerationRequest(chat, sampling)))
            reference = run(complete(hf_engine, GenerationRequest(chat, sampling)))
            assert ours.text == reference.text, (task, sampling.ignore_eos)
            assert (ours.prompt_tokens, ours.image_tokens, ours.completion_tokens) == (
                reference.prompt_tokens, reference.image_tokens, reference.completion_tokens), task  # fmt: skip
            assert ours.finish_reason == reference.finish_reason
        assert engine.count_prompt_tokens(chat) == hf_engine.count_prompt_tokens(chat)


def test_images_are_resized_by_the_family_rule():
    nano = get_family("nano")
    assert resized_size(nano, 300, 200, {}) == nano.image_layout(300, 200).resized == (192, 128)
    assert resized_size(nano, 64, 48, {}) is None  # already whole patches within the longest edge
    assert resized_size(get_family("llava_next"), 300, 200, {}) is None  # tiling families: unchanged


# -- generation behaviour --------------------------------------------------------------------------


def test_streaming_chunks_add_up_to_the_result(engine):
    _, chat = sample_chats()[0]

    async def collect():
        return [item async for item in engine.generate(GenerationRequest(chat, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))]

    items = run(collect())
    chunks = [i for i in items if isinstance(i, GenerationChunk)]
    result = items[-1]
    assert isinstance(result, GenerationResult) and len(chunks) >= 2
    assert "".join(c.text for c in chunks) == result.text
    assert sum(c.token_count for c in chunks) == result.completion_tokens == 10
    assert result.finish_reason == "length"
    assert result.timings.ttft_s > 0 and result.timings.prefill_s > 0


def test_stop_string_ends_the_answer_before_it(engine):
    _, chat = sample_chats()[0]
    full = run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))))
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)))))
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_cancelling_frees_the_copy_for_the_next_request(engine):
    _, chat = sample_chats()[0]
    before = engine.counters["cancelled"]

    async def cancel_after_first_chunk():
        stream = engine.generate(GenerationRequest(chat, SamplingParams(max_tokens=900, temperature=0, ignore_eos=True)))
        async for item in stream:
            assert isinstance(item, GenerationChunk)
            break
        await stream.aclose()

    run(cancel_after_first_chunk())
    assert engine.counters["cancelled"] == before + 1
    started = time.perf_counter()
    answer = run(complete(engine, GenerationRequest(chat, GREEDY)))
    assert answer.text == "green"
    assert time.perf_counter() - started < 5  # not queued behind 900 tokens of the cancelled one


def test_seeded_sampling_repeats(engine):
    _, chat = sample_chats()[0]
    sampling = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    first = run(complete(engine, GenerationRequest(chat, sampling)))
    again = run(complete(engine, GenerationRequest(chat, sampling)))
    assert first.text == again.text and first.completion_tokens == 12


def test_logit_bias_and_penalties_are_honoured(engine):
    _, chat = sample_chats()[0]
    plain = run(complete(engine, GenerationRequest(chat, GREEDY)))
    first_token = llama_tokens(engine, plain.text)[0]
    biased = run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=12, temperature=0, logit_bias=((first_token, -100.0),)))))
    assert biased.text != plain.text
    with pytest.raises(BadRequestError, match="logit_bias token 99999"):
        run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=4, temperature=0, logit_bias=((99999, 1.0),)))))


def llama_tokens(engine, text: str) -> list[int]:
    return engine._copies[0].llama.tokenize(text.encode(), add_bos=False, special=False)


def test_context_and_image_limits_are_400s(engine):
    _, chat = sample_chats()[0]
    with pytest.raises(ContextLengthError, match="maximum context length is 1024"):
        run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=1000, temperature=0))))
    five = Chat.single("How many?", load_images([str(SAMPLES / "color.png")] * 5))
    with pytest.raises(BadRequestError, match="At most 4 image"):
        run(complete(engine, GenerationRequest(five, GREEDY)))
    with pytest.raises(BadRequestError, match="processor options"):
        engine.count_prompt_tokens(chat, {"longest_edge": 64})


def test_a_model_without_mmproj_refuses_images_but_answers_text(gguf):
    text_only = load_engine(EngineSpec(model=str(gguf.model), engine="llamacpp", extra={"n_threads": 1}))
    try:
        assert text_only.info().max_images == 0
        with pytest.raises(BadRequestError, match="without --mmproj"):
            run(complete(text_only, GenerationRequest(sample_chats()[0][1], GREEDY)))
        result = run(complete(text_only, GenerationRequest(Chat((Message.of("user", "Name the shape."),)), GREEDY)))
        assert result.image_tokens == 0 and result.prompt_tokens > 3
    finally:
        text_only.close()


def test_two_copies_answer_concurrent_requests_alike(gguf, engine):
    two = load_engine(EngineSpec(model=str(gguf.model), engine="llamacpp", data_parallel_size=2, extra={"mmproj": str(gguf.mmproj)}))
    try:
        assert two.info().details["data_parallel_size"] == 2 and two.info().details["threads_per_copy"] >= 1
        chats = [chat for _, chat in sample_chats()][:6]
        seen_threads: set[str] = set()
        original = two._generate

        def spy(*args, **kwargs):
            seen_threads.add(threading.current_thread().name)
            return original(*args, **kwargs)

        two._generate = spy

        async def together():
            return await asyncio.gather(*(complete(two, GenerationRequest(c, GREEDY)) for c in chats))

        answers = [r.text for r in run(together())]
        assert answers == [run(complete(engine, GenerationRequest(c, GREEDY))).text for c in chats]
        assert len(seen_threads) == 2
    finally:
        two.close()


# -- stale memory in llama.cpp's image buffers -------------------------------------------------------


def poison_the_free_heap() -> Callable[[], None]:
    """On the calling thread, fill its malloc arena's free memory with 0xFF bytes (NaN as float32),
    as a process that has run torch models can leave it; returns the function that releases the
    fence block that holds that memory in place.

    glibc first serves blocks under 24 MiB from the heap (freeing a 24 MiB block raises its mmap
    threshold, as torch's frees do); then 2 KiB blocks take every free block of the arena and
    8 MiB more, are filled and freed. 2 KiB is above tcache's sizes, so the freed blocks merge
    into large free chunks; the fence keeps them off the heap's top, which glibc may trim.
    """
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.mallinfo2.restype = MallInfo2
    libc.free(libc.malloc(24 << 20))
    start = libc.mallinfo2().arena
    blocks = []
    while libc.mallinfo2().arena < start + (8 << 20):
        for _ in range(4096):
            block = libc.malloc(2048)
            libc.memset(block, 0xFF, 2048)
            blocks.append(block)
    fence = libc.malloc(64)
    for block in blocks:
        libc.free(block)
    return lambda: libc.free(fence)


def test_image_answers_survive_stale_nan_bytes_in_llama_cpp_buffers(gguf):
    """The bug that once kept these tests in a process of their own (after tests/test_engine_archs.py
    answers came out empty): llama.cpp's Pixtral graph builds the [IMG_BREAK] rows from a buffer
    nothing writes, times 0, and 0 * NaN stays NaN. The copy's thread gets a heap of stale NaN
    bytes before its first image, where mtmd then allocates its compute buffer."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the stale heap is made with glibc's malloc")
    eng = load_engine(EngineSpec(model=str(gguf.model), engine="llamacpp", extra={"mmproj": str(gguf.mmproj)}))
    # One copy, one pool thread: the thread (and so the malloc arena) that runs the requests.
    release = eng.pool.submit(poison_the_free_heap).result()
    try:
        chat = Chat.single("What colour is the shape?", load_images([str(SAMPLES / "red_square.png")]))
        answer = run(complete(eng, GenerationRequest(chat, GREEDY)))
        assert (answer.text, answer.finish_reason, answer.image_tokens) == ("red", "stop", 54)
        # The trigger took: mtmd's buffer held the NaN bytes. (0 would mean llama.cpp no longer
        # reads them, or the heap was not poisoned.)
        assert eng.info().details["repaired_images"] == 1
    finally:
        release()
        eng.close()


def test_repair_image_embeddings_restores_only_spoiled_break_rows():
    import numpy as np

    from vlmlab.engines.llamacpp.projector import repair_image_embeddings
    from vlmlab.protocol.errors import EngineError

    img_break = np.arange(4, dtype=np.float32)
    rows = np.ones((3, 4), dtype=np.float32)
    rows[1] = img_break
    rows[1, [0, 2]] = np.nan
    assert repair_image_embeddings(rows, img_break) == 1
    assert rows.tolist() == [[1.0] * 4, img_break.tolist(), [1.0] * 4]
    assert repair_image_embeddings(rows, img_break) == 0
    rows[2, 3] = np.inf  # not the break row: refused, not patched
    with pytest.raises(EngineError, match="non-finite embeddings in 1 of 3 image tokens"):
        repair_image_embeddings(rows, img_break)
    with pytest.raises(EngineError, match="non-finite"):
        repair_image_embeddings(np.full((2, 4), np.nan, dtype=np.float32), None)


# -- translation, pure -----------------------------------------------------------------------------


def test_resolve_files(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "mmproj-m.gguf").write_bytes(b"GGUF")
    assert resolve_files(str(tmp_path), {}) == GGUFFiles((tmp_path / "m.gguf").resolve(), (tmp_path / "mmproj-m.gguf").resolve())
    assert resolve_files(str(tmp_path / "m.gguf"), {"mmproj": "mmproj-m.gguf"}).mmproj == (tmp_path / "mmproj-m.gguf").resolve()
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="--gguf-file"):
        resolve_files(str(tmp_path), {})
    assert resolve_files(str(tmp_path), {"gguf_file": "n.gguf"}).model.name == "n.gguf"
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_files(str(tmp_path / "missing.gguf"), {})
    with pytest.raises(NotFoundError, match="--mmproj nope.gguf"):
        resolve_files(str(tmp_path / "m.gguf"), {"mmproj": "nope.gguf"})
    with pytest.raises(ConfigError, match="--gguf-file"):
        resolve_files("ggml-org/pixtral-12b-GGUF", {})
    fetched = []
    files = resolve_files("org/repo-GGUF", {"gguf_file": "a.gguf", "mmproj": "mm.gguf"},
                          download=lambda repo, name: fetched.append((repo, name)) or f"/cache/{name}")  # fmt: skip
    assert files == GGUFFiles(Path("/cache/a.gguf"), Path("/cache/mm.gguf"))
    assert fetched == [("org/repo-GGUF", "a.gguf"), ("org/repo-GGUF", "mm.gguf")]


def test_family_of_metadata():
    assert family_of({"general.name": "vlmlab-nano"}, "pixtral").name == "nano"
    assert family_of({"general.name": "Pixtral 12B"}, "pixtral").name == "pixtral"
    assert family_of({"general.name": "x"}, "qwen2vl_merger").name == "qwen2_vl"
    assert family_of({}, None) is None
    assert family_of({}, None, "qwen2_5_vl").name == "qwen2_5_vl"
    with pytest.raises(ConfigError, match="--family"):
        family_of({}, None, "no-such-family")


def test_sampler_plan_masks_end_tokens_only_for_ignore_eos():
    plan = sampler_plan(SamplingParams(temperature=0), 448, (2,))
    assert plan.greedy and plan.logit_bias == () and plan.repeat_penalty == 1.0
    masked = sampler_plan(SamplingParams(temperature=0, ignore_eos=True, logit_bias=((7, 2.0),)), 448, (2,))
    assert masked.logit_bias == ((2, float("-inf")), (7, 2.0))
    with pytest.raises(BadRequestError) as err:
        sampler_plan(SamplingParams(logit_bias=((448, 1.0),)), 448)
    assert err.value.param == "logit_bias"


def test_token_text_holds_split_utf8():
    text = TokenText()
    encoded = "é✓".encode()
    assert text.feed(encoded[:1]) == ""
    assert text.feed(encoded[1:3]) == "é"
    assert text.feed(encoded[3:]) == "✓"
    assert text.flush() == ""


def test_template_messages_put_the_marker_where_images_are():
    chat = Chat.single("What?", load_images([str(SAMPLES / "color.png")]))
    assert template_messages(chat, "<M>") == [{"role": "user", "content": [{"type": "text", "text": "<M>"}, {"type": "text", "text": "What?"}]}]


# -- served ----------------------------------------------------------------------------------------


def test_served_with_the_openai_client(gguf):
    from openai import BadRequestError as OpenAIBadRequest
    from openai import OpenAI
    from serverutil import running_server

    spec = EngineSpec(model=str(gguf.model), engine="llamacpp", extra={"mmproj": str(gguf.mmproj)})
    image = "data:image/png;base64," + base64.b64encode((SAMPLES / "red_square.png").read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What colour is the shape?"}]}]
    with running_server(ServerSettings(engines=(spec,), response_cache_entries=0)) as server:
        client = OpenAI(base_url=server.base_url, api_key="x")
        answer = client.chat.completions.create(model=str(gguf.model), messages=messages, temperature=0, max_tokens=8)
        assert answer.choices[0].message.content == "red", answer
        assert answer.usage.prompt_tokens == 63 and answer.usage.prompt_tokens_details.image_tokens == 54
        stream = client.chat.completions.create(model=str(gguf.model), messages=messages, temperature=0, max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "red"
        with pytest.raises(OpenAIBadRequest, match="logprobs"):
            client.chat.completions.create(model=str(gguf.model), messages=messages, max_tokens=4, logprobs=True)
        broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAA"}}, {"type": "text", "text": "?"}]}]
        with pytest.raises(OpenAIBadRequest):
            client.chat.completions.create(model=str(gguf.model), messages=broken, max_tokens=4)
        # the server still answers after the refusals
        again = client.chat.completions.create(model=str(gguf.model), messages=messages, temperature=0, max_tokens=8)
        assert again.choices[0].message.content == "red"


def test_default_threads_leave_a_core_to_the_server():
    from vlmlab.engines.llamacpp.translate import default_threads

    assert default_threads(1, cpus=2) == 1
    assert default_threads(2, cpus=2) == 1
    assert default_threads(1, cpus=16) == 15
    assert default_threads(3, cpus=16) == 5


def test_structured_outputs_through_llama_cpp_grammars(engine):
    from vlmlab.protocol.core import StructuredOutput

    _, chat = sample_chats()[0]
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"], "additionalProperties": False}
    as_json = run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=40, temperature=0, structured=StructuredOutput("json_schema", json.dumps(schema))))))
    assert json.loads(as_json.text)["colour"] in ("red", "green", "blue")
    picked = run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=8, temperature=0, structured=StructuredOutput("choice", json.dumps(["circle", "cube"]))))))
    assert picked.text in ("circle", "cube")
    with pytest.raises(BadRequestError, match="regex") as err:
        run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=8, structured=StructuredOutput("regex", "[a-z]+")))))
    assert err.value.param == "response_format"
    with pytest.raises(BadRequestError, match="could not parse the grammar"):
        run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=8, structured=StructuredOutput("grammar", "root ::= ((", param="structured_outputs")))))


def test_a_prompt_that_starts_with_an_image_after_an_earlier_request(gguf, engine):
    """A template override whose prompt opens with the image: the previous request's KV cells
    must be gone before mtmd decodes the image at position 0."""
    template = "{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}[/INST]"
    eng = load_engine(EngineSpec(model=str(gguf.model), engine="llamacpp", extra={"mmproj": str(gguf.mmproj), "chat_template": template}))
    try:
        chat = Chat.single("What colour is the shape?", load_images([str(SAMPLES / "red_square.png")]))
        answers = [run(complete(eng, GenerationRequest(chat, GREEDY))) for _ in range(3)]
        usual = run(complete(engine, GenerationRequest(chat, GREEDY)))  # <s>[INST] first
        assert {a.text for a in answers} == {usual.text}
        assert answers[0].prompt_tokens == usual.prompt_tokens - 2 and answers[0].image_tokens == usual.image_tokens
    finally:
        eng.close()


def test_auto_copies_for_a_small_gguf(gguf):
    from vlmlab.engines.copies import available_cpus

    auto = load_engine(EngineSpec(model=str(gguf.model), engine="llamacpp", data_parallel_size="auto", extra={"mmproj": str(gguf.mmproj)}))
    try:
        details = auto.info().details
        assert details["data_parallel_size"] == min(available_cpus(), 8) and details["threads_per_copy"] >= 1
        assert "small" in details["copies_reason"]
    finally:
        auto.close()
    remote = EngineSpec(engine="remote", data_parallel_size="auto", extra={"base_url": "http://127.0.0.1:9/v1"})
    assert remote.data_parallel_size == "auto"  # load_engine gives the remote engine 1: its server parallelises
