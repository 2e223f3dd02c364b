"""Slow peers must not hold everyone up: image URLs that drip bytes, and clients that send their
request slowly (slowloris), against a real server with the nano engine on loopback.

The drip servers listen on 127.0.0.1 (and 127.0.0.2 for a second host), reached through the
media policy's ``trusted_media_hosts`` allowance, as in tests/test_server.py; the default guard
still refuses loopback addresses.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.server import create_app
from vlmlab.server.http_limits import uvicorn_options

NANO = EngineSpec(model="nano", device="cpu")
IMAGE = png_bytes(64, 48, "blue")


class DripServer:
    """An image host: ``/drip.png`` sends its headers, then one byte every ``interval_s`` until
    :meth:`stop`; ``/ok.png`` answers at once."""

    def __init__(self, host: str, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.dripping = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path.startswith("/ok.png"):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(IMAGE)))
                    self.end_headers()
                    self.wfile.write(IMAGE)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                with outer._lock:
                    outer.dripping += 1
                try:
                    while not outer.stopped.wait(outer.interval_s):
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                except OSError:
                    pass  # the client gave up
                finally:
                    with outer._lock:
                        outer.dripping -= 1
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        self.stop()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hosts() -> Iterator[tuple[DripServer, DripServer | None]]:
    first = DripServer("127.0.0.1")
    try:
        second: DripServer | None = DripServer("127.0.0.2")
    except OSError:  # no 127.0.0.2 on this machine (macOS without an lo0 alias)
        second = None
    yield first, second
    first.close()
    if second is not None:
        second.close()


def post_async(url: str, image_url: str, results: list[httpx.Response]) -> threading.Thread:
    body = {"model": "nano", "max_tokens": 2, "messages": image_message("What?", image_url)}

    def send() -> None:
        results.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the drips to start"
        time.sleep(0.02)


def timed_inline_request(url: str) -> tuple[int, float]:
    body = {"model": "nano", "max_tokens": 2, "messages": image_message("What?", data_url(IMAGE))}
    start = time.perf_counter()
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    return reply.status_code, time.perf_counter() - start


SETTINGS = ServerSettings(
    engines=(NANO,),
    trusted_media_hosts=("127.0.0.1", "127.0.0.2"),
    fetch_workers=4,
    fetch_per_host=2,
    default_max_tokens=2,
)


def test_dripping_urls_filling_the_fetch_threads_do_not_delay_an_inline_image(hosts) -> None:
    first, second = hosts
    if second is None:
        pytest.skip("needs 127.0.0.2 for a second host")
    with running_server(SETTINGS) as server:
        warm_status, _ = timed_inline_request(server.url)  # load the model's lazy parts first
        assert warm_status == 200
        results: list[httpx.Response] = []
        # As many drips as fetch threads (2 per host, the per-host limit): every thread waits.
        urls = [f"{host.url}/drip.png?{i}" for host in (first, second) for i in range(2)]
        threads = [post_async(server.url, url, results) for url in urls]
        wait_for(lambda: first.dripping == 2 and second.dripping == 2)
        status, seconds = timed_inline_request(server.url)
        assert status == 200
        assert seconds < 1.0, f"an inline image took {seconds:.2f} s while URLs dripped"
        first.stop()
        second.stop()
        for thread in threads:
            thread.join(timeout=30)
        # A body that ends short is the URL's fault: a 400 naming it, quickly once it ends.
        assert [r.status_code for r in results] == [400] * 4
        assert all("drip.png" in r.json()["error"]["message"] for r in results)
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_slow_host_holds_only_its_own_share_of_the_fetch_threads(hosts) -> None:
    first, second = hosts
    if second is None:
        pytest.skip("needs 127.0.0.2 for a second host")
    with running_server(SETTINGS) as server:
        results: list[httpx.Response] = []
        threads = [post_async(server.url, f"{first.url}/drip.png?{i}", results) for i in range(4)]
        fetches = lambda: server.service.image_memory_stats()["fetches_per_host"]  # noqa: E731
        wait_for(lambda: fetches().get("127.0.0.1") == 4)
        wait_for(lambda: first.dripping == 2)
        time.sleep(0.2)
        assert first.dripping == 2  # the per-host limit: the other two wait without a thread
        messages = image_message("What?", f"{second.url}/ok.png")
        body = {"model": "nano", "max_tokens": 2, "messages": messages}
        other = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10)
        assert other.status_code == 200  # another host's image is fetched at once
        first.stop()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(r.status_code for r in results) == [400] * 4
        assert fetches() == {}


# -- slow and oversized requests ---------------------------------------------------------------


@contextmanager
def limited_server(settings: ServerSettings) -> Iterator[str]:
    """A server run as ``vlmlab serve`` runs it: with the HTTP limits of ``settings``."""
    limits = uvicorn_options(settings)
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", **limits)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


LIMITS = ServerSettings(
    engines=(NANO,),
    http_header_timeout_s=1.0,
    http_body_timeout_s=1.0,
    http_max_header_bytes=8 * 2**10,
)


def drip_until_closed(
    address: str, head: bytes, drip: bytes, limit_s: float = 10.0
) -> tuple[float, bytes]:
    """Send ``head``, then ``drip`` every 0.2 s until the server closes; (seconds, reply)."""
    host, port = address.split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head)
        sock.settimeout(0.2)
        reply = b""
        while time.monotonic() - start < limit_s:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(drip)
                except OSError:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
        return time.monotonic() - start, reply


def test_slowloris_and_slow_bodies_are_cut_off_and_big_headers_get_431() -> None:
    with limited_server(LIMITS) as address:
        # Headers that never end: a header line every 0.2 s, forever.
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        seconds, reply = drip_until_closed(address, head, b"X-a: b\r\n")
        assert 0.9 <= seconds < 3.0, seconds
        assert reply.startswith(b"HTTP/1.1 408 ")
        # A body that never ends: one byte every 0.2 s of a declared 1000.
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
        seconds, reply = drip_until_closed(address, head, b" ")
        assert 0.9 <= seconds < 3.0, seconds
        # A connection that sends nothing is closed too (silently, as at keep-alive's end).
        seconds, reply = drip_until_closed(address, b"", b"")
        assert seconds < 3.0 and reply == b""
        # A 64 KiB header against an 8 KiB limit.
        host, port = address.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            try:
                big = b"X-Big: " + b"a" * 2**16 + b"\r\n"
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
            except OSError:
                pass  # closed while we were still sending: also a refusal
            try:
                reply = sock.recv(65536)
            except OSError:  # reset: closed with our bytes unread
                reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:80]
        # Normal requests, with headers well inside the limit, still work; keep-alive too.
        with httpx.Client(base_url=f"http://{address}", timeout=30) as client:
            assert client.get("/health", headers={"X-Fine": "a" * 4000}).status_code == 200
            messages = image_message("What?", data_url(IMAGE))
            body = {"model": "nano", "max_tokens": 2, "messages": messages}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert client.get("/health").status_code == 200
