"""The Hugging Face Hub as vlmlab meets it: whether it answers, asked once and quickly, and what
to do when it does not.

huggingface_hub retries an unreachable Hub five times with back-off (about 30 s) before a load
fails, and then advises unsetting offline variables nobody set. vlmlab asks the Hub once per
process (:func:`hub_access`, a few seconds at most); when it does not answer, loads read the
local cache only (``local_files_only`` for models, :func:`offline_libraries` for datasets), so a
copy on disk loads at once and a missing one fails at once, with one line that says which
(:func:`missing_message`).
"""

from __future__ import annotations

import difflib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

HUB_DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_TIMEOUT_S = 3.0

# huggingface_hub's own reading of boolean variables (huggingface_hub/constants.py, _is_true),
# and the variables it reads for offline mode (HF_HUB_OFFLINE, then the older TRANSFORMERS_OFFLINE).
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def endpoint(environ: Mapping[str, str]) -> str:
    """The Hub's base URL: ``HF_ENDPOINT``, or huggingface.co."""
    return (environ.get("HF_ENDPOINT") or HUB_DEFAULT_ENDPOINT).rstrip("/")


def offline_setting(environ: Mapping[str, str]) -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (the variable as set) when the user turned offline mode on, else None."""
    for name in OFFLINE_VARIABLES:
        value = environ.get(name, "")
        if value.strip().upper() in TRUE_VALUES:
            return f"{name}={value}"
    return None


def check_hub(environ: Mapping[str, str], timeout: float = HUB_TIMEOUT_S) -> dict[str, Any]:
    """Whether the Hub endpoint answers an HTTP HEAD within ``timeout`` seconds, name lookup
    included (a resolver that hangs counts as no answer).

    ``status`` is ``"reachable"`` (any answer below 500), ``"unreachable: <reason>"``, or, when
    offline mode is on, ``"offline mode (HF_HUB_OFFLINE=...)"`` without any request.
    ``endpoint`` is the URL asked, without any ``user:password@``.
    """
    url = endpoint(environ)
    result: dict[str, Any] = {"endpoint": redact_url(url)}
    offline = offline_setting(environ)
    if offline:
        result["status"] = f"offline mode ({offline})"
        return result
    start = time.perf_counter()
    # httpx's timeout does not cover the name lookup (getaddrinfo blocks): the whole request runs
    # on a thread that is given up on, not waited for, after the timeout.
    pool = ThreadPoolExecutor(1, thread_name_prefix="vlmlab-hub-check")
    future = pool.submit(_head, url, timeout)
    pool.shutdown(wait=False)
    try:
        result.update(future.result(timeout=timeout + 0.5))
    except FutureTimeout:
        result["status"] = f"unreachable: no answer within {timeout:g} s (name lookup)"
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _head(url: str, timeout: float) -> dict[str, Any]:
    import httpx

    try:
        response = httpx.head(url, timeout=timeout, follow_redirects=True)
    except httpx.TimeoutException as exc:
        return {"status": f"unreachable: no answer within {timeout:g} s ({type(exc).__name__})"}
    except Exception as exc:  # connection refused, DNS, TLS, proxy, malformed HF_ENDPOINT
        return {"status": f"unreachable: {describe(exc)}"}
    code = response.status_code
    return {"status": "reachable" if code < 500 else f"unreachable: HTTP {code}", "http_status": code}


@dataclass(frozen=True)
class HubAccess:
    """How loads may use the Hub in this process.

    ``mode``: ``"online"`` (it answered), ``"unreachable"`` (it did not: cache only) or
    ``"offline"`` (the user set offline mode: cache only). ``why``: the reason, for messages.
    """

    mode: Literal["online", "unreachable", "offline"]
    endpoint: str
    why: str = ""

    @property
    def cache_only(self) -> bool:
        return self.mode != "online"


_ACCESS: dict[str, HubAccess] = {}
_ACCESS_LOCK = threading.Lock()


def hub_access(environ: Mapping[str, str] | None = None, timeout: float = HUB_TIMEOUT_S) -> HubAccess:
    """The Hub's :class:`HubAccess`, asked once per process and endpoint (the answer is kept:
    a server that started without a network does not ask again before each load)."""
    env = os.environ if environ is None else environ
    offline = offline_setting(env)
    url = endpoint(env)
    if offline:
        return HubAccess("offline", redact_url(url), offline)
    with _ACCESS_LOCK:
        known = _ACCESS.get(url)
        if known is None:
            status = check_hub(env, timeout)["status"]
            known = HubAccess("online", redact_url(url)) if status == "reachable" else HubAccess("unreachable", redact_url(url), status.removeprefix("unreachable: "))
            _ACCESS[url] = known
        return known


def forget_hub_access() -> None:
    """Ask the Hub again on the next :func:`hub_access` (the network may have come back)."""
    with _ACCESS_LOCK:
        _ACCESS.clear()


def cache_dir() -> str:
    """Where huggingface_hub keeps downloaded repositories (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def model_in_cache(repo_id: str, revision: str | None = None, filename: str = "config.json") -> bool:
    """Whether the Hugging Face cache holds ``repo_id``'s ``filename`` (at ``revision``): its
    config.json, or params.json for a native Mistral checkpoint."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # a malformed id ("a/b/c") is not in any cache
        return False
    return isinstance(found, str)


def missing_message(kind: str, name: str, access: HubAccess, known: Iterable[str] = (), fix: str = "") -> str:
    """One line for ``name`` (a ``kind``: "model", "dataset") that is neither on disk nor
    downloadable now: why, a close known name if any, and what to do."""
    if access.mode == "offline":
        why = f"{access.why} is set, so nothing is downloaded; unset it to download {name}"
    else:
        why = f"the Hub ({access.endpoint}) cannot be reached ({access.why})"
    return (
        f"{kind} {name!r} is not on this machine (not in the Hugging Face cache {cache_dir()}) "
        f"and {why}.{did_you_mean(name, known)}"
        + (f" {fix}" if fix else "")
    )


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" Did you mean 'nano'?"`` for the known names closest to ``name`` (case-insensitive), or ``""``."""
    choices = {k.lower(): k for k in known}
    if name.lower() in choices:  # a known name, missing for another reason: no other name helps
        return ""
    close = difflib.get_close_matches(name.lower(), list(choices), n=3, cutoff=0.75)
    # Another size of the same model (Qwen2-VL-2B for Qwen2-VL-7B) is not a typo of it: no
    # size of the name itself, and of a near name only the closest size.
    sizes = {_undigit(name.lower())}
    kept = []
    for c in close:
        if _undigit(c) not in sizes:
            sizes.add(_undigit(c))
            kept.append(choices[c])
    close = kept
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def _undigit(name: str) -> str:
    return re.sub(r"[0-9.]+", "", name)


@contextmanager
def offline_libraries() -> Iterator[None]:
    """Within the block, huggingface_hub and datasets read their caches only, as if
    ``HF_HUB_OFFLINE=1`` had been set before they were imported (both read that variable once,
    into these module constants)."""
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def redact_url(value: str) -> str:
    """``value`` with the ``user:password@`` part of a URL replaced by ``***@``, else unchanged."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", value)


def describe(exc: BaseException) -> str:
    """``"Type: first line of the message"``."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
