"""The playground page (``GET /``) in a real browser against a real server: Playwright drives
Debian's Chromium (``/usr/bin/chromium``; Playwright's own browser download is never used).

Every test fails on a console error or an uncaught page error; the tests that provoke an HTTP
error (401, 400) allow only Chromium's "Failed to load resource" line for that status. A
screenshot of each main state goes to ``<pytest tmp>/playground-artifacts/``; the first test
also writes ``docs/playground.png`` when it is missing or ``PLAYGROUND_SCREENSHOT=1``. The
accessibility check needs axe-core from npm (``npm ci``: package.json) and is skipped without it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

pytest.importorskip("playwright", reason="playwright is not installed: pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed: apt-get install chromium", allow_module_level=True)

from playwright.sync_api import Browser, Page, sync_playwright
from serverutil import file_server, png_bytes, running_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vlmlab.config import EngineSpec, ServedModel, ServerSettings

ROOT = Path(__file__).resolve().parents[1]
RED_SQUARE = ROOT / "src" / "vlmlab" / "nano" / "samples" / "red_square.png"
QUESTION = "What colour is the shape?"
NANO = EngineSpec(model="nano", device="cpu")
HTTP_ERROR = re.compile(r"^Failed to load resource: the server responded with a status of (\d+)")


# -- browser and servers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def nano_server():
    """nano twice: as "nano" and as "nano-b" (the model picker and the comparison have two)."""
    settings = ServerSettings(
        engines=(NANO,), models=(ServedModel("nano-b", (NANO,)),), response_cache_entries=0,
        trusted_media_hosts=("127.0.0.1",),  # the image host below
    )  # fmt: skip
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server on loopback with one image, ``blue.png``."""
    root = tmp_path_factory.mktemp("playground-images")
    (root / "blue.png").write_bytes(png_bytes(96, 64, "blue", "circle"))
    with file_server(root) as url:
        yield url


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("playground-artifacts")


class Console:
    """The page's console errors and uncaught errors; ``allowed`` HTTP statuses are expected."""

    def __init__(self, tab: Page):
        self.errors: list[str] = []
        self.allowed: set[int] = set()
        tab.on("console", self._console)
        tab.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        status = HTTP_ERROR.match(message.text)
        if status and int(status.group(1)) in self.allowed:
            return
        self.errors.append(message.text)


@pytest.fixture
def tab(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context(viewport={"width": 1280, "height": 760}, color_scheme="light", accept_downloads=True)
    opened = context.new_page()
    opened.console = Console(opened)  # type: ignore[attr-defined]
    opened.dialogs = []  # type: ignore[attr-defined]
    opened.on("dialog", lambda dialog: (opened.dialogs.append(dialog.message), dialog.dismiss()))  # type: ignore[attr-defined]
    yield opened
    errors = opened.console.errors  # type: ignore[attr-defined]
    context.close()
    assert not errors, f"console errors: {errors}"


def open_playground(tab: Page, url: str) -> None:
    response = tab.goto(url + "/")
    assert response is not None and response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    tab.wait_for_selector("body[data-ready]")


def preview_count(tab: Page) -> int:
    tab.wait_for_selector("#token-preview[data-count]")
    return int(tab.get_attribute("#token-preview", "data-count"))


def send(tab: Page, text: str) -> None:
    tab.fill("#input", text)
    tab.press("#input", "Enter")


def wait_answer(tab: Page, index: int = 0) -> Any:
    """The figures of answer ``index`` (0: the last) once its stream has ended."""
    figures = tab.locator(".answer .figures[data-completion-tokens]")
    figures.nth(index).wait_for(timeout=30_000)
    return figures.nth(index)


def tokenize(url: str, messages: list[dict[str, Any]], key: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/tokenize", json={"model": "nano", "messages": messages}, headers=headers).json()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def drop_image(tab: Page, data: bytes, name: str) -> None:
    """A drop event on the composer carrying ``data`` as an image file (a DataTransfer built in
    the page, as a real drag from the desktop delivers it)."""
    tab.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            const target = document.getElementById("composer");
            target.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
            target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [base64.b64encode(data).decode(), name],
    )


def paste_image(tab: Page, data: bytes, name: str) -> None:
    tab.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            document.getElementById("input").dispatchEvent(
                new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true }));
        }""",
        [base64.b64encode(data).decode(), name],
    )


# -- tests -----------------------------------------------------------------------------------


def test_page_and_assets_are_served_with_a_strict_policy(nano_server) -> None:
    for path, kind in (("/", "text/html"), ("/playground/app.js", "text/javascript"),
                       ("/playground/markdown.js", "text/javascript"), ("/playground/app.css", "text/css")):
        response = httpx.get(nano_server.url + path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert httpx.get(nano_server.url + "/playground/secret.py").status_code == 404
    assert httpx.get(nano_server.url + "/playground/..%2Fapp.py").status_code == 404
    assert httpx.get(nano_server.url + "/docs").status_code == 200
    page_text = httpx.get(nano_server.url + "/").text
    assert not re.search(r'(src|href)="(https?:)?//', page_text)  # nothing from elsewhere: works offline


def test_an_image_question_is_answered_with_its_figures(tab: Page, nano_server, artifacts: Path) -> None:
    open_playground(tab, nano_server.url)
    tab.fill("#temperature", "0")
    tab.set_input_files("#file", str(RED_SQUARE))
    tab.fill("#input", QUESTION)
    cost = tab.locator("#pending .cost[data-tokens]")
    cost.wait_for()
    assert int(cost.get_attribute("data-tokens")) > 0
    expected = tokenize(nano_server.url, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(RED_SQUARE.read_bytes())}},
        {"type": "text", "text": QUESTION}]}])  # fmt: skip
    assert preview_count(tab) == expected["prompt_tokens"]
    assert int(cost.get_attribute("data-tokens")) == expected["per_image_tokens"][0]
    tab.screenshot(path=str(artifacts / "1-before-send.png"))

    tab.press("#input", "Enter")
    figures = wait_answer(tab)
    assert "red" in tab.locator(".answer .markdown").last.inner_text().lower()
    assert int(figures.get_attribute("data-image-tokens")) == expected["image_tokens"] > 0
    assert "TTFT" in figures.inner_text() and "image" in figures.inner_text()
    tab.screenshot(path=str(artifacts / "2-answered.png"))
    docs_shot = ROOT / "docs" / "playground.png"
    if not docs_shot.exists() or os.environ.get("PLAYGROUND_SCREENSHOT") == "1":
        docs_shot.parent.mkdir(exist_ok=True)
        tab.screenshot(path=str(docs_shot))


def test_two_images_in_one_message_from_picker_drop_and_paste(tab: Page, nano_server, artifacts: Path) -> None:
    open_playground(tab, nano_server.url)
    blue = png_bytes(96, 64, "blue", "circle")
    green = png_bytes(64, 64, "green", "square")
    tab.set_input_files("#file", str(RED_SQUARE))
    drop_image(tab, blue, "blue.png")
    paste_image(tab, green, "green.png")
    tab.fill("#input", "Which shapes?")
    tab.locator("#pending .thumb").nth(2).wait_for()
    tab.get_by_role("button", name="Remove green.png").click()  # removed before sending
    tab.wait_for_function("() => document.querySelectorAll('#pending .thumb').length === 2")
    tab.wait_for_function("() => document.querySelectorAll('#pending .cost[data-tokens]').length === 2")
    expected = tokenize(nano_server.url, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(RED_SQUARE.read_bytes())}},
        {"type": "image_url", "image_url": {"url": data_url(blue)}},
        {"type": "text", "text": "Which shapes?"}]}])  # fmt: skip
    tab.wait_for_function(f"() => document.getElementById('token-preview').dataset.count === '{expected['prompt_tokens']}'")
    costs = [int(c.get_attribute("data-tokens")) for c in tab.locator("#pending .cost").all()]
    assert costs == expected["per_image_tokens"] and all(c > 0 for c in costs)
    tab.screenshot(path=str(artifacts / "3-two-images.png"))
    tab.press("#input", "Enter")
    figures = wait_answer(tab)
    assert int(figures.get_attribute("data-image-tokens")) == expected["image_tokens"] == sum(costs)
    assert tab.locator(".message.user .thumb-img").count() == 2


def test_compare_streams_each_model_in_its_column_and_regenerate(tab: Page, nano_server, artifacts: Path) -> None:
    open_playground(tab, nano_server.url)
    assert [o.get_attribute("value") for o in tab.locator("#model option").all()] == ["nano", "nano-b"]
    tab.fill("#temperature", "0")
    tab.check(".compare-model[value='nano']")
    tab.check(".compare-model[value='nano-b']")
    tab.set_input_files("#file", str(RED_SQUARE))
    tab.locator("#pending .cost[data-tokens]").wait_for()
    send(tab, QUESTION)
    columns = tab.locator(".answers.compare .answer")
    wait_answer(tab, 0)
    wait_answer(tab, 1)
    assert columns.count() == 2
    assert [c.locator(".model-name").inner_text() for c in columns.all()] == ["nano", "nano-b"]
    for column in columns.all():
        assert "red" in column.locator(".markdown").inner_text().lower()
        assert int(column.locator(".figures").get_attribute("data-image-tokens")) > 0
    tab.screenshot(path=str(artifacts / "8-compare.png"))

    tab.uncheck(".compare-model[value='nano-b']")  # one model again: regenerate answers alone
    tab.click(".regenerate")
    tab.wait_for_function("() => document.querySelectorAll('.answer').length === 1")
    wait_answer(tab)
    assert tab.locator(".message").count() == 2 and tab.locator(".answers.compare").count() == 0
    assert "red" in tab.locator(".answer .markdown").inner_text().lower()


def test_an_image_by_url(tab: Page, nano_server, image_host: str) -> None:
    open_playground(tab, nano_server.url)
    url = f"{image_host}/blue.png"
    tab.fill("#image-url", url)
    tab.click("#add-url")
    tab.fill("#input", "What shape is it?")
    cost = tab.locator("#pending .cost[data-tokens]")
    cost.wait_for()
    assert tab.locator("#pending .thumb-url").inner_text() == url.removeprefix("http://")  # no <img>: CSP
    expected = tokenize(nano_server.url, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What shape is it?"}]}])  # fmt: skip
    assert int(cost.get_attribute("data-tokens")) == expected["per_image_tokens"][0] > 0
    tab.press("#input", "Enter")
    assert int(wait_answer(tab).get_attribute("data-image-tokens")) == expected["image_tokens"]


def running_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(r'^vllm:num_requests_running\{model_name="nano"\} (\S+)$', text, re.MULTILINE)
    assert found, "no vllm:num_requests_running for nano in /metrics"
    return float(found.group(1))


def test_stop_cancels_the_generation_on_the_server(tab: Page, nano_server, artifacts: Path) -> None:
    open_playground(tab, nano_server.url)
    tab.fill("#max-tokens", "900")
    tab.check("#ignore-eos")
    send(tab, "Tell me a long story.")
    tab.wait_for_function("() => document.querySelector('.answer .markdown')?.textContent.length > 0")
    assert running_requests(nano_server.url) == 1
    tab.keyboard.press("Escape")
    deadline = time.monotonic() + 1.0
    while running_requests(nano_server.url) != 0:
        assert time.monotonic() < deadline, "the generation still runs 1 s after Stop"
        time.sleep(0.05)
    tab.wait_for_selector(".answer .figures:has-text('stopped')")
    assert tab.is_enabled("#send") and not tab.is_enabled("#stop")
    tab.screenshot(path=str(artifacts / "4-stopped.png"))


class EvilUpstream:
    """An OpenAI-compatible server whose model answers with markup that must not run."""

    ANSWER = (
        "Look: <img src=x onerror=alert(1)> and <script>alert(2)</script>\n\n"
        "A [link](javascript:alert(3)), an ![image](javascript:alert(4)) and a [safe one](https://example.com/x).\n\n"
        "| a | b |\n|---|---|\n| <b onmouseover=alert(5)>x</b> | **bold** |\n\n"
        "```html\n<script>alert(6)</script>\n```\n\n- one\n- *two*\n"
    )

    def __init__(self) -> None:
        app = Starlette(routes=[Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the fake upstream did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "evil", "object": "model", "owned_by": "fake", "max_model_len": 4096}]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        usage = {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}
        if not body.get("stream"):
            message = {"role": "assistant", "content": self.ANSWER}
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "evil",
                                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage})  # fmt: skip

        async def events() -> Any:
            def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "evil",
                                              "choices": [choice], **extra}) + "\n\n"  # fmt: skip

            yield chunk({"role": "assistant", "content": ""})
            for start in range(0, len(self.ANSWER), 7):
                yield chunk({"content": self.ANSWER[start:start + 7]})
            yield chunk({}, "stop")
            yield "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "evil", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_a_hostile_answer_runs_nothing(tab: Page, artifacts: Path) -> None:
    upstream = EvilUpstream()
    try:
        settings = ServerSettings(engines=(EngineSpec(model="evil", engine="remote", extra={"base_url": upstream.url}),))
        with running_server(settings) as server:
            open_playground(tab, server.url)
            send(tab, "Say something nasty.")
            wait_answer(tab)
            tab.wait_for_timeout(300)  # an onerror handler would have fired by now
    finally:
        upstream.close()
    answer = tab.locator(".answer .markdown").last
    text = answer.inner_text()
    assert "<img src=x onerror=alert(1)>" in text and "<script>alert(2)</script>" in text
    assert answer.locator("img, script, iframe, object, b").count() == 0
    assert tab.locator("script").count() == 1  # the page's own module
    hrefs = [a.get_attribute("href") for a in answer.locator("a").all()]
    assert hrefs == ["https://example.com/x"]
    assert answer.locator("a").get_attribute("rel") == "noopener noreferrer"
    assert answer.locator("table td").count() == 2 and answer.locator("strong").inner_text() == "bold"
    assert answer.locator("pre code").inner_text() == "<script>alert(6)</script>"
    assert answer.locator("ul li").count() == 2 and answer.locator("li em").inner_text() == "two"
    assert tab.dialogs == []  # type: ignore[attr-defined]
    tab.screenshot(path=str(artifacts / "5-hostile-answer.png"))


def test_api_key_prompt_bad_image_and_busy_server_errors(tab: Page, artifacts: Path) -> None:
    tab.console.allowed = {400, 401, 429}  # type: ignore[attr-defined]
    settings = ServerSettings(engines=(NANO,), api_key="k", response_cache_entries=0, max_concurrency=1, max_queue=0)
    with running_server(settings) as server:
        open_playground(tab, server.url)
        tab.wait_for_selector("#key-form:not([hidden])")  # /v1/models answered 401
        assert tab.locator("#model option").count() == 0
        tab.screenshot(path=str(artifacts / "6-api-key.png"))
        tab.fill("#key-input", "k")
        tab.press("#key-input", "Enter")
        tab.wait_for_selector("#model option[value='nano']", state="attached")
        assert tab.is_hidden("#key-form")
        assert tab.evaluate("() => sessionStorage.getItem('vlmlab.apiKey')") == "k"
        assert '"k"' not in tab.evaluate("() => JSON.stringify(localStorage)")

        broken = {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"}
        tab.set_input_files("#file", files=[broken])
        tab.wait_for_selector("#token-preview:has-text('not a supported image')")  # before sending
        send(tab, QUESTION)
        error = tab.locator(".answer .error")
        error.wait_for(timeout=30_000)
        assert "not a supported image" in error.inner_text()  # the server's own message, inline
        tab.screenshot(path=str(artifacts / "7-bad-image.png"))

        # A long non-streamed request takes the only seat (as in test_server_behaviour's 429 test).
        body = {"model": "nano", "max_tokens": 900, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Take the only seat."}]}  # fmt: skip
        seat = threading.Thread(target=httpx.post, args=(f"{server.url}/v1/chat/completions",),
                                kwargs={"json": body, "headers": {"authorization": "Bearer k"}, "timeout": 60})  # fmt: skip
        seat.start()
        deadline = time.monotonic() + 10
        while server.service.active < 1:
            assert time.monotonic() < deadline, "the long request did not start"
            time.sleep(0.01)
        send(tab, "Anyone there?")
        busy_error = tab.locator(".answer .error").last
        tab.wait_for_selector(".answer .error:has-text('Retry in')", timeout=30_000)
        seat.join()
        assert "The server is busy" in busy_error.inner_text() and "Retry in 1 s" in busy_error.inner_text()


def test_reload_keeps_the_chat_and_export_import_round_trips(tab: Page, nano_server, tmp_path: Path) -> None:
    open_playground(tab, nano_server.url)
    tab.fill("#system", "You answer briefly.")
    tab.locator("#system").dispatch_event("change")
    tab.fill("#temperature", "0")
    tab.set_input_files("#file", str(RED_SQUARE))
    tab.fill("#input", QUESTION)
    tab.locator("#pending .cost[data-tokens]").wait_for()
    tab.press("#input", "Enter")
    wait_answer(tab)
    tab.fill("#input", "And")
    tab.press("#input", "Shift+Enter")  # a new line, not a send
    tab.type("#input", "the shape?")
    assert tab.input_value("#input") == "And\nthe shape?" and tab.locator(".message.user").count() == 1
    tab.press("#input", "Enter")
    tab.locator(".answer .figures[data-completion-tokens]").nth(1).wait_for(timeout=30_000)
    before = tab.locator("#messages").inner_text()

    tab.reload()
    tab.wait_for_selector("body[data-ready]")
    assert tab.locator("#messages").inner_text() == before
    assert tab.input_value("#system") == "You answer briefly."

    with tab.expect_download() as download:
        tab.click("#export")
    exported = tmp_path / "chat.json"
    download.value.save_as(exported)
    messages = json.loads(exported.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"][0]["image_url"]["url"] == data_url(RED_SQUARE.read_bytes())

    tab.click("#new-chat")
    assert tab.locator("#messages li").count() == 0
    tab.set_input_files("#import", str(exported))
    tab.wait_for_function("() => document.querySelectorAll('#messages .message').length === 4")
    with tab.expect_download() as again:
        tab.click("#export")
    round_trip = tmp_path / "again.json"
    again.value.save_as(round_trip)
    assert json.loads(round_trip.read_text()) == messages


def views_of(url: str, image: bytes, **extra: Any) -> dict[str, Any]:
    body = {"model": "nano", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]}], **extra}
    return httpx.post(f"{url}/views", json=body, timeout=60).json()["images"][0]


def shown_views(tab: Page) -> dict[str, str]:
    """What the page's "what the model sees" panel shows, once its /views answer is drawn."""
    panel = tab.locator("#views[data-tokens]")
    panel.wait_for(timeout=30_000)
    facts = dict(zip(tab.locator("#views-facts dt").all_inner_texts(), tab.locator("#views-facts dd").all_inner_texts()))
    return {**{k: panel.get_attribute(f"data-{k}") for k in ("resized", "grid", "tokens", "views", "unit")}, **facts}


def expected_views(view: dict[str, Any]) -> dict[str, str]:
    (width, height), (rows, cols) = view["resized"], view["grid"]
    return {
        "resized": f"{width}x{height}", "grid": f"{rows}x{cols}", "tokens": str(view["tokens"]),
        "views": str(view["views"]), "unit": view["unit"],
        "Resized to": f"{width} × {height}", "Grid": f"{rows} x {cols} {view['unit']}", "Tokens": str(view["tokens"]),
        "Image": f"{view['width']} × {view['height']}", "Views": str(view["views"]),
    }  # fmt: skip


def test_what_the_model_sees_of_a_composed_and_a_sent_image(tab: Page, nano_server, artifacts: Path) -> None:
    open_playground(tab, nano_server.url)
    tab.set_input_files("#file", str(RED_SQUARE))
    tab.get_by_role("button", name="What the model sees of red_square.png").click()
    red = views_of(nano_server.url, RED_SQUARE.read_bytes())
    assert shown_views(tab) == expected_views(red)
    width, height = tab.evaluate("() => [document.getElementById('views-canvas').width, document.getElementById('views-canvas').height]")
    assert abs(width / height - red["resized"][0] / red["resized"][1]) < 0.02 and max(width, height) >= 384
    # The grid is drawn over the picture: on the middle column line the red square's pixel is
    # light (the line), half a cell beside it red (the picture).
    line, beside = tab.evaluate("""([rows, cols]) => {
        const canvas = document.getElementById('views-canvas');
        const y = Math.floor(((Math.floor(rows / 2) + 0.5) * canvas.height) / rows);  // a cell's middle row
        const at = (x) => [...canvas.getContext('2d').getImageData(x, y, 1, 1).data];
        const x = Math.round((Math.floor(cols / 2) * canvas.width) / cols);
        return [at(x), at(x + Math.floor(canvas.width / cols / 2))];
    }""", red["grid"])
    assert line[1] > 150 and beside[0] > 150 and beside[1] < 100, (line, beside)
    tab.screenshot(path=str(artifacts / "9-views-composed.png"))

    wide = png_bytes(640, 480, "green", "circle")
    tab.get_by_role("button", name="Remove red_square.png").click()
    tab.set_input_files("#file", files=[{"name": "wide.png", "mimeType": "image/png", "buffer": wide}])
    tab.locator("#pending .cost[data-tokens]").wait_for()
    send(tab, "What shape?")
    wait_answer(tab)
    tab.click("#views-close")
    assert tab.is_hidden("#views")
    tab.locator(".message.user .thumb-button").click()  # the sent image
    expected = expected_views(views_of(nano_server.url, wide))
    assert shown_views(tab) == expected and expected["Image"] == "640 × 480"
    assert expected["resized"] != expected_views(red)["resized"]
    tab.screenshot(path=str(artifacts / "10-views-sent.png"))


def test_processor_options_go_in_mm_processor_kwargs(tab: Page, nano_server) -> None:
    bodies: dict[str, list[dict[str, Any]]] = {"/tokenize": [], "/views": [], "/v1/chat/completions": []}

    def record(request: Any) -> None:
        path = request.url.removeprefix(nano_server.url)
        if request.method == "POST" and path in bodies:
            bodies[path].append(request.post_data_json)

    tab.on("request", record)
    open_playground(tab, nano_server.url)
    tab.wait_for_selector("#model option[value='nano']", state="attached")
    assert tab.locator("#processor-options [data-option]").count() == 0  # nano's family has none
    tab.set_input_files("#file", str(RED_SQUARE))
    send(tab, QUESTION)
    wait_answer(tab)
    assert all("mm_processor_kwargs" not in body for path in bodies for body in bodies[path])

    tab.select_option("#preprocess-mode", "fast")
    tab.set_input_files("#file", str(RED_SQUARE))
    tab.locator("#pending .cost[data-tokens]").wait_for()
    tab.get_by_role("button", name="What the model sees of red_square.png").click()
    tab.locator("#views[data-tokens]").wait_for()
    send(tab, QUESTION)
    wait_answer(tab, 1)
    for path in bodies:
        assert bodies[path][-1]["mm_processor_kwargs"] == {"preprocess_mode": "fast"}, path


def test_family_options_send_only_what_differs_from_the_default(tab: Page, nano_server) -> None:
    """nano's family has no options, so its card is given two here (as Qwen's would carry); the
    server is asked without them (nano would refuse them), and the page's requests are checked."""
    options = [{"name": "max_pixels", "default": 1003520, "kind": "int", "help": "most pixels", "minimum": 1},
               {"name": "variant", "default": "hf", "kind": "str", "help": "", "choices": ["hf", "qwen_vl_utils"]}]  # fmt: skip
    sent: list[dict[str, Any]] = []

    def models(route: Any) -> None:
        cards = route.fetch().json()
        for card in cards["data"]:
            card["processor_options"] = options
        route.fulfill(json=cards)

    def tokenize_route(route: Any) -> None:
        body = route.request.post_data_json
        sent.append(body)
        route.continue_(post_data=json.dumps({k: v for k, v in body.items() if k != "mm_processor_kwargs"}))

    tab.route(f"{nano_server.url}/v1/models", models)
    tab.route(f"{nano_server.url}/tokenize", tokenize_route)
    open_playground(tab, nano_server.url)
    tab.wait_for_selector("#processor-options [data-option='max_pixels']")
    assert tab.input_value("[data-option='max_pixels']") == "1003520" and tab.input_value("[data-option='variant']") == "hf"
    tab.fill("#input", "hello")
    tab.wait_for_function("() => document.getElementById('token-preview').dataset.count")
    assert "mm_processor_kwargs" not in sent[-1]
    tab.fill("[data-option='max_pixels']", "50176")
    tab.locator("[data-option='max_pixels']").dispatch_event("change")
    deadline = time.monotonic() + 5
    while not (sent and sent[-1].get("mm_processor_kwargs")):
        assert time.monotonic() < deadline, f"no mm_processor_kwargs sent: {sent[-1]}"
        tab.wait_for_timeout(50)
    assert sent[-1]["mm_processor_kwargs"] == {"max_pixels": 50176}  # the variant is at its default


def test_edit_and_resend_replaces_the_rest_of_the_conversation(tab: Page, nano_server, artifacts: Path) -> None:
    chats: list[dict[str, Any]] = []
    tab.on("request", lambda r: chats.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    open_playground(tab, nano_server.url)
    tab.fill("#temperature", "0")
    tab.set_input_files("#file", str(RED_SQUARE))
    tab.locator("#pending .cost[data-tokens]").wait_for()
    send(tab, "What shape is it?")
    wait_answer(tab)
    send(tab, "And the colour?")
    tab.locator(".answer .figures[data-completion-tokens]").nth(1).wait_for(timeout=30_000)
    assert tab.locator(".message").count() == 4

    tab.locator(".message.user .edit").first.click()
    box = tab.get_by_role("textbox", name="Edited message")
    assert box.input_value() == "What shape is it?"
    box.fill(QUESTION)
    tab.screenshot(path=str(artifacts / "11-editing.png"))
    tab.get_by_role("button", name="Resend", exact=True).click()
    tab.wait_for_function("() => document.querySelectorAll('.message').length === 2")
    wait_answer(tab)
    assert tab.locator(".message.user .text").inner_text() == QUESTION
    assert tab.locator(".message.user .thumb-img").count() == 1  # the image stays
    assert "red" in tab.locator(".answer .markdown").inner_text().lower()
    last = chats[-1]["messages"]
    assert [m["role"] for m in last] == ["user"] and last[0]["content"][-1] == {"type": "text", "text": QUESTION}
    assert last[0]["content"][0]["image_url"]["url"] == data_url(RED_SQUARE.read_bytes())
    tab.reload()  # the edit is what is kept
    tab.wait_for_selector("body[data-ready]")
    assert tab.locator(".message").count() == 2 and tab.locator(".message.user .text").inner_text() == QUESTION


AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"


def serious_violations(tab: Page) -> list[str]:
    """axe-core's serious and critical violations of the page as it is now."""
    if not tab.evaluate("() => Boolean(window.axe)"):
        tab.add_script_tag(url="/playground/__axe.js")  # same origin: the CSP stays as served
    found = tab.evaluate("async () => (await axe.run(document)).violations"
                         ".filter((v) => ['serious', 'critical'].includes(v.impact))"
                         ".map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).join(', ')})`)")  # fmt: skip
    return found


@pytest.mark.skipif(not AXE.exists(), reason="test_no_serious_accessibility_violations needs axe-core: npm ci (package-lock.json)")
def test_no_serious_accessibility_violations(tab: Page, nano_server) -> None:
    """axe-core, served from the page's own origin (so the CSP stays as served), finds no
    serious or critical violation: at rest, with an answer, the views panel and an edit open,
    and in the dark scheme."""
    tab.route("**/playground/__axe.js", lambda route: route.fulfill(path=str(AXE), content_type="text/javascript"))
    open_playground(tab, nano_server.url)
    tab.wait_for_selector("#model option[value='nano']", state="attached")
    assert serious_violations(tab) == []
    tab.set_input_files("#file", str(RED_SQUARE))
    send(tab, QUESTION)
    wait_answer(tab)
    tab.locator(".message.user .thumb-button").click()
    tab.locator("#views[data-tokens]").wait_for()
    tab.locator(".message.user .edit").click()
    assert serious_violations(tab) == []
    tab.emulate_media(color_scheme="dark")
    assert serious_violations(tab) == []
