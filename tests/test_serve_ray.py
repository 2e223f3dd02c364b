"""``vlmlab serve --ray`` (issue 20): two replicas of nano as a Ray Serve application on a local
cluster of two nodes that the tests start, behind the front that ``serve --ray`` runs, driven by
the official ``openai`` client. Image affinity, merged /stats and /metrics, plain ``serve``'s
errors, and a replica killed mid-load."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (vlmlab[ray])")
pytest.importorskip("ray.serve.request_router", reason="Ray Serve is not installed (vlmlab[ray])")

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from vlmlab.config import server_settings  # noqa: E402
from vlmlab.server.ray_serve import REPLICA_HEADER, front_app, start  # noqa: E402

KEY = "secret-key"


def picture(i: int) -> str:
    """A distinct small PNG as a data URL (a shape in a colour and place of its own)."""
    image = Image.new("RGB", (96, 96), "white")
    x, y = 8 + i % 5 * 10, 8 + i // 5 % 4 * 10
    ImageDraw.Draw(image).rectangle((x, y, x + 40, y + 30), fill=((37 * i) % 256, (91 * i) % 256, 200))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url: str, question: str = "What colour is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]


class Served:
    def __init__(self, base: str, front):
        self.base = base
        self.front = front
        self.client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)

    def replicas(self) -> list[str]:
        return list(httpx.get(self.base + "/health").json()["replicas"])


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A head node and a second node, one CPU each; one replica (one CPU) lands on each."""
    from ray import serve

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    settings = server_settings({
        "device": "cpu", "api_key": KEY, "max_request_bytes": "1MiB",
        "ray": {"replicas": 2, "num_cpus": 1},
    })  # fmt: skip
    front = start(settings)
    server = uvicorn.Server(uvicorn.Config(front_app(front, settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(f"http://127.0.0.1:{port}", front)
    server.should_exit = True
    thread.join(10)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_two_replicas_on_two_nodes_answer_the_openai_client_and_both_get_work(served: Served) -> None:
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and len(served.replicas()) == 2

    async def burst() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0)

        async def one(i: int) -> tuple[str, str]:
            raw = await client.chat.completions.with_raw_response.create(
                model="nano", messages=chat(picture(i)), max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
            return raw.headers[REPLICA_HEADER], raw.parse().choices[0].message.content or ""

        return await asyncio.gather(*(one(i) for i in range(12)))

    answered = asyncio.run(burst())
    assert {replica for replica, _ in answered} == set(served.replicas())  # both replicas got work
    assert all(text for _, text in answered)

    stream = served.client.chat.completions.create(model="nano", messages=chat(picture(3)), max_tokens=12, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = served.client.chat.completions.create(model="nano", messages=chat(picture(3)), max_tokens=12, temperature=0)
    assert streamed == whole.choices[0].message.content and streamed


def test_the_same_image_goes_to_the_same_replica_and_hits_its_cache(served: Served) -> None:
    before = httpx.get(served.base + "/stats").json()["preprocess_cache"]["hits"]
    first: dict[int, str] = {}
    for round_ in range(3):
        for i in range(20, 26):
            raw = served.client.chat.completions.with_raw_response.create(model="nano", messages=chat(picture(i), f"Question {round_}?"), max_tokens=4)
            replica = raw.headers[REPLICA_HEADER]
            assert first.setdefault(i, replica) == replica, f"image {i} moved from {first[i]} to {replica}"
    stats = httpx.get(served.base + "/stats").json()
    assert stats["preprocess_cache"]["hits"] - before >= 12  # rounds 2 and 3 of 6 images
    assert stats["routing"]["router"] == "affinity" and stats["routing"]["routed"]["affinity"] >= 12
    assert len(stats["replicas"]) == 2 and all(r["model"] == "nano" for r in stats["replicas"].values())
    deadline = time.monotonic() + 5  # completions are counted by a callback, a moment after the answer
    while set(stats["routing"]["in_flight"].values()) != {0} and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = httpx.get(served.base + "/stats").json()
    assert set(stats["routing"]["in_flight"].values()) == {0}  # the /stats calls themselves are not load


def test_metrics_cover_every_replica(served: Served) -> None:
    served.client.chat.completions.create(model="nano", messages=chat(picture(1)), max_tokens=2)
    text = httpx.get(served.base + "/metrics").text
    labelled = {line.split('replica="')[1].split('"')[0] for line in text.splitlines() if 'replica="' in line}
    assert labelled == set(served.replicas())
    assert text.count("# TYPE vlmlab_requests") == len({line for line in text.splitlines() if line.startswith("# TYPE vlmlab_requests")})


def test_bad_input_gets_plain_serves_errors(served: Served) -> None:
    base = served.base
    auth = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.post(base + "/v1/chat/completions", json={"model": "nano", "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "AuthenticationError"
    bad = httpx.post(base + "/v1/chat/completions", headers=auth, json={"model": "nano", "messages": "hello"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    unknown = httpx.post(base + "/v1/chat/completions", headers=auth, json={"model": "nanoo", "messages": chat(picture(0))})
    assert unknown.status_code == 404 and "nano" in unknown.json()["error"]["message"]
    big = httpx.post(base + "/v1/chat/completions", headers=auth, content=b"x" * (2 * 2**20))
    assert big.status_code == 413 and big.json()["error"]["type"]
    refused = httpx.post(base + "/v1/chat/completions", headers=auth, json={"model": "nano", "messages": chat(picture(0)), "best_of": 2})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "best_of"
    not_json = httpx.post(base + "/v1/chat/completions", headers={**auth, "content-type": "application/json"}, content=b"{")
    assert not_json.status_code == 400


def test_ray_flags_without_ray_are_named() -> None:
    done = subprocess.run([sys.executable, "-m", "vlmlab", "serve", "--replicas", "3"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--replicas needs --ray" in done.stderr and "Traceback" not in done.stderr


def test_a_replica_killed_mid_load_fails_only_its_streams_and_comes_back(served: Served) -> None:
    before = set(served.replicas())
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "nano", "max_tokens": 200, "temperature": 0}

    async def load() -> tuple[list[int], list[str]]:
        async with httpx.AsyncClient(base_url=served.base, headers=auth, timeout=120) as client:
            streams_on: dict[int, str] = {}
            first_chunk = asyncio.Event()

            async def stream(i: int) -> str:
                request = {**body, "messages": chat(picture(40 + i)), "stream": True, "ignore_eos": True}
                async with client.stream("POST", "/v1/chat/completions", json=request) as response:
                    streams_on[i] = response.headers[REPLICA_HEADER]
                    text = ""
                    async for line in response.aiter_lines():
                        first_chunk.set()
                        text += line + "\n"
                    return text

            async def whole(i: int) -> int:
                request = {**body, "messages": chat(picture(60 + i)), "ignore_eos": True}
                response = await client.post("/v1/chat/completions", json=request)
                return response.status_code

            streams = [asyncio.create_task(stream(i)) for i in range(4)]
            wholes = [asyncio.create_task(whole(i)) for i in range(6)]
            await first_chunk.wait()
            victim = streams_on[min(streams_on)]
            pid = await served.front.calls.pid.remote(replica=victim)
            os.kill(pid, signal.SIGKILL)
            texts = await asyncio.gather(*streams)
            codes = await asyncio.gather(*wholes)
            failed = [streams_on[i] for i, t in enumerate(texts) if '"error"' in t]
            assert all(replica == victim for replica in failed), "a stream on the other replica failed"
            assert all("[DONE]" in t for i, t in enumerate(texts) if streams_on[i] != victim)
            return codes, failed

    codes, failed = asyncio.run(load())
    assert codes == [200] * 6  # a request not yet answered is sent to the other replica
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Ray Serve starts a replacement
        now = set(served.replicas())
        if len(now) == 2 and now != before:
            break
        time.sleep(0.5)
    assert len(now) == 2 and now != before, f"no replacement replica: {now}"
    answer = served.client.chat.completions.create(model="nano", messages=chat(picture(1)), max_tokens=4)
    assert answer.choices[0].message.content


def test_the_ray_section_of_a_config_file(tmp_path) -> None:
    from vlmlab.config import RaySettings, read_config_file
    from vlmlab.protocol.errors import ConfigError
    from vlmlab.server.ray_serve import replica_deployment, replica_options

    path = tmp_path / "ray.yaml"
    path.write_text("model: nano\nray:\n  num_gpus: 1\n  min_replicas: 1\n  max_replicas: 4\n  target_ongoing_requests: 6\n  router: default\n")
    settings = server_settings(read_config_file(str(path)))
    assert settings.ray == RaySettings(num_gpus=1, min_replicas=1, max_replicas=4, target_ongoing_requests=6, router="default")
    options = replica_options(settings)  # what Ray Serve is given
    assert options["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6}
    assert options["request_router_config"]["request_router_kwargs"]["mode"] == "default"
    replica_deployment(settings)  # Ray Serve takes them
    for bad, named in (({"replica": 2}, "replica"), ({"router": "random"}, "router"), ({"min_replicas": 3, "max_replicas": 2}, "min_replicas")):
        with pytest.raises(ConfigError, match=named):
            server_settings({"ray": bad})
