"""Open an HTML file in headless Chromium (Debian's `chromium` package) and collect what the
page logs to the console; also check that every inline image decodes."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--dump-dom",
]  # fmt: skip


def open_in_chromium(path: Path | str) -> tuple[str, list[str]]:
    """(the rendered DOM, console messages) of a file or an http(s) URL. Raises if Chromium is
    missing: install it with `apt-get install chromium` (the Makefile's test target does)."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed: apt-get install chromium")
    target = path if isinstance(path, str) else path.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", target], capture_output=True, text=True, timeout=120)
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return out.stdout, console


def inline_images_decode(html_text: str) -> int:
    """Decode every data:image/png in the page; returns how many there are."""
    urls = re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    for data in urls:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    return len(urls)
