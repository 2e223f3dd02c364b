"""`vlmlab serve` as users run it: a busy port fails at once, before the model loads, with one
clear line; a free port still serves."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx

from serverutil import free_port


def serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "vlmlab", "serve", "--port", str(port), "--device", "cpu"]


def test_busy_port_fails_fast_without_loading_the_model() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run(serve_command(port), check=False, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    # Python start-up and the CLI import take a second or two; loading nano takes several more.
    assert elapsed < 6, f"took {elapsed:.1f}s: {output}"
    assert "Loading weights" not in output and "serving nano" not in output, output
    assert str(port) in output and "--port" in output, output
    assert "Traceback" not in output, output
    assert "/v1" not in done.stdout, f"announced a URL it never served: {output}"


def test_free_port_serves_and_announces_once_listening() -> None:
    port = free_port()
    process = subprocess.Popen(serve_command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, f"exit code {process.poll()}"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in output, output
    assert "Traceback" not in output, output
