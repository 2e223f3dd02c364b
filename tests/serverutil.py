"""A real vlmlab server on an ephemeral loopback port, in a background thread, for tests."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from PIL import Image, ImageDraw

from vlmlab.config import ServerSettings
from vlmlab.server import create_app
from vlmlab.server.engines import EngineChain


class RunningServer:
    def __init__(self, app, server: uvicorn.Server, thread: threading.Thread):
        self.app = app
        self.server = server
        self.thread = thread
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"

    @property
    def service(self):
        return self.app.state.service


@contextmanager
def running_server(settings: ServerSettings, chain: EngineChain | None = None) -> Iterator[RunningServer]:
    app = create_app(settings, chain)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield RunningServer(app, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens there now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(w: int = 96, h: int = 64, colour: str = "red", shape: str = "square") -> bytes:
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_message(question: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@contextmanager
def file_server(directory: Path) -> Iterator[str]:
    """A plain HTTP server on loopback serving ``directory`` (image URLs for tests); its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
