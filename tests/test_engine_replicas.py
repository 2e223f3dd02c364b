"""Data parallelism in the transformers engine (``data_parallel_size``): nano copies decoding in
replica processes answer exactly as one process does; routing, cancellation and a dead replica."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from vlmlab.config import EngineSpec, server_settings
from vlmlab.engines import GenerationRequest, complete, load_engine
from vlmlab.protocol.core import Chat, SamplingParams
from vlmlab.protocol.errors import ConfigError, EngineError

from serverutil import data_url, free_port, image_message, png_bytes, running_server
from test_engine_hf import _batch_requests, image

pytest.importorskip("torch")
ENDLESS = SamplingParams(max_tokens=900, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair():
    """(one process, two copies) on nano."""
    single = load_engine(EngineSpec(model="nano", device="cpu"))
    double = load_engine(EngineSpec(model="nano", device="cpu", data_parallel_size=2))
    yield single, double
    double.close()
    single.close()


def run(coro):
    return asyncio.run(coro)


async def _until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _start_endless(engine, question: str, side: int, errors: list[BaseException] | None = None):
    """A task consuming an endless request, returned once its first token arrived; with
    ``errors``, an EngineError ends the task and lands there."""
    first = asyncio.Event()

    async def consume():
        try:
            async for _ in engine.generate(GenerationRequest(Chat.single(question, [image(side, side)]), ENDLESS)):
                first.set()
        except EngineError as exc:
            if errors is None:
                raise
            errors.append(exc)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 60)
    return task


async def _occupy_local(engine):
    """Start an endless request on the serving process's own copy (the first goes there)."""
    task = await _start_endless(engine, "Describe.", 80)
    assert engine.local_load == 1
    return task


async def _stop(task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_replica_starts_and_reports_itself(pair) -> None:
    _, double = pair
    details = double.info().details
    assert details["data_parallel_size"] == 2
    assert [r["alive"] for r in details["replicas"]] == [True, True]
    assert double.replicas[0].process.is_alive()
    assert double.replicas[0].process.pid != os.getpid()


def test_greedy_answers_equal_one_process_and_both_copies_decode(pair) -> None:
    single, double = pair
    requests = _batch_requests()
    before = [r["requests"] for r in double.info().details["replicas"]]

    async def together(engine):
        return await asyncio.gather(*[complete(engine, r) for r in requests])

    expected, got = run(together(single)), run(together(double))
    assert [r.text for r in got] == [r.text for r in expected]
    assert [(r.prompt_tokens, r.image_tokens, r.completion_tokens) for r in got] == [
        (r.prompt_tokens, r.image_tokens, r.completion_tokens) for r in expected
    ]
    after = [r["requests"] for r in double.info().details["replicas"]]
    served = [a - b for a, b in zip(after, before)]
    assert sum(served) == len(requests) and min(served) >= 2  # a burst is shared out
    assert all(r.timings.ttft_s > 0 and r.timings.decode_s >= 0 for r in got)


def test_a_replica_runs_the_vision_tower_of_its_own_requests(pair) -> None:
    """Images of requests routed to a replica are encoded there: the serving process's encoder
    cache holds only its own requests' images (it would otherwise encode for every copy)."""
    single, double = pair
    cache = double.encoder_cache
    entries_before, replica_before = cache.stats.entries, double.replicas[0].submitted
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    requests = [GenerationRequest(Chat.single("What colour is the shape?", [image(60 + 8 * i, 52 + 4 * i, c)]), SamplingParams(max_tokens=4, temperature=0))
                for i, c in enumerate(colours)]  # fmt: skip

    async def together(engine):
        return await asyncio.gather(*[complete(engine, r) for r in requests])

    got, expected = run(together(double)), run(together(single))
    assert [r.text for r in got] == [r.text for r in expected]
    sent = double.replicas[0].submitted - replica_before
    assert sent >= 2  # the burst was shared out
    assert cache.stats.entries - entries_before == len(requests) - sent
    # The timings say where: the hop and the tower in the replica, the tower here otherwise.
    hopped = [r.timings.stages for r in got if "replica_send" in r.timings.stages]
    assert len(hopped) == sent
    assert all(s["replica_send"] > 0 and s["encode"] > 0 and s["batch_wait"] >= 0 for s in hopped)
    assert all("encode" in r.timings.stages for r in got)


def test_one_request_at_a_time_stays_in_the_serving_process(pair) -> None:
    _, double = pair
    replica = double.replicas[0]
    before = replica.submitted
    for request in _batch_requests()[:3]:
        run(complete(double, request))
    assert replica.submitted == before


def test_a_replica_streams_and_samples_with_the_seed_like_the_serving_process(pair) -> None:
    _, double = pair
    sampled = SamplingParams(max_tokens=10, temperature=1.5, top_k=50, seed=77)
    request = GenerationRequest(Chat.single("What is it?", [image(70, 90, "green", "circle")]), sampled)
    alone = run(complete(double, request))  # the serving process's copy
    replica = double.replicas[0]

    async def on_the_replica():
        busy = await _occupy_local(double)
        before = replica.submitted
        chunks, result = [], None
        async for item in double.generate(request):
            if hasattr(item, "finish_reason"):
                result = item
            else:
                chunks.append(item.text)
        await _stop(busy)
        assert replica.submitted == before + 1
        return "".join(chunks), result

    streamed, result = run(on_the_replica())
    assert result.text == alone.text == streamed
    assert result.completion_tokens == alone.completion_tokens


def test_cancelling_a_request_stops_its_row_in_the_replica(pair) -> None:
    _, double = pair
    replica = double.replicas[0]

    async def scenario():
        busy = await _occupy_local(double)
        aborted = replica.aborted
        task = await _start_endless(double, "Tell me.", 60)
        assert replica.load == 1
        await _stop(task)
        await _until(lambda: replica.aborted == aborted + 1 and replica.load == 0)
        await _stop(busy)

    run(scenario())


def test_a_dead_replica_fails_its_requests_and_the_rest_goes_on() -> None:
    engine = load_engine(EngineSpec(model="nano", device="cpu", data_parallel_size=2))
    replica = engine.replicas[0]
    try:

        async def scenario():
            busy = await _occupy_local(engine)
            outcome: list[BaseException] = []
            task = await _start_endless(engine, "Go on.", 64, outcome)
            os.kill(replica.process.pid, signal.SIGKILL)
            await asyncio.wait_for(task, 60)
            await _stop(busy)
            return outcome

        outcome = run(scenario())
        assert len(outcome) == 1 and "replica 1 died" in str(outcome[0])
        assert not replica.alive
        details = engine.info().details["replicas"][1]
        assert details["alive"] is False and "exit code" in details["problem"]
        assert engine.health() == (True, "ok")
        request = GenerationRequest(Chat.single("Colour?", [image(50, 50)]), SamplingParams(max_tokens=4, temperature=0))

        async def burst():
            return await asyncio.gather(*[complete(engine, request) for _ in range(3)])

        assert all(r.completion_tokens >= 1 for r in run(burst()))
        assert replica.submitted == 1  # nothing more was sent to the dead copy
    finally:
        engine.close()


def test_bad_data_parallel_settings_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="data_parallel_size must be a whole number >= 1 or auto, got 0"):
        EngineSpec(data_parallel_size=0)
    with pytest.raises(ConfigError, match="only the hf and llamacpp engines"):
        load_engine(EngineSpec(engine="remote", data_parallel_size=2, extra={"base_url": "http://example.com/v1"}))
    assert server_settings({"data_parallel_size": 3}).engines[0].data_parallel_size == 3
    assert server_settings({"data_parallel_size": "auto"}).engines[0].data_parallel_size == "auto"
    assert EngineSpec(data_parallel_size="2").data_parallel_size == 2  # a flag's text
    with pytest.raises(ConfigError, match="or auto, got 'some'"):
        EngineSpec(data_parallel_size="some")


def test_auto_copies_rule() -> None:
    from vlmlab.engines.copies import plan_copies

    small, big = 10 * 2**20, 8 * 2**30
    rule = {"per_copy_bytes": 2**30, "small_bytes": 400 * 2**20}
    two = plan_copies(small, on_gpu=False, cpus=2, memory=16 * 2**30, **rule)
    assert (two.copies, two.threads) == (2, 1) and "small" in two.reason
    assert plan_copies(big, on_gpu=False, cpus=16, memory=64 * 2**30, **rule).copies == 1
    assert plan_copies(small, on_gpu=True, cpus=16, memory=64 * 2**30, **rule).copies == 1
    assert plan_copies(None, on_gpu=False, cpus=16, memory=64 * 2**30, **rule).copies == 1
    tight = plan_copies(small, on_gpu=False, cpus=8, memory=3 * 2**30, **rule)
    assert tight.copies == 3 and "memory" in tight.reason
    many = plan_copies(small, on_gpu=False, cpus=64, memory=2**40, max_copies=8, **rule)
    assert (many.copies, many.threads) == (8, 7)
    # On Ray the workers / replicas are the copies: a worker never starts copies of its own.
    from vlmlab.engines.ray_pool import worker_spec

    assert worker_spec(EngineSpec(data_parallel_size="auto"), 1).data_parallel_size == 1
    assert worker_spec(EngineSpec(data_parallel_size=3), 4).data_parallel_size == 3


def test_auto_on_nano_runs_a_copy_per_cpu_and_says_why() -> None:
    from vlmlab.engines.copies import available_cpus, available_memory

    engine = load_engine(EngineSpec(model="nano", device="cpu", data_parallel_size="auto"))
    try:
        details = engine.info().details
        expected = min(available_cpus(), 8, max(1, (available_memory() or 2**40) // (700 * 2**20 + 10 * 2**20)))
        assert details["data_parallel_size"] == expected
        assert "small" in details["copies_reason"] or "CPU" in details["copies_reason"]
        assert details["torch_threads"] == 1
    finally:
        engine.close()


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found |= {child, *_descendants(child)}
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_server_leaves_no_worker_processes(tmp_path: Path) -> None:
    """SIGKILL gives the server no chance to stop its replica and preprocessing processes:
    they notice that their parent is gone and exit."""
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"data_parallel_size": 2, "preprocess_pool_min_bytes": 0, "preprocess_workers": 1}))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vlmlab", "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.2)
        body = {"model": "nano", "max_tokens": 2, "messages": image_message("Colour?", data_url(png_bytes()))}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200
        assert "processor" not in answer.json()["timings"]["stages_ms"]  # preprocessed in the pool
        workers = _descendants(server.pid)
        assert len(workers) >= 3  # the replica, the preprocessing worker, multiprocessing's tracker
    finally:
        server.kill()
        server.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _running(pid)]


def test_a_server_with_two_copies_answers_streams_and_shows_them_in_stats() -> None:
    """`vlmlab serve --data-parallel-size 2` end to end, with the official client."""
    import openai

    from vlmlab.config import ServerSettings

    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu", data_parallel_size=2),), response_cache_entries=0)
    with running_server(settings) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        messages = image_message("What colour is the shape?", data_url(png_bytes(colour="blue")))

        async def burst():
            plain = [client.chat.completions.create(model="nano", messages=messages, max_tokens=16, temperature=0) for _ in range(6)]
            answers = await asyncio.gather(*plain)
            stream = await client.chat.completions.create(model="nano", messages=messages, max_tokens=16, temperature=0, stream=True)
            streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
            await client.close()
            return answers, streamed

        answers, streamed = run(burst())
        texts = {a.choices[0].message.content for a in answers}
        assert len(texts) == 1 and streamed in texts  # greedy: every copy says the same
        stats = httpx.get(f"{server.url}/stats", timeout=10).json()
        copies = stats["engine_details"]["replicas"]
        assert [c["alive"] for c in copies] == [True, True]
        assert sum(c["requests"] for c in copies) == 7 and min(c["requests"] for c in copies) >= 1
