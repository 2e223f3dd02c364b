"""The transformers engine on the real nano checkpoint: usage counts against the real processor,
streaming, batching invariance, the preprocessing cache, stops, cancellation and errors."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlmlab.engines import EngineSpec, GenerationRequest, complete, load_engine
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
)
from vlmlab.protocol.errors import BadRequestError, ConfigError, ContextLengthError, NotFoundError

pytest.importorskip("torch")
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def image(w: int, h: int, colour: str = "red", shape: str = "square") -> ImagePart:
    im = Image.new("RGB", (w, h), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(im)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    data = buf.getvalue()
    return ImagePart(ref=f"{colour}-{shape}-{w}x{h}", data=ImageData(im, w, h, "PNG", hashlib.sha256(data).hexdigest(), len(data)))


@pytest.fixture(scope="module")
def engine():
    eng = load_engine(EngineSpec(model="nano", max_batch_size=16))
    yield eng
    eng.close()


def run(coro):
    return asyncio.run(coro)


def reference_inputs(chat: Chat):
    """What transformers itself makes of the chat: AutoProcessor + the checkpoint's template."""
    from transformers import AutoProcessor

    from vlmlab.engines.hf.prompt import to_hf_messages

    processor = AutoProcessor.from_pretrained(checkpoint_path())
    prompt = processor.apply_chat_template(to_hf_messages(chat), add_generation_prompt=True, tokenize=False)
    images = [p.data.image for p in chat.images]
    return processor(text=[prompt], images=images or None, return_tensors="pt", add_special_tokens=False), processor


def test_info_and_family(engine) -> None:
    info = engine.info()
    assert info.engine == "hf" and info.family == "nano" and info.device == "cpu"
    assert info.max_model_len == 1024 and info.max_images == get_family("nano").max_images


def test_usage_equals_the_real_processor(engine) -> None:
    chat = Chat.single("What colour is the square?", [image(100, 60), image(300, 200, "blue")])
    result = run(complete(engine, GenerationRequest(chat, GREEDY)))
    ref, processor = reference_inputs(chat)
    ids = ref["input_ids"][0].tolist()
    special = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    assert result.prompt_tokens == len(ids)
    assert result.image_tokens == sum(i in special for i in ids)
    family = get_family("nano")
    assert result.image_tokens == family.image_tokens(100, 60) + family.image_tokens(300, 200)
    assert 1 <= result.completion_tokens <= GREEDY.max_tokens
    count = engine.count_prompt_tokens(chat)
    assert (count.prompt_tokens, count.image_tokens) == (result.prompt_tokens, result.image_tokens)
    assert engine.expansion_mismatches == 0
    assert result.timings.ttft_s > 0 and result.timings.total_s >= result.timings.ttft_s


def test_spliced_preprocessing_equals_whole_processing(engine) -> None:
    import torch

    chat = Chat(
        (
            Message.of("system", "Answer in one word."),
            Message.of("user", image(64, 64, "green"), "first", image(190, 90, "blue", "circle"), "second?"),
        )
    )
    prompt = engine.render(chat)
    images = [p.data for p in chat.images]
    spliced = engine.preprocessor(prompt, images, {}).inputs
    ref, _ = reference_inputs(chat)
    assert spliced["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(spliced["image_sizes"], ref["image_sizes"])
    assert torch.allclose(spliced["pixel_values"], ref["pixel_values"], atol=1e-6)


def streamed(engine, request: GenerationRequest) -> tuple[list[GenerationChunk], GenerationResult]:
    """A generation's chunks and its result."""

    async def collect():
        return [item async for item in engine.generate(request)]

    items = run(collect())
    assert isinstance(items[-1], GenerationResult) and all(isinstance(i, GenerationChunk) for i in items[:-1])
    return items[:-1], items[-1]


def test_streaming_chunks_add_up_to_the_result(engine) -> None:
    chunks, result = streamed(engine, GenerationRequest(Chat.single("What shape is it?", [image(120, 120)]), GREEDY))
    assert "".join(c.text for c in chunks) == result.text


def test_a_request_that_does_not_stream_gets_only_its_result(engine) -> None:
    """stream=False (a non-streaming API call): no per-token chunks, the same answer."""

    chat = Chat.single("What shape is it?", [image(110, 80, "blue", "circle")])
    chunks, result = streamed(engine, GenerationRequest(chat, GREEDY))
    no_chunks, alone = streamed(engine, GenerationRequest(chat, GREEDY, stream=False))
    assert chunks and not no_chunks
    assert (alone.text, alone.completion_tokens) == (result.text, result.completion_tokens)


def test_streamed_chunks_count_the_tokens_since_the_previous_chunk(engine) -> None:
    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    chunks, result = streamed(engine, GenerationRequest(Chat.single("Describe it.", [image(90, 70)]), sampling))
    counts = [c.token_count for c in chunks]
    assert len(counts) > 3 and all(c >= 1 for c in counts)
    # Tokens that add no text yet are counted with the next chunk; none is counted twice.
    assert result.completion_tokens - 2 <= sum(counts) <= result.completion_tokens == 24


def _batch_requests() -> list[GenerationRequest]:
    questions = ["What colour is the shape?", "What shape is it?", "How many shapes are there?", "Is it red?"]
    colours = ["red", "blue", "green", "yellow"]
    return [
        GenerationRequest(
            Chat.single(questions[i % 4] * (1 + i % 3), [image(60 + 23 * i, 40 + 17 * i, colours[i % 4], "circle" if i % 2 else "square")]),
            SamplingParams(max_tokens=8 + i % 5, temperature=0),
        )
        for i in range(8)
    ]


def test_greedy_output_is_identical_alone_and_batched(engine) -> None:
    requests = _batch_requests()

    async def one_by_one():
        return [await complete(engine, r) for r in requests]

    async def together():
        return await asyncio.gather(*[complete(engine, r) for r in requests])

    alone = run(one_by_one())
    batched = run(together())
    assert [r.text for r in alone] == [r.text for r in batched]
    assert [r.completion_tokens for r in alone] == [r.completion_tokens for r in batched]
    assert [r.prompt_tokens for r in alone] == [r.prompt_tokens for r in batched]


def test_seeded_sampling_is_reproducible_at_any_batch_size(engine) -> None:
    sampled = SamplingParams(max_tokens=10, temperature=1.5, top_k=50, top_p=0.95, seed=1234)
    request = GenerationRequest(Chat.single("Describe it.", [image(90, 90, "blue")]), sampled)
    first = run(complete(engine, request)).text

    async def in_a_batch():
        others = [GenerationRequest(r.chat, SamplingParams(max_tokens=10, temperature=0.9, seed=i)) for i, r in enumerate(_batch_requests()[:5])]
        results = await asyncio.gather(complete(engine, request), *[complete(engine, o) for o in others])
        return results[0].text

    assert run(in_a_batch()) == first
    other_seed = GenerationRequest(request.chat, SamplingParams(max_tokens=10, temperature=1.5, top_k=50, top_p=0.95, seed=99))
    texts = {run(complete(engine, other_seed)).text for _ in range(2)}
    assert len(texts) == 1  # same seed twice: same answer


def test_stop_strings_and_max_tokens(engine) -> None:
    chat = Chat.single("Describe the image in detail.", [image(150, 100)])
    # nano answers in a word; hot seeded sampling gives a longer, reproducible text to cut.
    for seed in range(50):
        hot = SamplingParams(max_tokens=20, temperature=2.0, seed=seed)
        free = run(complete(engine, GenerationRequest(chat, hot)))
        if len(free.text) >= 4:
            break
    assert len(free.text) >= 4, "no seed gave a text long enough to test stop strings"
    stop = free.text[2:4]
    cut = SamplingParams(max_tokens=20, temperature=2.0, seed=seed, stop=(stop,))
    stopped = run(complete(engine, GenerationRequest(chat, cut)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    one = run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=1, temperature=0))))
    assert one.completion_tokens <= 1
    assert one.finish_reason == ("length" if one.completion_tokens == 1 else "stop")


def test_preprocessing_cache_hits_and_skips_decoding(engine) -> None:
    part = image(173, 101, "green", "circle")
    request = GenerationRequest(Chat.single("What colour?", [part]), GREEDY)
    first = run(complete(engine, request))
    again = run(complete(engine, request))
    assert again.timings.preprocess_cache_hits == 1 and again.text == first.text
    processed = engine.lookup_processed(part.data.sha256)
    assert processed is not None and (processed.width, processed.height) == (173, 101)
    undecoded = ImageData(None, 173, 101, "PNG", part.data.sha256, part.data.nbytes, processed=processed)
    third = run(complete(engine, GenerationRequest(Chat.single("What colour?", [ImagePart(ref="x", data=undecoded)]), GREEDY)))
    assert third.text == first.text and third.prompt_tokens == first.prompt_tokens


def test_cancelling_the_consumer_frees_the_slot(engine) -> None:
    endless = SamplingParams(max_tokens=900, temperature=0, ignore_eos=True)
    request = GenerationRequest(Chat.single("Describe.", [image(100, 100)]), endless)
    aborted_before = engine.batcher.aborted_total

    async def scenario():
        first_chunk = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request):
                first_chunk.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_chunk.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.wait_for(complete(engine, GenerationRequest(Chat.single("Colour?", [image(50, 50)]), GREEDY)), 60)

    assert run(scenario()).completion_tokens >= 1
    assert engine.batcher.aborted_total == aborted_before + 1


def test_ignore_eos_generates_to_max_tokens(engine) -> None:
    params = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)
    result = run(complete(engine, GenerationRequest(Chat.single("Colour?", [image(40, 40)]), params)))
    assert result.completion_tokens == 25 and result.finish_reason == "length"


def test_context_and_image_limits_are_checked_before_work(engine) -> None:
    chat = Chat.single("Colour?", [image(100, 100)])
    with pytest.raises(ContextLengthError, match="maximum context length is 1024 tokens"):
        run(complete(engine, GenerationRequest(chat, SamplingParams(max_tokens=1020))))
    too_many = Chat.single("Colour?", [image(20, 20)] * (engine.max_images + 1))
    with pytest.raises(BadRequestError, match=f"At most {engine.max_images} image"):
        run(complete(engine, GenerationRequest(too_many, GREEDY)))


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_engine(EngineSpec(model=str(tmp_path / "nope")))
    with pytest.raises(NotFoundError, match="HF_HUB_OFFLINE"):
        load_engine(EngineSpec(model="someone/not-cached-vlm"))
    broken = tmp_path / "no-template"
    shutil.copytree(checkpoint_path(), broken)
    (broken / "chat_template.jinja").unlink()
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = broken / name
        config = json.loads(path.read_text())
        config.pop("chat_template", None)
        path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has no chat template"):
        load_engine(EngineSpec(model=str(broken)))


def test_nano_refuses_a_transformers_too_old_for_it() -> None:
    """transformers 5.17 loads nano's weights but answers wrongly (0.0 on synth): the check that
    load runs first refuses it with the fix. The installed release (the lock's) passes it."""
    from vlmlab.engines.sources import check_nano_transformers

    check_nano_transformers()
    check_nano_transformers("5.18.0")
    with pytest.raises(ConfigError, match=r"transformers>=5\.18 \(installed: 5\.17\.0"):
        check_nano_transformers("5.17.0")


def test_vlmlab_preprocessing_equals_the_model_processor_on_many_sizes(engine) -> None:
    """The default image path (vlmlab.preprocess + the family's own expansion) against the
    checkpoint's PixtralProcessor, including images larger than the 192 px edge."""
    import torch

    assert engine.preprocessor.own_images
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint_path())
    for w, h in [(1, 1), (15, 17), (191, 193), (400, 90), (1200, 1600), (4032, 3024)]:
        part = image(w, h, "purple", "circle")
        prepared = engine.preprocessor("[INST][IMG]x[/INST]", [part.data], {})
        ref = processor(text=["[INST][IMG]x[/INST]"], images=[part.data.image], return_tensors="pt", add_special_tokens=False)
        assert prepared.inputs["input_ids"].tolist() == ref["input_ids"].tolist(), (w, h)
        assert torch.equal(prepared.inputs["image_sizes"], ref["image_sizes"])
        assert torch.allclose(prepared.inputs["pixel_values"], ref["pixel_values"], atol=1e-5), (w, h)
        assert "resize" in prepared.stages  # timed by vlmlab.preprocess, not the HF processor


@pytest.mark.parametrize("lengths", [[], [5], [30, 150, 31, 152, 90, 88, 40, 41, 120], [10] * 16, [1, 1000, 2, 999]])
def test_prefill_length_groups_bound_the_padding(lengths) -> None:
    from vlmlab.engines.hf.continuous import length_groups

    groups = length_groups(lengths, slack=1.3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each index once
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1.3 * sum(lengths[i] for i in g)
    if lengths == [10] * 16:
        assert len(groups) == 1  # equal lengths are never split


def test_images_encoded_ahead_answer_as_encoded_in_the_prefill(engine) -> None:
    """nano's vision tower runs in the request's worker thread (encode_ahead, the default for
    LLaVA-layout models) or inside the batched prefill: the same greedy answers and usage."""
    assert engine.encode_ahead
    other = load_engine(EngineSpec(model="nano", max_batch_size=16, extra={"encode_ahead": False}))
    try:
        assert not other.encode_ahead
        requests = _batch_requests()[:5]

        async def together(eng):
            return await asyncio.gather(*[complete(eng, r) for r in requests])

        ahead, inside = run(together(engine)), run(together(other))
        assert [(r.text, r.prompt_tokens, r.completion_tokens) for r in ahead] == [
            (r.text, r.prompt_tokens, r.completion_tokens) for r in inside
        ]
        assert all("encode" in r.timings.stages for r in ahead)
        hits = engine.encoder_cache.stats.hits
        again = run(together(engine))  # the same images: their tower outputs come from the cache
        assert engine.encoder_cache.stats.hits >= hits + len(requests)
        assert [r.text for r in again] == [r.text for r in ahead]
    finally:
        other.close()


def test_concurrent_requests_for_one_new_image_preprocess_and_encode_it_once(engine) -> None:
    """Requests that arrive together with the same image wait for the one that computes it,
    instead of each preprocessing and encoding it again (a single flight per cache key)."""
    picture = image(173, 131, "purple", "circle")  # seen by no other test
    requests = [GenerationRequest(Chat.single(f"Question {i}: what colour?", [picture]), SamplingParams(max_tokens=4, temperature=0)) for i in range(8)]
    before = (engine.preprocess_cache.stats.queries, engine.preprocess_cache.stats.hits, engine.encoder_cache.stats.queries, engine.encoder_cache.stats.hits)

    async def together():
        return await asyncio.gather(*[complete(engine, r) for r in requests])

    results = run(together())
    after = (engine.preprocess_cache.stats.queries, engine.preprocess_cache.stats.hits, engine.encoder_cache.stats.queries, engine.encoder_cache.stats.hits)
    preprocess_misses = (after[0] - before[0]) - (after[1] - before[1])
    encoder_misses = (after[2] - before[2]) - (after[3] - before[3])
    assert preprocess_misses == 1 and encoder_misses == 1, (preprocess_misses, encoder_misses)
    assert sum(r.timings.preprocess_cache_hits for r in results) >= len(requests) - 1
    assert len({r.text for r in results}) >= 1 and all(r.completion_tokens for r in results)


def test_a_failed_computation_releases_its_waiters() -> None:
    import threading

    from vlmlab.cache import LRUCache

    cache: LRUCache[str] = LRUCache(100)
    value, claimed = cache.get_or_claim("k")
    assert value is None and claimed
    got: list[tuple] = []
    waiter = threading.Thread(target=lambda: got.append(cache.get_or_claim("k")))
    waiter.start()
    cache.release("k")  # the computation failed: nothing was put
    waiter.join(5)
    assert got == [(None, False)]  # the waiter computes it itself, unclaimed
    cache.put("k", "v")
    assert cache.get_or_claim("k") == ("v", False)


@pytest.mark.parametrize("temperature", [1e-30, 1e-300])
def test_extreme_sampling_parameters_still_answer(engine, temperature) -> None:
    """A temperature so small that logits / temperature overflows float32 samples the most
    likely token instead of failing the batch (fuzzing found it)."""
    sampling = SamplingParams(max_tokens=3, temperature=temperature, top_p=1e-9, seed=1)
    result = run(complete(engine, GenerationRequest(Chat.single("What colour?", [image(60, 60)]), sampling)))
    greedy = run(complete(engine, GenerationRequest(Chat.single("What colour?", [image(60, 60)]), SamplingParams(max_tokens=3, temperature=0))))
    assert result.text == greedy.text


def test_decode_steps_skip_the_wrapper_only_where_the_logits_are_the_same(engine) -> None:
    """Decode steps run the text decoder and the LM head directly once a first step has shown
    the wrapper's logits are the same; a decoder that would change them keeps the wrapper."""
    import copy

    import torch
    from transformers import DynamicCache

    from vlmlab.engines.hf.continuous import ContinuousDecoder

    run(complete(engine, GenerationRequest(Chat.single("What colour is the shape?", [image(64, 64)]), GREEDY)))
    decoder = engine.batcher.decoder
    assert decoder._direct is not None and decoder._direct[0] is engine.model.get_decoder()
    # A decoder whose last norm differs: its logits would differ, so the check refuses it.
    changed = copy.deepcopy(engine.model.get_decoder())
    with torch.no_grad():
        changed.norm.weight.mul_(1.5)
    probe = ContinuousDecoder(engine.model, engine.pad_id, engine.eos_ids, engine.decode_ids, "cpu", on_step=lambda: None)
    prompt = {"input_ids": torch.tensor([[1, 5, 9, 11]]), "use_cache": True}
    probe.cache = DynamicCache()
    with torch.inference_mode():  # a 4-token prompt in the cache the step continues
        engine.model(**prompt, **{probe.cache_arg: probe.cache})
    step = {"input_ids": torch.tensor([[7]]), "position_ids": torch.tensor([[4]]), "cache_position": torch.tensor([4]), "use_cache": True}
    assert probe._check_direct(step) is not None
    probe.model = copy.copy(engine.model)
    probe.model.get_decoder = lambda: changed
    assert probe._check_direct(step) is None
    probe.close()
