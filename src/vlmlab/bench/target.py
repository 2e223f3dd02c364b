"""The server under test, reached over HTTP only; and the bench's own image host.

The bench never imports the server: with ``--model`` and no ``--base-url`` it starts
``vlmlab serve`` as a subprocess on a free loopback port, waits for ``/health`` and stops it
afterwards, so vlmlab is measured exactly like vLLM, SGLang or Ollama would be.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from vlmlab.protocol.errors import ConfigError, EngineUnavailableError

logger = logging.getLogger(__name__)


@dataclass
class Target:
    """Where the requests go.

    Attributes:
        root_url: the server root (``http://host:port``), without ``/v1``.
        headers: sent with every request (auth).
        model: the model id put into request bodies.
        card: the server's ``/v1/models`` entry for that model (``None`` if it has none).
        command: the command line of a server the bench started, else ``None``.
    """

    root_url: str
    headers: dict[str, str] = field(default_factory=dict)
    model: str = ""
    card: dict[str, Any] | None = None
    command: list[str] | None = None


def root_of(base_url: str) -> str:
    """``http://h:8000/v1/`` -> ``http://h:8000`` (bench adds ``/v1/...``, ``/metrics`` itself).

    Raises:
        ConfigError: not an http(s) URL.
    """
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url {base_url!r} must be an http(s) URL, e.g. http://127.0.0.1:8000/v1")
    return url.removesuffix("/v1")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(root_url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``GET /health`` until it answers 200.

    Raises:
        EngineUnavailableError: the deadline passed, or ``alive()`` turned false (the process died).
    """
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise EngineUnavailableError(f"the server at {root_url} exited before it became healthy")
            try:
                if client.get(f"{root_url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise EngineUnavailableError(f"{root_url}/health did not answer 200 within {timeout_s:g} s")


@contextmanager
def local_server(model: str, serve_args: Sequence[str], *, trusted_hosts: Sequence[str] = (), max_queue: int = 64,
                 start_timeout_s: float = 300.0) -> Iterator[tuple[str, list[str]]]:  # fmt: skip
    """``vlmlab serve --model MODEL`` in a subprocess on a free loopback port, until exit.

    Inputs: the model, extra serve flags (given last, so they override the bench's defaults),
    hosts the server may fetch image URLs from despite being private (the bench's image host),
    a queue limit large enough for the run, and the start-up deadline.
    Yields: ``(root_url, command)``.

    Raises:
        EngineUnavailableError: the server did not become healthy (its log tail is in the message).
    """
    port = free_port()
    command = [sys.executable, "-m", "vlmlab", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--max-queue", str(max_queue)]  # fmt: skip
    if trusted_hosts:
        command += ["--trusted-media-hosts", ",".join(trusted_hosts)]
    command += list(serve_args)
    root_url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    logger.info("starting %s", " ".join(command))
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_healthy(root_url, start_timeout_s, alive=lambda: process.poll() is None)
        except EngineUnavailableError as exc:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-2000:]
            raise EngineUnavailableError(f"{exc.message}; command: {' '.join(command)}; log:\n{tail}") from None
        yield root_url, command
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def model_card(client: httpx.Client, root_url: str, headers: dict[str, str], wanted: str | None) -> tuple[str, dict[str, Any] | None]:
    """The model id to send and its ``/v1/models`` card (``None`` when the server lists none).

    Raises:
        EngineUnavailableError: the server cannot be reached at all.
        ConfigError: no model given and the server lists none (or refuses ``/v1/models``).
    """
    try:
        response = client.get(f"{root_url}/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        raise EngineUnavailableError(f"cannot reach {root_url}/v1/models ({type(exc).__name__}: {exc}); is the server up?") from exc
    try:
        listed = response.json().get("data", []) if response.status_code == 200 else []
    except (ValueError, AttributeError):
        listed = []
    cards = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
    if wanted:
        return wanted, next((c for c in cards if c.get("id") == wanted), None)
    if not cards:
        raise ConfigError(
            f"{root_url}/v1/models (HTTP {response.status_code}) lists no model; pass --model with the id to send"
        )
    return str(cards[0].get("id")), cards[0]


def scrape_metrics(client: httpx.Client, root_url: str, headers: dict[str, str]) -> str | None:
    """The text of ``GET /metrics``, or ``None`` when the server has no Prometheus endpoint."""
    try:
        response = client.get(f"{root_url}/metrics", headers=headers)
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or "text/plain" not in response.headers.get("content-type", "text/plain"):
        return None
    return response.text


class ImageHost:
    """A small threaded HTTP server for the ``http`` transport: ``GET /NAME`` -> image bytes.

    ``lookup(name)`` returns ``(bytes, mime)`` or ``None`` (404). The bench starts it on
    ``host`` (an address the target server can reach) and a free port.
    """

    def __init__(self, lookup: Callable[[str], tuple[bytes, str] | None], host: str = "127.0.0.1", port: int = 0):
        handler = _handler_for(lookup)
        try:
            self.server = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot start the image host on {host}:{port}: {exc}; pass --image-host with a local address") from exc
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="vlmlab-bench-images", daemon=True)
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{self.server.server_address[1]}"
        self.requests = 0

    def __enter__(self) -> ImageHost:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler_for(lookup: Callable[[str], tuple[bytes, str] | None]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # the stdlib's hook name
            found = lookup(self.path.lstrip("/").split("?", 1)[0])
            if found is None:
                self.send_error(404)
                return
            data, mime = found
            self.send_response(200)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
