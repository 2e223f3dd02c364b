"""``vlmlab --version`` and ``vlmlab env`` as users run them: the installed console script in a
subprocess, checked against what this interpreter itself sees."""

from __future__ import annotations

import http.server
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vlmlab.hub import check_hub

# The console script pip installed next to this interpreter (.venv/bin/vlmlab).
VLMLAB = Path(sys.executable).with_name("vlmlab")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VLMLAB), *args], capture_output=True, text=True, timeout=120)


def env_report() -> dict[str, dict[str, Any]]:
    out = run("env", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback requests must not be sent to a proxy the developer's shell happens to set."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A loopback port that accepts connections (kernel backlog) but never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there any more: connections are refused at once
    return port


def write_script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_version_flag_prints_the_installed_version() -> None:
    expected = f"vlmlab {importlib.metadata.version('vlmlab')}"
    for flag in ("--version", "-V"):
        out = run(flag)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected


def test_env_json_matches_this_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("VLMLAB_API_KEY", "sk-do-not-print")
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print")
    monkeypatch.setenv("VLMLAB_PORT", "8123")
    report = env_report()

    python = report["python"]
    assert python["version"] == platform.python_version()
    assert Path(python["executable"]).resolve() == Path(sys.executable).resolve()
    assert report["vlmlab"]["version"] == importlib.metadata.version("vlmlab")

    packages = report["packages"]
    assert packages["torch"] == torch.__version__
    assert packages["numpy"] == importlib.metadata.version("numpy")
    absent = {"vllm": "vllm", "llama_cpp": "llama-cpp-python", "mlx": "mlx", "ray": "ray"}
    missing = [dist for module, dist in absent.items() if importlib.util.find_spec(module) is None]
    assert missing, "every optional backend is installed here: nothing to check 'not installed' on"
    assert all(packages[dist] == "not installed" for dist in missing)

    cpu = report["cpu"]
    assert cpu["logical_cores"] == os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        assert cpu["affinity_cores"] == len(os.sched_getaffinity(0))
    # A fresh interpreter's default: this pytest process may have changed its own (the hf engine
    # sets one thread for a tiny model).
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True, text=True, timeout=120,
    )
    assert cpu["torch_threads"] == int(fresh.stdout)
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert report["mps"]["available"] == torch.backends.mps.is_available()

    # conftest's hermetic fixture sets HF offline: the report says so rather than trying.
    assert report["hub"]["status"] == "offline mode (HF_HUB_OFFLINE=1)"
    env = report["environment"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLMLAB_PORT"] == "8123"
    assert env["VLMLAB_API_KEY"] == env["HF_TOKEN"] == "<hidden>"
    assert "do-not-print" not in json.dumps(report) and "do_not_print" not in json.dumps(report)


def test_env_table_shows_every_section() -> None:
    out = run("env")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    for text in ("vlmlab env", "python", "packages", "cuda", "cpu", "chromium", "hub"):
        assert text in out.stdout
    assert platform.python_version() in out.stdout
    assert "offline mode (HF_HUB_OFFLINE=1)" in out.stdout


def test_failing_probes_report_their_error_and_the_command_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real failure mode (nvidia-smi installed, driver not loaded) and a browser found on PATH:
    the nvidia-smi row carries its error; the rest of the report is there."""
    write_script(tmp_path, "nvidia-smi", "echo \"NVIDIA-SMI has failed because it couldn't "
                 "communicate with the NVIDIA driver.\" >&2\nexit 9")  # fmt: skip
    chromium = write_script(tmp_path, "chromium", 'echo "Chromium 131.0.6778.139 built on Debian"')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    report = env_report()
    assert report["cuda"]["nvidia_smi"] == (
        "error: RuntimeError: exit 9: NVIDIA-SMI has failed because it couldn't communicate "
        "with the NVIDIA driver."
    )
    assert report["chromium"]["chromium"] == f"{chromium}: Chromium 131.0.6778.139 built on Debian"
    assert report["packages"]["pillow"] == importlib.metadata.version("pillow")


def test_offline_mode_makes_no_request(
    monkeypatch: pytest.MonkeyPatch, silent_listener: socket.socket
) -> None:
    port = silent_listener.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://user:hunter2@127.0.0.1:{port}")
    hub = env_report()["hub"]
    assert hub == {
        "endpoint": f"http://***@127.0.0.1:{port}",  # the password is not printed either
        "status": "offline mode (HF_HUB_OFFLINE=1)",
    }
    silent_listener.setblocking(False)
    with pytest.raises(BlockingIOError):  # no connection is waiting in the backlog
        silent_listener.accept()


def test_closed_endpoint_is_unreachable_quickly(
    monkeypatch: pytest.MonkeyPatch, no_proxy: None
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")  # huggingface_hub reads it too
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}/")
    hub = env_report()["hub"]
    assert hub["endpoint"] == f"http://127.0.0.1:{port}"
    assert hub["status"].startswith("unreachable: ConnectError"), hub
    assert hub["seconds"] < 1.0


def test_answering_endpoint_is_reachable(monkeypatch: pytest.MonkeyPatch, no_proxy: None) -> None:
    class Head(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.delenv("TRANSFORMERS_OFFLINE")  # huggingface_hub reads it too
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        hub = env_report()["hub"]
    finally:
        server.shutdown()
        server.server_close()
    assert hub["status"] == "reachable" and hub["http_status"] == 200


def test_silent_endpoint_times_out(silent_listener: socket.socket, no_proxy: None) -> None:
    """The hub check is bounded by its timeout (3 s in `vlmlab env`; shorter here)."""
    port = silent_listener.getsockname()[1]
    hub = check_hub({"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, timeout=0.3)
    assert hub["status"] == "unreachable: no answer within 0.3 s (ReadTimeout)"
    assert 0.3 <= hub["seconds"] < 2.0


def test_no_browser_on_path_says_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PATH holds only the interpreter's folder (for the console script's own needs), no browser.
    if any(shutil.which(name, path=str(VLMLAB.parent)) for name in ("chromium", "google-chrome")):
        pytest.skip("a browser lives next to the interpreter")
    monkeypatch.setenv("PATH", str(VLMLAB.parent))
    report = env_report()
    assert report["chromium"] == {"browser": "not found"}
    assert report["cuda"]["nvidia_smi"] == "not found"


@pytest.mark.parametrize(
    ("blocked", "command", "extra"),
    [
        ("uvicorn", ["serve", "--port", "1"], "server"),
        ("torch", ["chat", "--image", "red_square.png", "What colour?"], "hf"),
        ("transformers", ["chat", "--image", "red_square.png", "What colour?"], "hf"),
    ],
)
def test_missing_extra_names_the_fix(blocked: str, command: list[str], extra: str) -> None:
    """A wheel installed without its extras: the command names the extra, no traceback. The
    library is made unimportable in the child (None in sys.modules), as if not installed."""
    samples = Path(__file__).resolve().parent.parent / "src" / "vlmlab" / "nano" / "samples"
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"from vlmlab.cli import main; main({command!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=samples
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{blocked} is not installed" in out.stderr
    assert f"pip install 'vlmlab[{extra}]'" in " ".join(out.stderr.split())
