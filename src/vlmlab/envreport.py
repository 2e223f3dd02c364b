"""The environment report behind ``vlmlab env``: what a user pastes into a bug report.

Modelled on vLLM's ``vllm/collect_env.py``. Versions come from package metadata, so no heavy
library is imported just to read its version; torch is imported (lazily, here only) to ask about
devices and threads. Every probe is guarded: a failing probe writes ``"error: <type>: <message>"``
into its own entry and the rest of the report goes on.

The report is two levels deep, ``{section: {item: value}}``, with JSON values (str, int, float,
bool, list of str), so ``vlmlab env --json`` is the report itself and the table is a flat view of
it (:func:`report_rows`).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlmlab.hub import HUB_TIMEOUT_S, check_hub, describe, redact_url

NOT_INSTALLED = "not installed"
NOT_FOUND = "not found"
SUBPROCESS_TIMEOUT_S = 10.0

# Distribution names as pip spells them: metadata is looked up by distribution, not by import
# name (llama-cpp-python is imported as llama_cpp, pillow as PIL).
PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "accelerate",
    "safetensors",
    "huggingface-hub",
    "mistral-common",
    "qwen-vl-utils",
    "vllm",
    "mlx",
    "mlx-vlm",
    "llama-cpp-python",
    "ray",
    "xgrammar",
    "bitsandbytes",
    "torchao",
    "flash-attn",
    "fastapi",
    "uvicorn",
    "httpx",
    "openai",
    "numpy",
    "pillow",
    "datasets",
)

# The browser the HTML report tests drive (tests/browser.py looks for the first two).
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

ENV_NAMES = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "PYTORCH_CUDA_ALLOC_CONF",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
    }
)
ENV_PREFIXES = ("VLMLAB_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "VLLM_")
# A variable whose name holds one of these is reported as set, never with its value.
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
HIDDEN = "<hidden>"

def vlmlab_version() -> str:
    """The installed distribution's version; the source tree's ``__version__`` when vlmlab runs
    from a checkout that was never installed."""
    try:
        return metadata.version("vlmlab")
    except metadata.PackageNotFoundError:
        from vlmlab import __version__

        return __version__


def collect_env(
    environ: Mapping[str, str] | None = None, hub_timeout: float = HUB_TIMEOUT_S
) -> dict[str, dict[str, Any]]:
    """Probe this machine and return the report, ``{section: {item: value}}``.

    ``environ`` defaults to ``os.environ``; ``hub_timeout`` bounds the Hugging Face Hub check,
    which runs in a thread meanwhile (importing torch and the hub's timeout overlap). Never
    raises: a probe that fails reports its error in its section.
    """
    env = os.environ if environ is None else environ
    with ThreadPoolExecutor(max_workers=1) as pool:
        hub = pool.submit(_guard, lambda: check_hub(env, timeout=hub_timeout))
        # Devices first: they import torch, whose own __version__ the packages section then uses.
        devices = {name: _guard(probe) for name, probe in DEVICE_PROBES.items()}
        return {
            "system": _guard(_system_section),
            "python": _guard(_python_section),
            "vlmlab": _guard(_vlmlab_section),
            "packages": _guard(package_versions),
            **devices,
            "chromium": _guard(_chromium_section),
            "hub": hub.result(),
            "environment": _guard(lambda: relevant_env(env)),
        }


def report_rows(report: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, str, str]]:
    """``(section, item, text)`` for every entry of :func:`collect_env`'s report, in order; an
    empty section gives one ``(section, "", "none")`` row so that it still shows."""
    for section, items in report.items():
        if not items:
            yield section, "", "none"
        for item, value in items.items():
            yield section, item, _text(value)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{distribution: version or "not installed"}``, without importing anything.

    A package this process has already imported reports its own ``__version__``: torch's carries
    the build tag (``2.9.0+cu128``) that its wheel metadata may lack. The rest come from metadata.
    """
    return {name: _try(lambda name=name: _package_version(name)) for name in names}


def _package_version(distribution: str) -> str:
    module = sys.modules.get(distribution.replace("-", "_"))
    version = getattr(module, "__version__", None)
    return str(version) if version else _version_or_absent(distribution)


def relevant_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The set variables that change vlmlab's behaviour (``VLMLAB_*``, ``HF_*``, CUDA and thread
    settings), sorted; secrets (names with KEY, TOKEN, SECRET, ...) show as ``<hidden>`` and URLs
    lose any ``user:password@``."""
    report: dict[str, str] = {}
    for name in sorted(environ):
        if name not in ENV_NAMES and not name.startswith(ENV_PREFIXES):
            continue
        secret = any(marker in name.upper() for marker in SECRET_MARKERS)
        report[name] = HIDDEN if secret else redact_url(environ[name])
    return report


# --- sections ------------------------------------------------------------------------------


def _system_section() -> dict[str, Any]:
    libc, libc_version = platform.libc_ver()
    return {
        "os": _try(_os_name),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "libc": f"{libc} {libc_version}" if libc else "unknown",
    }


def _os_name() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    if sys.platform.startswith("linux"):
        try:
            return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
        except OSError:  # no /etc/os-release (some minimal containers)
            return "Linux"
    return f"{platform.system()} {platform.release()}"


def _python_section() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "virtualenv": sys.prefix != sys.base_prefix,
    }


def _vlmlab_section() -> dict[str, Any]:
    import vlmlab

    source = Path(vlmlab.__file__).resolve().parent
    section: dict[str, Any] = {"version": vlmlab_version(), "imported_from": str(source)}
    try:
        dist = metadata.distribution("vlmlab")
    except metadata.PackageNotFoundError:
        section["install"] = "not installed: running from a source tree on sys.path"
        return section
    # PEP 610: pip records where a package came from, and whether it is editable.
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct_url.get("url", "")
    if direct_url.get("dir_info", {}).get("editable"):
        project = _file_url_path(url) if url.startswith("file:") else redact_url(url)
        section["install"] = f"editable, from {project}"
        section["git"] = _try(lambda: _gitdescribe(source))
    elif url:
        section["install"] = f"from {redact_url(url)}"
    else:
        section["install"] = "from a package index"
    return section


def _cuda_section() -> dict[str, Any]:
    section: dict[str, Any] = {}
    if _installed("torch"):
        section.update(_guard(_torch_cuda, key="torch"))
    else:
        section["torch"] = "torch not installed"
    section.update(_guard(_nvidia_smi, key="nvidia_smi"))
    return section


def _torch_cuda() -> dict[str, Any]:
    import torch

    available = torch.cuda.is_available()
    section: dict[str, Any] = {
        "available": available,
        "torch_cuda": torch.version.cuda or "torch built without CUDA",
    }
    hip = getattr(torch.version, "hip", None)
    if hip:
        section["torch_hip"] = hip
    if available:
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            memory = props.total_memory / 2**30
            arch = f"sm_{props.major}{props.minor}"
            devices.append(f"{index}: {props.name}, {memory:.1f} GiB, {arch}")
        section["devices"] = devices
        section["cudnn"] = torch.backends.cudnn.version()
    return section


def _nvidia_smi() -> dict[str, Any]:
    path = shutil.which("nvidia-smi")
    if path is None:
        return {"nvidia_smi": NOT_FOUND}
    header = _run([path])
    section: dict[str, Any] = {"nvidia_smi": path}
    patterns = {"driver": r"Driver Version:\s*(\S+)", "driver_cuda": r"CUDA Version:\s*(\S+)"}
    for item, pattern in patterns.items():
        match = re.search(pattern, header)
        section[item] = match.group(1) if match else "unknown"
    query = [path, "--query-gpu=index,name,memory.total", "--format=csv,noheader"]
    section["gpus"] = _run(query).splitlines()
    return section


def _mps_section() -> dict[str, Any]:
    if not _installed("torch"):
        return {"torch": "torch not installed"}
    import torch

    return {"available": torch.backends.mps.is_available(), "built": torch.backends.mps.is_built()}


def _cpu_section() -> dict[str, Any]:
    section: dict[str, Any] = {
        "model": _try(_cpu_model),
        "logical_cores": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        section["affinity_cores"] = _try(lambda: len(os.sched_getaffinity(0)))
    quota = _try(_cgroup_cpu_limit)
    if quota is not None:
        section["cgroup_cpu_limit"] = quota
    if _installed("torch"):
        section["torch_threads"] = _try(_torch_threads)
    return section


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; some ARM kernels only "Model" or "Hardware".
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"])
    return platform.processor() or platform.machine() or "unknown"


def _cgroup_cpu_limit() -> float | None:
    """Cores a cgroup v2 quota allows (``cpu.max`` "400000 100000" is 4); None if unlimited."""
    path = Path("/sys/fs/cgroup/cpu.max")
    if not path.exists():
        return None
    quota, _, period = path.read_text().strip().partition(" ")
    if quota == "max" or not period:
        return None
    return round(int(quota) / int(period), 2)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


DEVICE_PROBES: dict[str, Callable[[], dict[str, Any]]] = {
    "cuda": _cuda_section,
    "mps": _mps_section,
    "cpu": _cpu_section,
}


def _chromium_section() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            found[name] = f"{path}: {_try(lambda path=path: _run([path, '--version']))}"
    return found or {"browser": NOT_FOUND}


# --- helpers -------------------------------------------------------------------------------


def _guard(probe: Callable[[], dict[str, Any]], key: str = "error") -> dict[str, Any]:
    """``probe()``, or ``{key: "error: ..."}`` when it raises: one probe never stops the report."""
    try:
        return probe()
    except Exception as exc:  # any failure, in any library, belongs in the report
        return {key: f"error: {describe(exc)}"}


def _try(value: Callable[[], Any]) -> Any:
    """``value()``, or ``"error: ..."`` in its place when it raises."""
    try:
        return value()
    except Exception as exc:  # same reason as _guard
        return f"error: {describe(exc)}"


def _installed(distribution: str) -> bool:
    return _version_or_absent(distribution) != NOT_INSTALLED


def _version_or_absent(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _run(command: list[str], cwd: Path | None = None) -> str:
    """stdout of ``command`` (stripped); RuntimeError with its stderr when it fails."""
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=cwd, check=False
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"exit {done.returncode}" + (f": {detail[-1]}" if detail else ""))
    return done.stdout.strip()


def _gitdescribe(source: Path) -> str:
    if shutil.which("git") is None:
        return "git not found"
    return _run(["git", "describe", "--always", "--dirty", "--tags"], cwd=source)


def _file_url_path(url: str) -> str:
    return urllib.request.url2pathname(urllib.parse.urlparse(url).path)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "\n".join(str(item) for item in value) or "none"
    return str(value)
