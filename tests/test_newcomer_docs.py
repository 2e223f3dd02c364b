"""`/docs` reads offline: rendered in headless Chromium (with its network turned off by the
flags in tests/browser.py), the page lists every route and the request's fields, and loads
nothing from elsewhere."""

from __future__ import annotations

import re

import httpx

from browser import open_in_chromium
from serverutil import running_server
from vlmlab.config import EngineSpec, ServerSettings


def test_docs_page_renders_offline_with_every_route() -> None:
    with running_server(ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),))) as server:
        raw = httpx.get(f"{server.url}/docs")
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/html")
        assert not re.search(r'(src|href)="https?://', raw.text)  # no CDN, no external asset
        assert "<script" not in raw.text
        dom, console = open_in_chromium(f"{server.url}/docs")
        schema = httpx.get(f"{server.url}/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method in methods:
            assert f"{method.upper()} {path}" in dom
    for field in ("messages", "max_tokens", "seed", "mm_processor_kwargs", "ChatMessage"):
        assert f">{field}<" in dom, field
    assert "9,223,372,036,854,775,807" in dom  # the seed's range, as a number
    assert not [line for line in console if "Failed to load" in line or "ERR_" in line]
