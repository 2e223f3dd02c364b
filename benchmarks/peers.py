"""vlmlab against what a user would run instead, on the same checkpoint and machine, in one run.

Peers, each started here as a subprocess on its own loopback port, all alive for the whole run and
driven one at a time (the order rotated each round):

- ``vlmlab``: ``vlmlab serve --model CKPT --response-cache 0``, default settings otherwise (on CPU,
  ``--data-parallel-size auto`` gives nano a copy per core; its start-up line is printed);
- ``vlmlab dp1``: the same with ``--data-parallel-size 1``;
- ``transformers``: ``transformers serve --continuous-batching CKPT``. Requests must name the
  checkpoint path as ``model`` (it is pinned; ``/v1/models`` says so). It takes image_url data
  URLs. It refuses ``ignore_eos`` (422, unknown field); its own ``generation_config`` field (a
  JSON string of generate() settings) with ``min_new_tokens`` bans the end token until
  ``max_tokens``, which is what ``ignore_eos`` does. It falls back to sequential generation for
  this checkpoint ("Only LLMs support continuous batching"; its log line is printed);
- ``vlmlab llamacpp``: ``vlmlab serve --engine llamacpp --model nano`` (nano's GGUF; nano only);
- ``llama-cpp-python``: ``python -m llama_cpp.server --model GGUF --clip_model_path MMPROJ
  --chat_format mtmd --n_threads CORES`` (its default is half the cores), when its server extras
  import (from the venv, or from ``--llamacpp-server-deps DIR`` put on PYTHONPATH); end tokens
  banned with ``logit_bias`` -100, as it has no ``ignore_eos``, and ``repeat_penalty`` 1 (its
  default is 1.1). It gets each image already at the
  size nano's family rule resizes to (what vlmlab hands its engines): sent as is, mtmd keeps nano's
  images near their own size (151-811 prompt tokens at 200-500 px against vlmlab's 59) and refuses
  those over ~550 px ("Prompt exceeds n_ctx: 1037 > 1024", a 500, or a dropped stream);
- ``vllm``: ``vllm serve`` only where CUDA and vllm are present (a skip line otherwise).

Each round, at each concurrency of ``--concurrency``, ``--requests`` new requests (default: twice
the concurrency, within 16-64) go to every peer:
one of nano's shipped one-image samples (cycled) scaled to a random longest side of 200-800 px with
one pixel changed, as a PNG data URL (no image is ever sent twice to a server), with the sample's
question; streamed, greedy (temperature 0), ``--max-tokens`` (32) forced as above. Per peer and
concurrency, the median over ``--rounds`` of: requests/s and output tok/s (over the round's wall
time), TTFT p50/p99 (first content chunk), ITL p50/p99 (gaps between content chunks, pooled over
the round's requests), peak RSS of the server's process tree (psutil, sampled every 0.1 s during
the round), and each figure relative to vlmlab's. Answers of vlmlab and transformers serve are
compared (identical count, first differences).

Per-stage profile of ``vlmlab`` at 16 concurrent (or the concurrency nearest it): the ``timings``
object of each stream's finish chunk (queue, preprocess, prefill, decode, and the stages: http,
parse, fetch, decode, slot wait, chat template, resize .. processor, vision tower, replica hop, batch
wait, detokenize, engine, SSE; benchmarks/peers_report.py names them), and what the client saw
(TTFT, end to end; the client's end to end minus the server's total is HTTP, SSE and client time).
Stages a server does not report are listed.

``--aiperf PATH`` (an ``aiperf`` executable, e.g. from ``python3 -m venv /tmp/peers-venv &&
/tmp/peers-venv/bin/pip install aiperf``) also runs aiperf against ``vlmlab`` at 16 concurrent on
the same kind of requests (a single_turn JSONL of new images), between two runs of this script's
own client, and prints both clients' req/s and TTFT.

    .venv/bin/python benchmarks/peers.py [--model CKPT] [--rounds 3] [--requests 64] [--concurrency 1,4,16,64]
        [--skip PEER ...] [--aiperf /tmp/peers-venv/bin/aiperf] [--json out.json]

(about 5 minutes on a 2-core CPU with every peer and aiperf; ``transformers`` and ``llama-cpp-python`` serve
one request at a time here and take most of it: ``--skip transformers`` for a quick look)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import io
import itertools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
from peers_report import BASELINE, percentile, print_aiperf, print_report
from PIL import Image
from served import free_port

from vlmlab.bench.stats import metric_deltas, parse_prometheus

SAMPLES = Path(__file__).resolve().parents[1] / "src/vlmlab/nano/samples"
LLAMACPP_SERVER_DEPS = ("sse_starlette", "starlette_context", "pydantic_settings")


def samples() -> list[tuple[Image.Image, str]]:
    """Nano's shipped one-image samples: (image, question)."""
    listed = json.loads((SAMPLES / "samples.json").read_text())
    return [(Image.open(SAMPLES / s["images"][0]).convert("RGB"), s["question"]) for s in listed if len(s["images"]) == 1]


def scaled(image: Image.Image, rng: random.Random, low: int = 200, high: int = 800) -> Image.Image:
    """``image`` scaled to a longest side of ``low``-``high`` px, one pixel changed: new bytes every time."""
    side = rng.randrange(low, high + 1)
    scale = side / max(image.size)
    out = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC)
    out.putpixel((rng.randrange(out.width), rng.randrange(out.height)), tuple(rng.randrange(256) for _ in range(3)))
    return out


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,4,16"`` -> ``(1, 4, 16)``; each a positive integer."""
    levels = tuple(int(part) for part in text.split(",") if part.strip())
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency wants positive integers separated by commas, got {text!r}")
    return levels


def tree_rss(process: psutil.Process) -> int:
    """RSS of ``process`` and all its descendants (replicas, preprocessing workers), in bytes."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRss:
    """Samples the RSS of a process tree every ``interval`` seconds while in the ``with`` block."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.process, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.process))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- driving one server ---------------------------------------------------------------------------


@dataclass
class Level:
    """One round at one concurrency on one peer."""

    seconds: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    e2es: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)  # per request: (last chunk - first) / (tokens - 1)
    tokens: int = 0
    chunks: int = 0
    answers: list[str] = field(default_factory=list)
    timings: list[dict | None] = field(default_factory=list)  # vlmlab's per-response timings, None where absent
    errors: list[str] = field(default_factory=list)
    peak_rss: int = 0

    def figures(self) -> dict[str, float]:
        return {
            "req_s": len(self.ttfts) / self.seconds,
            "output_tok_s": self.tokens / self.seconds,
            "ttft_p50_ms": 1000 * percentile(self.ttfts, 50),
            "ttft_p99_ms": 1000 * percentile(self.ttfts, 99),
            "itl_p50_ms": 1000 * percentile(self.itls, 50),
            "itl_p99_ms": 1000 * percentile(self.itls, 99),
            "tpot_p50_ms": 1000 * percentile(self.tpots, 50),
            "peak_rss_mb": self.peak_rss / 2**20,
            "tokens_per_chunk": self.tokens / self.chunks if self.chunks else float("nan"),
            "errors": len(self.errors),
        }


async def drive(base: str, bodies: list[dict], concurrency: int) -> Level:
    """Stream ``bodies``, ``concurrency`` at a time; per request TTFT, ITLs, tokens, answer, timings.

    Tokens: the stream's ``usage`` when sent, otherwise one per content chunk.
    """
    out = Level(answers=[""] * len(bodies))
    todo = list(reversed(range(len(bodies))))

    async def one(client: httpx.AsyncClient, index: int) -> None:
        start = time.perf_counter()
        stamps: list[float] = []
        text: list[str] = []
        usage = timings = None
        async with client.stream("POST", "/v1/chat/completions", json=bodies[index]) as response:
            if response.status_code != 200:
                out.errors.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.errors.append(str(chunk["error"])[:200])
                    return
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        stamps.append(time.perf_counter())
                        text.append(content)
                    if choice.get("finish_reason") and chunk.get("timings"):
                        timings = chunk["timings"]
                usage = chunk.get("usage") or usage
        end = time.perf_counter()
        out.ttfts.append((stamps[0] if stamps else end) - start)
        out.e2es.append(end - start)
        out.timings.append(timings)
        out.itls.extend(b - a for a, b in itertools.pairwise(stamps))
        tokens = usage["completion_tokens"] if usage else len(stamps)
        if len(stamps) > 1 and tokens > 1:
            out.tpots.append((stamps[-1] - stamps[0]) / (tokens - 1))
        out.tokens += tokens
        out.chunks += len(stamps)
        out.answers[index] = "".join(text)

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            index = todo.pop()
            try:
                await one(client, index)
            except httpx.HTTPError as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        begin = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        out.seconds = time.perf_counter() - begin
    return out


# -- the peers ----------------------------------------------------------------------------------


@dataclass
class Peer:
    """One server: how to start it and what its requests add to the common body."""

    label: str
    command: list[str]
    extra: dict[str, Any]  # added to every request (the forced length)
    env: dict[str, str] = field(default_factory=dict)
    model: str | None = None  # None: /v1/models' first id
    ready_path: str = "/health"
    resize: Any = None  # a function applied to each image before sending, or None
    process: subprocess.Popen | None = None
    base: str = ""
    log: Path | None = None

    def start(self, port: int, startup_s: float = 300) -> None:
        """Start the server on ``port``; return once ``ready_path`` answers 200."""
        self.log = Path(tempfile.mkstemp(prefix=f"peers-{self.label.replace(' ', '-')}-", suffix=".log")[1])
        environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        environment.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **self.env})
        command = [part.replace("{port}", str(port)) for part in self.command]
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if httpx.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.label} did not start: {' '.join(command)}\n{self.log_text()[-3000:]}")
            time.sleep(0.3)
        if self.model is None:
            self.model = httpx.get(self.base + "/v1/models", timeout=30).json()["data"][0]["id"]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def log_lines(self, *needles: str) -> list[str]:
        """Lines of the server's output that contain one of ``needles``."""
        return [line.strip() for line in self.log_text().splitlines() if any(n in line for n in needles)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def body(self, messages: list[dict], max_tokens: int) -> dict:
        return {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra}  # fmt: skip


def end_token_ids(gguf: Path) -> list[int]:
    """Every end-of-generation token of a GGUF's vocabulary (what vlmlab's ignore_eos bans)."""
    import llama_cpp

    llama = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        return [t for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llama.close()


def llamacpp_server_path(deps: str) -> str | None:
    """PYTHONPATH that makes ``llama_cpp.server`` importable ("" when the venv has its extras), or
    None when neither the venv nor ``deps`` has them."""
    if all(importlib.util.find_spec(name) for name in LLAMACPP_SERVER_DEPS):
        return ""
    if deps and all((Path(deps) / name).is_dir() for name in LLAMACPP_SERVER_DEPS):
        return deps
    return None


def plan_peers(args: argparse.Namespace, checkpoint: str) -> tuple[list[Peer], list[str]]:
    """The peers to start and the skip lines of those that cannot run here."""
    python, skipped = sys.executable, []
    vlmlab = [python, "-m", "vlmlab", "serve", "--model", checkpoint, "--port", "{port}", "--response-cache", "0"]
    ignore_eos = {"ignore_eos": True}
    peers = [
        Peer(BASELINE, vlmlab, ignore_eos),
        Peer("vlmlab dp1", [*vlmlab, "--data-parallel-size", "1"], ignore_eos),
    ]
    transformers_cli = shutil.which("transformers", path=str(Path(python).parent)) or shutil.which("transformers")
    forced = {"generation_config": json.dumps({"min_new_tokens": args.max_tokens})}
    if transformers_cli:
        peers.append(Peer("transformers", [transformers_cli, "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", "{port}",
                                           "--log-level", "info", checkpoint], forced))  # fmt: skip
    else:
        skipped.append("transformers: no `transformers` command (pip install 'transformers[serving]')")
    if args.model in (None, "nano"):
        from vlmlab.engines.llamacpp.convert import nano_gguf

        try:
            files = nano_gguf()
        except Exception as exc:  # noqa: BLE001 - report and go on without the llama.cpp rows
            skipped.append(f"llama.cpp rows: nano's GGUF is not available ({type(exc).__name__}: {exc})")
        else:
            peers.append(Peer("vlmlab llamacpp", [*vlmlab[:5], "nano", "--engine", "llamacpp", "--port", "{port}", "--response-cache", "0"], ignore_eos))
            path = llamacpp_server_path(args.llamacpp_server_deps)
            if path is None:
                skipped.append("llama-cpp-python: its server extras are missing (sse-starlette, starlette-context, pydantic-settings); "
                               f"pip install --target {args.llamacpp_server_deps or '/tmp/llamacpp-server-deps'} --no-deps "
                               "sse-starlette starlette-context pydantic-settings python-dotenv, then pass --llamacpp-server-deps DIR")  # fmt: skip
            else:
                # Its server's defaults are not greedy's plain argmax: repeat_penalty 1.1 (set to 1).
                bias = {"logit_bias": {str(t): -100 for t in end_token_ids(files.model)}, "repeat_penalty": 1.0}
                command = [python, "-m", "llama_cpp.server", "--model", str(files.model), "--clip_model_path", str(files.mmproj),
                           "--chat_format", "mtmd", "--n_ctx", "1024", "--n_threads", str(len(os.sched_getaffinity(0))),
                           "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", "{port}", "--verbose", "False"]  # fmt: skip
                env = {"PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)}
                peers.append(Peer("llama-cpp-python", command, bias, env, ready_path="/v1/models", resize=nano_resize))
    else:
        skipped.append("llama.cpp rows: only for nano (its GGUF is built by vlmlab); --model is another checkpoint")
    if importlib.util.find_spec("vllm") and _cuda():
        peers.append(Peer("vllm", ["vllm", "serve", checkpoint, "--host", "127.0.0.1", "--port", "{port}"], ignore_eos))
    else:
        skipped.append("vllm: GPU machines only (needs CUDA and the vllm package)")
    wanted = [peer for peer in peers if peer.label not in args.skip]
    skipped += [f"{peer.label}: --skip" for peer in peers if peer.label in args.skip]
    if not any(peer.label == BASELINE for peer in wanted):
        raise SystemExit(f"the ratios are against {BASELINE!r}: do not --skip it")
    return wanted, skipped


def _cuda() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# -- the rounds -----------------------------------------------------------------------------------


def messages_for(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(image)}}, {"type": "text", "text": question}]}]


class Requests:
    """New requests on demand: shipped samples, cycled, each scaled and touched anew."""

    def __init__(self, seed: int):
        self.pictures, self.rng, self.count = samples(), random.Random(seed), 0

    def take(self, n: int) -> list[tuple[Image.Image, str]]:
        out = []
        for _ in range(n):
            image, question = self.pictures[self.count % len(self.pictures)]
            self.count += 1
            out.append((scaled(image, self.rng), question))
        return out


def level_requests(requests: int | None, concurrency: int) -> int:
    """Requests a round sends at ``concurrency``: ``requests``, or by default twice the
    concurrency within 16-64 (enough to fill the level, few enough for the sequential peers)."""
    return requests if requests else max(16, min(64, 2 * concurrency))


def nano_resize(image: Image.Image) -> Image.Image:
    """``image`` at the size nano's family rule resizes to (what vlmlab hands its engines)."""
    from vlmlab.families import get_family

    return image.resize(get_family("nano").image_layout(*image.size).resized, Image.Resampling.BICUBIC)


def metrics_snapshot(base: str) -> dict[str, float]:
    try:
        return parse_prometheus(httpx.get(base + "/metrics", timeout=30).text)
    except httpx.HTTPError:
        return {}


def run_rounds(peers: list[Peer], args: argparse.Namespace) -> dict:
    requests = Requests(seed=0)
    profile_level = min(args.concurrency, key=lambda c: abs(c - 16))
    rounds: dict[str, dict[int, list[dict]]] = {peer.label: {c: [] for c in args.concurrency} for peer in peers}
    same: dict[str, list[int]] = {peer.label: [0, 0] for peer in peers}
    differing: list[dict] = []
    errors: dict[str, list[str]] = {peer.label: [] for peer in peers}
    profile: dict[str, Any] = {"concurrency": profile_level, "timings": [], "ttfts": [], "e2es": [], "metrics": {}}
    def bodies_for(peer: Peer, sent: list[tuple[Image.Image, str]], shared: list[list[dict]]) -> list[dict]:
        if peer.resize is None:
            return [peer.body(m, args.max_tokens) for m in shared]
        return [peer.body(messages_for(peer.resize(image), question), args.max_tokens) for image, question in sent]

    warm = requests.take(4)
    for peer in peers:
        asyncio.run(drive(peer.base, bodies_for(peer, warm, [messages_for(*r) for r in warm]), 2))
    for k in range(args.rounds):
        for concurrency in args.concurrency:
            sent = requests.take(level_requests(args.requests, concurrency))
            shared = [messages_for(image, question) for image, question in sent]
            answers: dict[str, list[str]] = {}
            for peer in peers[k % len(peers):] + peers[: k % len(peers)]:
                bodies = bodies_for(peer, sent, shared)
                before = metrics_snapshot(peer.base) if peer.label == BASELINE and concurrency == profile_level else None
                with PeakRss(peer.process.pid) as rss:
                    level = asyncio.run(drive(peer.base, bodies, concurrency))
                level.peak_rss = rss.peak
                rounds[peer.label][concurrency].append(level.figures())
                answers[peer.label] = level.answers
                errors[peer.label] += level.errors[:3]
                if before is not None:
                    profile["timings"] += level.timings
                    profile["ttfts"] += level.ttfts
                    profile["e2es"] += level.e2es
                    for name, value in metric_deltas(before, metrics_snapshot(peer.base)).items():
                        profile["metrics"][name] = profile["metrics"].get(name, 0.0) + value
            for label, theirs in answers.items():
                pairs = list(zip(answers[BASELINE], theirs))
                same[label][0] += sum(a == b for a, b in pairs)
                same[label][1] += len(pairs)
                if label == "transformers":
                    for index, (a, b) in enumerate(pairs):
                        if a != b and len(differing) < 5:
                            question = sent[index][1]
                            differing.append({"round": k, "concurrency": concurrency, "question": question, BASELINE: a, label: b})
    medians = {
        label: {c: {key: statistics.median(r[key] for r in levels[c]) for key in levels[c][0]} for c in args.concurrency}
        for label, levels in rounds.items()
    }
    return {"rounds": rounds, "medians": medians, "answers_same_as_vlmlab": same, "differing": differing,
            "errors": {k: v for k, v in errors.items() if v}, "profile": profile}  # fmt: skip


# -- the independent client ---------------------------------------------------------------------


def aiperf_check(peer: Peer, args: argparse.Namespace, checkpoint: str) -> dict:
    """aiperf at 16 concurrent against ``peer`` on new images, between two runs of :func:`drive`."""
    requests = Requests(seed=7)
    n = 64
    ours = []
    out: dict[str, Any] = {"requests": n}
    with tempfile.TemporaryDirectory(prefix="peers-aiperf-") as folder:
        dataset = Path(folder) / "requests.jsonl"
        with dataset.open("w") as sink:
            for image, question in requests.take(n):
                sink.write(json.dumps({"text": question, "image": png_url(image)}) + "\n")
        command = [args.aiperf, "profile", "--model", peer.model or "nano", "--url", peer.base, "--endpoint-type", "chat", "--streaming",
                   "--custom-dataset-type", "single_turn", "--input-file", str(dataset), "--concurrency", "16", "--request-count", str(n),
                   "--tokenizer", checkpoint, "--use-server-token-count", "--use-legacy-max-tokens", "--artifact-dir", str(Path(folder) / "out"),
                   "--extra-inputs", json.dumps({"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}), "--ui-type", "none",
                   "--workers-max", "1", "--record-processors", "1"]  # fmt: skip
        out["command"] = " ".join(command)
        cpu = []

        def ours_once() -> None:
            bodies = [peer.body(messages_for(image, question), args.max_tokens) for image, question in requests.take(n)]
            spent = time.process_time()
            ours.append(asyncio.run(drive(peer.base, bodies, 16)).figures())
            cpu.append(time.process_time() - spent)

        ours_once()
        before, children = metrics_snapshot(peer.base), resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
        out["wall_s"] = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # aiperf's CPU seconds (its worker processes included), against the script's client's: on
        # a 2-core machine the client's own CPU is taken from the server.
        out["aiperf_cpu_s"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        seen = metric_deltas(before, metrics_snapshot(peer.base))
        out["server_saw"] = {"requests": seen.get("vllm:request_success_total", 0.0), "image_tokens": seen.get("vlmlab:image_tokens_total", 0.0),
                             "generation_tokens": seen.get("vllm:generation_tokens_total", 0.0)}  # fmt: skip
        ours_once()
        out["script_cpu_s"] = statistics.fmean(cpu)
        out["ours"] = {key: statistics.fmean(r[key] for r in ours) for key in ("req_s", "ttft_p50_ms", "ttft_p99_ms", "output_tok_s")}
        exports = sorted(Path(folder).rglob("profile_export_aiperf.json"))
        if done.returncode != 0 or not exports:
            out["error"] = f"rc {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"
            return out
        result = json.loads(exports[0].read_text())
        out["aiperf_raw"] = {key: result.get(key) for key in ("request_throughput", "time_to_first_token", "output_token_throughput", "request_count", "error_request_count")}
        out["aiperf"] = {
            "req_s": _stat(result, "request_throughput", "avg"),
            "ttft_p50_ms": _stat(result, "time_to_first_token", "p50"),
            "ttft_p99_ms": _stat(result, "time_to_first_token", "p99"),
            "output_tok_s": _stat(result, "output_token_throughput", "avg"),
        }
    return out


def _stat(result: dict, metric: str, key: str) -> float:
    value = result.get(metric)
    if isinstance(value, dict):
        value = value.get(key, value.get("avg"))
    return float(value) if value is not None else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF checkpoint path (default: the packaged nano)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, help="new requests per round and concurrency (default: 2x the concurrency, 16-64)")
    parser.add_argument("--concurrency", type=parse_levels, default=(1, 4, 16, 64))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip", action="append", default=[], help="a peer's label (repeatable): vlmlab dp1, transformers, ...")
    parser.add_argument("--llamacpp-server-deps", default="/tmp/llamacpp-server-deps", help="a folder with llama-cpp-python's server extras")
    parser.add_argument("--aiperf", help="an aiperf executable: also check the figures with it")
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()
    if args.model in (None, "nano"):
        from vlmlab.nano import checkpoint_path

        checkpoint = str(checkpoint_path())
    else:
        checkpoint = str(Path(args.model).resolve())
    began = time.perf_counter()
    peers, skipped = plan_peers(args, checkpoint)
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "checkpoint": checkpoint, "notes": [f"skipped {line}" for line in skipped]}
    try:
        for peer in peers:
            peer.start(free_port())
        for peer in peers:
            for line in peer.log_lines("copies", "copy,", "Falling back", "continuous batching"):
                report["notes"].append(f"{peer.label} says: {line}")
        report["notes"].append("peer request names: " + ", ".join(f"{p.label} {p.model!r}" for p in peers))
        report.update(run_rounds(peers, args))
        print_report(report, args)
        if args.aiperf:
            report["aiperf"] = aiperf_check(next(p for p in peers if p.label == BASELINE), args, checkpoint)
            print_aiperf(report["aiperf"])
        else:
            print("\nindependent client: skipped (pass --aiperf PATH; python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install aiperf)")
    finally:
        for peer in peers:
            peer.stop()
    print(f"\n({time.perf_counter() - began:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
