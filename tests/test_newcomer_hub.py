"""A model or dataset that is not on disk, a Hub that cannot be reached: every command fails in
seconds with one line (what is missing, why, a close name, the fix) and a non-zero exit, and a
copy in the cache still loads. Also the noise around it: library warnings once, no per-step
FutureWarning, no traceback from worker processes on Ctrl-C.

"Unreachable" here is a closed loopback port as HF_ENDPOINT (refused at once, as a machine
without a network refuses a name lookup); the tests' own HF_HUB_OFFLINE is lifted where the
test is about the Hub not answering rather than about offline mode."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serverutil import data_url, free_port, image_message, png_bytes
from vlmlab.hub import did_you_mean, forget_hub_access, hub_access
from vlmlab.nano import checkpoint_path

SAMPLE = str(checkpoint_path().parent / "samples" / "red_square.png")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(endpoint: str | None, offline: bool = False, **extra: str) -> dict[str, str]:
    """The test process's environment (hermetic: conftest), the Hub at ``endpoint``, offline
    mode only when asked, and a wide console so one message is one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env["COLUMNS"] = "1000"
    env.update(extra)
    return env


def vlmlab(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmlab", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_failure(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    assert "Retrying" not in output, f"waited on the Hub's retries: {output}"
    errors = [line for line in lines(done.stderr) if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_unknown_model_without_a_hub_is_one_line_with_a_close_name() -> None:
    done = vlmlab("chat", "--model", "nanoo", "--image", SAMPLE, "What colour is it?", env=env_for(f"http://127.0.0.1:{closed_port()}"))
    error = assert_one_line_failure(done)
    assert lines(done.stderr) == [error], done.stderr  # nothing else: no warnings, no hub log lines
    assert "'nanoo'" in error and "Did you mean 'nano'?" in error, error
    assert "cannot be reached" in error and "Hugging Face cache" in error, error
    # neither offline variable was set: no advice to unset them
    assert "HF_HUB_OFFLINE" not in error and "TRANSFORMERS_OFFLINE" not in error, error


def test_offline_mode_is_named_only_when_it_is_set() -> None:
    done = vlmlab("chat", "--model", "someone/not-cached-vlm", "--image", SAMPLE, "What colour?", env=env_for(None, offline=True))
    error = assert_one_line_failure(done)
    assert "HF_HUB_OFFLINE=1 is set" in error and "'someone/not-cached-vlm'" in error, error
    assert "Did you mean" not in error, error  # nothing known is close to it


def test_eval_checks_the_dataset_before_loading_any_model() -> None:
    # Both are missing: the dataset is what the error names, so no model load was tried first.
    done = vlmlab("eval", "--model", "nanoo", "--dataset", "chartqa_test_human", "--limit", "2", env=env_for(f"http://127.0.0.1:{closed_port()}"))
    error = assert_one_line_failure(done)
    assert "dataset 'lmms-lab/ChartQA'" in error and "--data-dir" in error, error
    assert "nanoo" not in error and "Loading weights" not in done.stderr, done.stderr


def test_compare_checks_every_model_before_loading_the_first() -> None:
    done = vlmlab("compare", "--models", "nano,nanoo", "--dataset", "synth", "--limit", "2", env=env_for(f"http://127.0.0.1:{closed_port()}"))
    error = assert_one_line_failure(done)
    assert "'nanoo'" in error and "Did you mean 'nano'?" in error, error
    assert "Loading weights" not in done.stderr, done.stderr  # nano was not loaded first


def test_serve_with_a_model_that_cannot_load_is_one_line_not_a_lifespan_traceback() -> None:
    port = free_port()
    done = vlmlab("serve", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--port", str(port), env=env_for(f"http://127.0.0.1:{closed_port()}"))
    error = assert_one_line_failure(done)
    assert "lifespan" not in done.stderr and "Application startup failed" not in done.stderr, done.stderr
    assert "'Qwen/Qwen2-VL-2B-Instruct'" in error, error
    assert "Did you mean" not in error, error  # other sizes of the same model are not typos of it
    with socket.socket() as s:  # the port it held while loading is free again
        s.bind(("127.0.0.1", port))


def test_a_cached_hub_model_loads_when_the_hub_cannot_be_reached(tmp_path: Path) -> None:
    """The Hugging Face cache layout (what a download leaves), holding nano's files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-vlm"
    shutil.copytree(checkpoint_path(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = env_for(f"http://127.0.0.1:{closed_port()}", HF_HUB_CACHE=str(tmp_path / "hub"))
    done = vlmlab("chat", "--model", "someone/tiny-vlm", "--image", SAMPLE, "What color is the square?", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "red", done.stdout
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr, done.stderr


class _NotFoundHub(http.server.BaseHTTPRequestHandler):
    """A Hub that answers, and knows no repository (what huggingface.co says for a typo)."""

    requests = 0

    def _answer(self) -> None:
        type(self).requests += 1
        self.send_response(404)
        self.send_header("X-Error-Code", "RepositoryNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_found_hub() -> Iterator[str]:
    _NotFoundHub.requests = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_that_answers_but_lacks_the_model_still_suggests_the_close_name(not_found_hub: str) -> None:
    env = env_for(not_found_hub, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    done = vlmlab("chat", "--model", "nanoo", "--image", SAMPLE, "What colour?", env=env)
    error = assert_one_line_failure(done)
    assert "'nanoo'" in error and "Did you mean 'nano'?" in error, error


def test_the_hub_is_asked_once_per_process(not_found_hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    forget_hub_access()
    try:
        env = {"HF_ENDPOINT": not_found_hub}
        first = hub_access(env)
        second = hub_access(env)
    finally:
        forget_hub_access()
    assert first.mode == second.mode == "online"  # a 404 is an answer: the Hub is there
    assert _NotFoundHub.requests == 1


def test_close_names() -> None:
    known = ["nano", "pixtral", "Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"]
    assert did_you_mean("nanoo", known) == " Did you mean 'nano'?"
    assert did_you_mean("Pixtrall", known) == " Did you mean 'pixtral'?"
    assert did_you_mean("Qwen/Qwen2-VL-7B-Instrct", known) == " Did you mean 'Qwen/Qwen2-VL-7B-Instruct'?"
    assert did_you_mean("Qwen/Qwen2-VL-72B-Instruct", known) == ""  # another size, not a typo
    assert did_you_mean("someone/not-cached-vlm", known) == ""
    assert did_you_mean("qwen/qwen2-vl-2b-instruct", known) == ""  # known, just not cached


def test_library_log_lines_print_once() -> None:
    """huggingface_hub's logger has a handler of its own and also passes records to the root."""
    code = (
        "from vlmlab.cli import configure_logging; configure_logging()\n"
        "from huggingface_hub.utils import logging\n"
        "logging.get_logger('huggingface_hub.test').warning('a hub warning')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stderr.count("a hub warning") == 1, done.stderr


def test_eval_prints_no_deprecation_warnings() -> None:
    """transformers 5.2x warns on every forward call that passes ``past_key_values``."""
    env = env_for(None, offline=True)
    done = vlmlab("eval", "--model", "nano", "--dataset", "synth", "--limit", "12", "--no-progress", "--output-dir", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"vlmlab-eval-{os.getpid()}"), env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Warning" not in output and "deprecated" not in output, output


def test_ctrl_c_in_a_terminal_stops_serve_without_worker_tracebacks() -> None:
    """Ctrl-C reaches the whole process group: the image-preprocessing workers too."""
    port = free_port()
    command = [sys.executable, "-m", "vlmlab", "serve", "--port", str(port), "--preprocess-workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # A large image goes to the worker process (starting the pool).
        body = {"model": "nano", "max_tokens": 2, "messages": image_message("What colour?", data_url(png_bytes(1400, 1400)))}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).status_code == 200
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "leaked" not in output, output
