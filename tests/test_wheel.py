"""The package as a user installs it: a wheel built from the sdist, in a new venv, from the lock.

The venv gets requirements/lock.txt (``--require-hashes``, as `make install` does) and then the
wheel with ``--no-deps``, so the wheel's own files, not this source tree, must carry the nano
checkpoint, its samples and the config presets. Every command runs from a folder outside the
repository. Also: the lock agrees with pyproject.toml, so a changed requirement without
`make lock` fails here rather than on a fresh machine.
"""

from __future__ import annotations

import base64
import json
import os
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from serverutil import free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is in the lock for it
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
WHEEL_VENV_BYTES = 9 * 2**30
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
MAC = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}


def _lock_script() -> Any:
    """scripts/lock.py, which writes the lock: the test reads pins the way it does."""
    spec = importlib.util.spec_from_file_location("vlmlab_lock_script", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


LOCK_SCRIPT = _lock_script()
PIN = LOCK_SCRIPT.PIN


def locked_pins(environment: dict[str, str]) -> dict[str, Version]:
    """The lock's pins for one environment."""
    return {canonicalize_name(name): Version(v) for name, v in LOCK_SCRIPT.pins(LOCK, environment).items()}


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lines = project["dependencies"] + extras["hf"] + extras["server"] + extras["test"]
    lines += [
        line
        for name in ("torch.txt", "build.txt")
        for line in (ROOT / "requirements" / name).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12"])
@pytest.mark.parametrize("platform", [LINUX, MAC], ids=["linux-x86_64", "macos-arm64"])
def test_lock_satisfies_pyproject(python: str, platform: dict[str, str]) -> None:
    environment = dict(platform, python_version=python, python_full_version=f"{python}.0")
    pins = locked_pins(environment)
    missing = []
    for requirement in project_requirements():
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
            missing.append(f"{requirement} (lock: {pinned})")
    assert not missing, f"requirements/lock.txt is stale, run `make lock`: {missing}"


def test_lock_pins_every_file_by_hash() -> None:
    text = LOCK.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    unhashed = [e.split()[0] for e in entries if PIN.match(e) and "--hash=sha256:" not in e]
    assert not unhashed
    assert locked_pins(dict(LINUX, python_version="3.11", python_full_version="3.11.7"))[
        "torch"
    ] == Version((ROOT / "requirements" / "torch.txt").read_text().split("==")[1].split()[0])


@pytest.fixture(scope="module")
def installed_wheel() -> Iterator[tuple[Path, Path]]:
    """(venv, wheel): the wheel built from this tree's sdist, installed in a venv from the lock.

    The venv holds the whole lock (torch among it, ~6.5 GB), so it lives in a temporary folder
    that is removed at once, not in pytest's kept tmp_path folders.
    """
    free = shutil.disk_usage(tempfile.gettempdir()).free
    # The lock's venv (~7 GB) plus pip's unpacking: fail with the reason, not pip's ENOSPC deep
    # inside an install log.
    assert free > WHEEL_VENV_BYTES, (
        f"{tempfile.gettempdir()} has {free / 2**30:.1f} GiB free; the wheel's venv needs about "
        f"{WHEEL_VENV_BYTES / 2**30:.0f} GiB: free some space there or point TMPDIR at a larger disk"
    )
    with tempfile.TemporaryDirectory(prefix="vlmlab-wheel-") as folder:
        work = Path(folder)
        # sdist first, then the wheel from the unpacked sdist: a stale build/ folder of the
        # source tree cannot leak into it, and the sdist is checked on the way.
        run([sys.executable, "-m", "build", "--no-isolation", "--outdir", work / "dist", ROOT])
        (wheel,) = (work / "dist").glob("vlmlab-*.whl")
        venv = work / "venv"
        run([sys.executable, "-m", "venv", venv])
        pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
        run([*pip, "--require-hashes", "-r", LOCK])
        run([*pip, "--no-deps", wheel])
        yield venv, wheel


def run(command: list, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def site_package(venv: Path) -> Path:
    (path,) = (venv / "lib").glob("python3*/site-packages/vlmlab")
    return path


def test_wheel_carries_the_data(installed_wheel: tuple[Path, Path]) -> None:
    _, wheel = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "vlmlab/nano/checkpoint/model.safetensors",
        "vlmlab/nano/checkpoint/tokenizer.json",
        "vlmlab/nano/checkpoint/chat_template.jinja",
        "vlmlab/nano/samples/red_square.png",
        "vlmlab/nano/samples/samples.json",
        "vlmlab/configs/nano.yaml",
        "vlmlab/py.typed",
        "vlmlab/server/playground/index.html",
        "vlmlab/server/playground/app.js",
        "vlmlab/server/playground/markdown.js",
        "vlmlab/server/playground/app.css",
    ):
        assert name in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_wheel_chat_env_and_eval(installed_wheel: tuple[Path, Path], tmp_path: Path) -> None:
    venv, _ = installed_wheel
    vlmlab = venv / "bin" / "vlmlab"
    image = site_package(venv) / "nano" / "samples" / "red_square.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    version = run([vlmlab, "--version"], cwd=tmp_path, env=env).stdout.split()
    assert version == ["vlmlab", "0.1.0"]
    report = json.loads(run([vlmlab, "env", "--json"], cwd=tmp_path, env=env).stdout)
    assert Path(report["vlmlab"]["imported_from"]) == site_package(venv)

    chat = run(
        [vlmlab, "chat", "--image", image, "--max-tokens", "8", "What colour is the shape?"],
        cwd=tmp_path,
        env=env,
    )
    assert "red" in chat.stdout.lower()

    out = tmp_path / "eval"
    evaluate = [vlmlab, "eval", "--model", "nano", "--dataset", "synth", "--limit", "8"]
    run([*evaluate, "--output-dir", out], cwd=tmp_path, env=env)
    summaries = list(out.rglob("summary.json"))
    assert summaries, list(out.rglob("*"))


def test_wheel_serves(installed_wheel: tuple[Path, Path], tmp_path: Path) -> None:
    venv, _ = installed_wheel
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [venv / "bin" / "vlmlab", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [str(c) for c in command],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        models = httpx.get(f"{base}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["nano"]
        page = httpx.get(f"{base}/", timeout=10)  # the playground, from the installed package
        assert page.status_code == 200 and "playground/app.js" in page.text
        assert httpx.get(f"{base}/playground/app.js", timeout=10).status_code == 200
        image = (site_package(venv) / "nano" / "samples" / "red_square.png").read_bytes()
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        reply = httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": "nano",
                "max_tokens": 8,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "What colour is the shape?"},
                        ],
                    }
                ],
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert "red" in reply.json()["choices"][0]["message"]["content"].lower()
    finally:
        server.terminate()
        server.wait(timeout=30)
