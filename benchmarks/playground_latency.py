"""The playground's paint delay: from a streamed chunk's arrival in the page to its text on screen.

Starts ``vlmlab serve`` (nano, CPU) on a free loopback port, opens the playground in headless
Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright) and asks for answers of 64 tokens
with ``ignore_eos``, one streamed chunk per token. Goal (issue 19): each token's text is painted
within one animation frame (16.7 ms at 60 Hz) of its chunk's arrival.

How it is measured, all in the page's clock (``performance.now()``):

- arrival: ``window.fetch`` is wrapped so that the chat stream's body passes through a
  TransformStream that stamps each network read and parses its SSE events (the text of each
  content chunk);
- painted: a MutationObserver on the message list sees each DOM update; an update made inside an
  animation-frame callback (the page draws answers in ``requestAnimationFrame``) is rendered in
  that frame, so a message posted from the observer runs right after that frame's rendering; an
  update made outside one waits for the next frame (``requestAnimationFrame``, then the message);
- a chunk is painted by the first update whose answer text (whitespace left out, as Markdown
  moves it) is at least as long as the text of every chunk up to and including it.

    .venv/bin/python benchmarks/playground_latency.py [--answers 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from served import free_port, start_server  # noqa: E402

FRAME_MS = 1000 / 60
MAX_TOKENS = 64

INSTRUMENT = """() => {
  // arrived: characters (whitespace left out) of this answer's chunks so far
  const log = window.__latency = { arrivals: [], updates: [], frames: [], arrived: 0 };
  const strip = (text) => text.replace(/\\s+/g, "");
  const realFetch = window.fetch;
  window.fetch = async (input, init) => {
    const response = await realFetch(input, init);
    if (!String(input).includes("/v1/chat/completions") || !response.body) return response;
    const decoder = new TextDecoder();
    let buffer = "";
    const stamp = new TransformStream({
      transform(bytes, controller) {
        const now = performance.now();
        buffer += decoder.decode(bytes, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.startsWith("data:") ? event.slice(5).trim() : "";
          if (!data || data === "[DONE]") continue;
          const text = (JSON.parse(data).choices || []).map((c) => (c.delta && c.delta.content) || "").join("");
          if (text) {
            log.arrived += strip(text).length;
            log.arrivals.push({ at: now, length: log.arrived });
          }
        }
        controller.enqueue(bytes);
      },
    });
    return new Response(response.body.pipeThrough(stamp), {
      status: response.status, statusText: response.statusText, headers: response.headers,
    });
  };
  // Which DOM updates happen inside an animation-frame callback: the observer's microtask runs
  // before the one queued after the callback returns.
  let inFrame = false;
  const realRaf = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => realRaf((time) => {
    inFrame = true;
    try { callback(time); } finally { queueMicrotask(() => { inFrame = false; }); }
  });
  const afterPaint = (record) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => { record.painted = performance.now(); log.updates.push(record); };
    channel.port2.postMessage(null);
  };
  new MutationObserver(() => {
    const answer = [...document.querySelectorAll(".answer .markdown")].at(-1);
    if (!answer) return;
    const record = { updated: performance.now(), length: strip(answer.textContent).length };
    if (inFrame) afterPaint(record); else realRaf(() => afterPaint(record));
  }).observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true });
  const tick = (time) => { log.frames.push(time); if (log.frames.length < 600) realRaf(tick); };
  realRaf(tick);
}"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def paint_delays(log: dict) -> list[float]:
    """Per chunk: ms from its arrival to the first painted update that shows its text."""
    delays = []
    updates = sorted(log["updates"], key=lambda u: u["painted"])
    for arrival in log["arrivals"]:
        painted = next((u["painted"] for u in updates if u["updated"] >= arrival["at"] and u["length"] >= arrival["length"]), None)
        if painted is not None:
            delays.append(painted - arrival["at"])
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=3, help=f"answers of {MAX_TOKENS} tokens (default 3)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed: apt-get install chromium")
    port = free_port()
    server = start_server(port, ["--model", "nano", "--device", "cpu"])
    delays: list[float] = []
    frames: list[float] = []
    missing = 0
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("body[data-ready]")
            page.wait_for_selector("#model option[value='nano']", state="attached")
            page.fill("#max-tokens", str(MAX_TOKENS))
            page.check("#ignore-eos")
            page.evaluate(INSTRUMENT)
            for _ in range(args.answers):
                page.click("#new-chat")
                page.evaluate("() => Object.assign(window.__latency, { arrivals: [], updates: [], arrived: 0 })")
                page.fill("#input", "Tell me about the picture.")
                page.press("#input", "Enter")
                page.locator(".answer .figures[data-completion-tokens]").wait_for(timeout=60_000)
                page.wait_for_timeout(100)  # the last update's paint message
                log = page.evaluate("() => window.__latency")
                answer_delays = paint_delays(log)
                missing += len(log["arrivals"]) - len(answer_delays)
                delays += answer_delays
            log = page.evaluate("() => window.__latency")
            frames = [b - a for a, b in zip(log["frames"], log["frames"][1:])]
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    if not delays:
        sys.exit("no chunk was seen painted")
    median, p90 = statistics.median(delays), percentile(delays, 0.9)
    frame = statistics.median(frames) if frames else float("nan")
    verdict = "within" if median <= FRAME_MS else "NOT within"
    print(f"chunks: {len(delays)} over {args.answers} answers of {MAX_TOKENS} tokens (unmatched: {missing})")
    print(f"arrival -> painted: median {median:.1f} ms, p90 {p90:.1f} ms, max {max(delays):.1f} ms")
    print(f"animation frame here: median {frame:.1f} ms apart")
    print(f"median {verdict} one animation frame ({FRAME_MS:.1f} ms); p90 {'within' if p90 <= FRAME_MS else 'over'} it")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"chunks": len(delays), "unmatched": missing, "median_ms": median, "p90_ms": p90,
                       "max_ms": max(delays), "frame_ms": frame, "goal_ms": FRAME_MS, "delays_ms": delays}, out, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
