"""Re-resolve requirements/lock.txt and the optional extras' constraint files (`make lock`).

The lock is what `make run` / `make test` install: every package of the extras hf, server and
test plus the torch pin of requirements/torch.txt, resolved once for every platform and Python
the project supports (``--universal`` from Python 3.10) with the hashes of every file, so pip
installs it with ``--require-hashes`` and a fresh machine gets what CI tested.

Each optional extra (vllm, mlx, quant, ...) gets ``requirements/constraints-<extra>.txt``: the
same resolution with that extra added, seeded with the lock's pins so every package keeps the
lock's version unless the extra itself forbids it (vLLM pins its own torch, torchvision and a
transformers range). Those differences are listed at the top of each file.

By default pins already in the lock are kept where they still satisfy pyproject.toml (uv prefers
the versions of its existing output); ``--upgrade`` (``make lock UPGRADE=1``) takes the newest.
uv comes from the lock's own test extra, so the resolver is pinned too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
LOCK = REQUIREMENTS / "lock.txt"
LOCKED_EXTRAS = ("hf", "server", "test")
# extra -> lowest Python its packages support (vLLM >= 0.33 needs 3.11; the rest follow the
# project's own requires-python).
OPTIONAL_EXTRAS = {"vllm": "3.11", "mlx": "3.10", "quant": "3.10", "mistral": "3.10"}
# The platform each extra is compared with the lock on (where its engine runs).
LINUX_X86 = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "implementation_name": "cpython",
    "os_name": "posix",
}
MAC_ARM = dict(LINUX_X86, sys_platform="darwin", platform_system="Darwin", platform_machine="arm64")
EXTRA_PLATFORMS = {"vllm": LINUX_X86, "mlx": MAC_ARM, "quant": LINUX_X86, "mistral": LINUX_X86}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(;[^\\]*)?")


def uv_binary() -> str:
    """The uv next to this interpreter (the venv's, from the lock), else the one on PATH."""
    here = Path(sys.executable).parent / "uv"
    found = str(here) if here.exists() else shutil.which("uv")
    if not found:
        sys.exit("uv not found: run `make install` first (uv is in the test extra), or pip install uv")
    return found


def compile_requirements(args: list[str]) -> None:
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
    command = [uv_binary(), "pip", "compile", "--quiet", "pyproject.toml", *args]
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def pins(path: Path, environment: dict[str, str]) -> dict[str, str]:
    """name -> the version a requirements file pins for one environment (its markers applied)."""
    from packaging.markers import Marker

    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match and (not match.group(3) or Marker(match.group(3)[1:]).evaluate(environment)):
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def pin_lines(path: Path) -> list[str]:
    """The ``name==version ; marker`` lines of a requirements file, hashes and comments dropped."""
    lines = []
    for line in path.read_text().splitlines():
        if PIN.match(line.strip()):
            lines.append(line.strip().removesuffix("\\").strip())
    return lines


def differences(extra_file: Path, extra: str) -> list[str]:
    """Packages whose version differs from the lock's on the extra's platform, per Python."""
    out = []
    for python in ("3.10", "3.11", "3.12"):
        if python < OPTIONAL_EXTRAS[extra]:
            continue
        environment = dict(EXTRA_PLATFORMS[extra], python_version=python)
        environment["python_full_version"] = f"{python}.0"
        locked, chosen = pins(LOCK, environment), pins(extra_file, environment)
        for name, version in sorted(chosen.items()):
            if name in locked and locked[name] != version:
                out.append(f"Python {python}: {name} {version} (lock: {locked[name]})")
    return out


def lock_main(upgrade: bool) -> None:
    compile_requirements(
        [
            *(f"--extra={extra}" for extra in LOCKED_EXTRAS),
            "requirements/torch.txt",
            "requirements/build.txt",
            "--universal",
            "--python-version=3.10",
            "--generate-hashes",
            "--custom-compile-command=make lock",
            f"--output-file={LOCK.relative_to(ROOT)}",
            *(["--upgrade"] if upgrade else []),
        ]
    )


def lock_extra(extra: str, python: str) -> None:
    target = REQUIREMENTS / f"constraints-{extra}.txt"
    # The lock's pins as uv's preferences: it keeps an existing output's versions when it can.
    target.write_text("\n".join(pin_lines(LOCK)) + "\n")
    try:
        compile_requirements(
            [
                "--extra=hf",
                "--extra=server",
                f"--extra={extra}",
                "--universal",
                f"--python-version={python}",
                "--no-header",
                "--no-annotate",
                f"--output-file={target.relative_to(ROOT)}",
            ]
        )
    except subprocess.CalledProcessError:
        target.unlink()
        raise
    changed = differences(target, extra)
    header = [
        f"# Constraints for the optional extra `{extra}`, resolved with the lock's pins as",
        f"# preferences (Python >= {python}). Regenerate with `make lock`; install with:",
        f'#   pip install -c requirements/constraints-{extra}.txt -e ".[hf,server,{extra}]"',
    ]
    if changed:
        header.append(f"# Versions that differ from requirements/lock.txt (required by {extra}):")
        header += [f"#   {line}" for line in changed]
    else:
        header.append("# Every package shared with requirements/lock.txt has the lock's version.")
    target.write_text("\n".join(header) + "\n" + target.read_text())
    print(f"{target.relative_to(ROOT)}: {len(pin_lines(target))} pins, {len(changed)} differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="take the newest releases")
    parser.add_argument("--extras", default=",".join(OPTIONAL_EXTRAS), help="extras to constrain")
    args = parser.parse_args()
    lock_main(args.upgrade)
    print(f"{LOCK.relative_to(ROOT)}: {len(pin_lines(LOCK))} pins")
    for extra in filter(None, args.extras.split(",")):
        if extra not in OPTIONAL_EXTRAS:
            sys.exit(f"unknown extra {extra!r}. Available: {', '.join(OPTIONAL_EXTRAS)}")
        lock_extra(extra, OPTIONAL_EXTRAS[extra])


if __name__ == "__main__":
    main()
