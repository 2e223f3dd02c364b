"""Reading and writing sizes: bytes (``24GiB``, ``80GB``), images (``1920x1080``) and durations
(``25.3 ms``, ``1.52 s``) for people; machine outputs (JSON) keep raw seconds and bytes."""

from __future__ import annotations

import re

from vlmlab.protocol.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"24GiB"`` -> 25769803776; ``"80GB"`` -> 80e9; bare ``G`` means GiB (like ``nvidia-smi``)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"cannot read memory size {text!r}; write it like 24GiB, 80GB or 16G", param="gpu_mem"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def parse_size(text: str) -> tuple[int, int]:
    """``"1920x1080"`` -> (1920, 1080)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"cannot read image size {text!r}; write it as WIDTHxHEIGHT, e.g. 1920x1080")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise ConfigError(f"image size {text!r} must be at least 1x1")
    return width, height


def format_bytes(n: float | None) -> str:
    """Bytes for people, in binary units: ``887054336`` -> ``"846.0 MiB"``; ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """Seconds for people: ``0.02534`` -> ``"25.3 ms"``, ``0.00129`` -> ``"1.29 ms"``,
    ``1.5234`` -> ``"1.52 s"``, ``125`` -> ``"2 min 05 s"``, ``4000`` -> ``"1 h 07 min"``;
    ``None`` -> ``"-"``.

    Latencies stay in ms below a second (the unit `vllm bench serve` and most dashboards use),
    with two decimals under 10 ms so a 1.3 ms TPOT does not read as 1 ms.
    """
    if seconds is None:
        return "-"
    sign, s = ("-" if seconds < 0 else ""), abs(float(seconds))
    ms = s * 1000.0
    if round(ms, 2) < 10:
        return f"{sign}{ms:.2f} ms"
    if round(ms, 1) < 1000:
        return f"{sign}{ms:.1f} ms"
    if round(s, 2) < 60:
        return f"{sign}{s:.2f} s"
    whole = round(s)
    if whole < 3600:
        return f"{sign}{whole // 60} min {whole % 60:02d} s"
    minutes = round(s / 60)
    return f"{sign}{minutes // 60} h {minutes % 60:02d} min"
