"""benchmarks/peers.py's report: the per-stage profile and the printed tables (split out to keep
peers.py, which starts and drives the servers, to one concern)."""

from __future__ import annotations

import argparse
import statistics

BASELINE = "vlmlab"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the ``q``-th of sorted ``values``); NaN when empty."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


# -- the per-stage profile --------------------------------------------------------------------

# What the server does not time yet, each with where it happens (for the lead to add), keyed by the
# timings field or stage that would report it: a line is not printed once responses carry its key.
UNREPORTED = (
    ("http", "HTTP receive + JSON parse/validation of the body (server/app.py)"),
    ("parse", "request parse: messages -> Chat, sampling checks (ChatService.parse)"),
    ("template", "chat template + tokenization (the engine's render and count)"),
    ("prefill_ms", "prefill per request (Timings.prefill_s)"),
    ("decode_ms", "decode per request (Timings.decode_s); per-step times are only the mean TPOT"),
    ("batch_wait", "wait inside the engine for a batch (scheduler), apart from compute"),
    ("replica_send", "the hop to a data-parallel replica (pickle, pipe), with --data-parallel-size > 1"),
    ("detokenize", "detokenize (incremental text per token)"),
    ("sse", "SSE: chunk serialization and socket writes"),
)


def unreported(timings: list[dict | None]) -> list[str]:
    """The lines of :data:`UNREPORTED` whose key no response's timings carry."""
    seen = {key for t in timings if t for key in [*t, *t.get("stages_ms", {})]}
    return [line for key, line in UNREPORTED if key not in seen]


# The stages a response's timings.stages_ms may hold, in pipeline order (server/app.py: http, sse;
# server/service.py: parse, fetch, decode, slot_wait, engine; the hf engine: template, processor or
# vlmlab.preprocess's resize, normalize, to_tensor; encode, replica_send, batch_wait, detokenize).
STAGE_NAMES = {
    "http": "  HTTP receive + JSON + validation", "parse": "  parse (messages -> chat)",
    "fetch": "  image fetch (data URL base64)", "decode": "  image decode (PIL)",
    "slot_wait": "  wait for a server slot", "template": "  chat template + tokenization",
    "resize": "  resize", "normalize": "  normalize", "to_tensor": "  to tensor", "processor": "  processor (template, tokens, pixels)",
    "replica_send": "  hop to the replica (pickle, pipe)", "encode": "  vision tower (encode)",
    "batch_wait": "  wait for a batch (engine scheduler)", "detokenize": "  detokenize (incremental text, summed)",
    "engine": "engine (slot acquired -> result)", "sse": "SSE serialization (chunks before the last)",
}  # fmt: skip


def stage_profile(profile: dict) -> list[tuple[str, float, float, int, str]]:
    """``(stage, mean ms, p50 ms, n, source)`` rows from the profile level's figures."""
    rows: list[tuple[str, float, float, int, str]] = []

    def add(name: str, values: list[float], source: str) -> None:
        if values:
            rows.append((name, statistics.fmean(values), percentile(values, 50), len(values), source))

    timings = [t for t in profile["timings"] if t]
    add("client: end to end", [1000 * s for s in profile["e2es"]], "client")
    add("client: TTFT", [1000 * s for s in profile["ttfts"]], "client")
    add("server total (request start -> result)", [t["total_ms"] for t in timings if t.get("total_ms") is not None], "timings.total_ms")
    paired = [(e, t["total_ms"]) for e, t in zip(profile["e2es"], profile["timings"]) if t and t.get("total_ms") is not None]
    add("HTTP + SSE + client (client e2e - server total)", [1000 * e - t for e, t in paired], "client e2e - timings.total_ms")
    for key, name in (("queue_ms", "queue (server slot + engine batch)"), ("preprocess_ms", "preprocess (fetch .. vision tower)"),
                      ("ttft_ms", "server TTFT"), ("prefill_ms", "prefill (engine start -> first token)"),
                      ("decode_ms", "decode (first -> last token)")):  # fmt: skip
        add(name, [t[key] for t in timings if t.get(key) is not None], f"timings.{key}")
    seen = {stage for t in timings for stage in t.get("stages_ms", {})}
    for stage in [*(s for s in STAGE_NAMES if s in seen), *sorted(seen - set(STAGE_NAMES))]:
        values = [t["stages_ms"][stage] for t in timings if stage in t.get("stages_ms", {})]
        add(STAGE_NAMES.get(stage, stage), values, f"timings.stages_ms.{stage}")
    metrics = profile["metrics"] if not any(t.get("prefill_ms") is not None for t in timings) else {}  # else in the timings
    for name, label in (("vllm:request_prefill_time_seconds", "prefill (engine start -> first token)"),
                        ("vllm:request_decode_time_seconds", "decode (first -> last token)"),
                        ("vllm:request_time_per_output_token_seconds", "decode step (time per output token)")):  # fmt: skip
        count = metrics.get(name + "_count", 0.0)
        if count:
            rows.append((label, 1000 * metrics[name + "_sum"] / count, float("nan"), int(count), f"/metrics {name} (mean only)"))
    return rows


# -- printing -----------------------------------------------------------------------------------

COLUMNS = (("req_s", "req/s", "{:8.2f}"), ("output_tok_s", "out tok/s", "{:9.1f}"), ("ttft_p50_ms", "TTFT p50", "{:8.1f}"),
           ("ttft_p99_ms", "TTFT p99", "{:8.1f}"), ("itl_p50_ms", "ITL p50", "{:7.2f}"), ("itl_p99_ms", "ITL p99", "{:7.2f}"), ("tpot_p50_ms", "TPOT p50", "{:8.2f}"),
           ("peak_rss_mb", "RSS MB", "{:7.0f}"))  # fmt: skip


def print_report(report: dict, args: argparse.Namespace) -> None:
    medians = report["medians"]
    print(f"\npeers on {report['checkpoint']}: streamed, greedy, {args.max_tokens} tokens forced, {args.requests or '2x concurrency (16-64)'} new images a round"
          f" and level, medians of {args.rounds} rounds (all servers alive, driven one at a time, order rotated per round)")  # fmt: skip
    for line in report["notes"]:
        print(f"  {line}")
    width = max(len(label) for label in medians) + len(" / vlmlab")
    for concurrency in args.concurrency:
        print(f"  {concurrency} concurrent (ms for TTFT and ITL):")
        print(f"    {'peer':<{width}}" + "".join(f" {title:>{len(fmt.format(0))}}" for _, title, fmt in COLUMNS) + "  tok/chunk")
        base = medians[BASELINE][concurrency]
        for label, levels in medians.items():
            row = levels[concurrency]
            print(f"    {label:<{width}}" + "".join(" " + fmt.format(row[key]) for key, _, fmt in COLUMNS) + f"  {row['tokens_per_chunk']:9.2f}")
        for label, levels in medians.items():
            if label != BASELINE:
                row = levels[concurrency]
                cells = "".join(" " + f"{ratio(base[key], row[key]):>{len(fmt.format(0)) - 1}.2f}x" for key, _, fmt in COLUMNS)
                print(f"    {'vlmlab / ' + label:<{width}}" + cells)
    print("  (ratios are vlmlab's value / the peer's: above 1 is better for req/s and tok/s, worse for TTFT, ITL and RSS)")
    if "transformers" in medians:
        one, sixteen = min(args.concurrency), min(args.concurrency, key=lambda c: abs(c - 16))
        ours, theirs = medians[BASELINE], medians["transformers"]
        print(f"  issue 22 goals, vlmlab / transformers serve: req/s at {one}: {ratio(ours[one]['req_s'], theirs[one]['req_s']):.2f}x (>= 1.2x),"
              f" at {sixteen}: {ratio(ours[sixteen]['req_s'], theirs[sixteen]['req_s']):.2f}x (>= 2x),"
              f" TTFT p50 at {sixteen}: {ratio(ours[sixteen]['ttft_p50_ms'], theirs[sixteen]['ttft_p50_ms']):.2f}x (<= 0.5x)")  # fmt: skip
    print("  answers identical to vlmlab's: " + ", ".join(f"{label} {a}/{n}" for label, (a, n) in report["answers_same_as_vlmlab"].items() if label != BASELINE))
    for example in report["differing"]:
        print(f"    differs (round {example['round']}, {example['concurrency']} concurrent, {example['question']!r}):"
              f" vlmlab {example[BASELINE]!r} | transformers {example['transformers']!r}")
    for label, errors in report["errors"].items():
        print(f"  {label} failed requests (not in the figures), first: {errors[:3]}")
    profile = report["profile"]
    print(f"\nper-stage profile, {BASELINE} at {profile['concurrency']} concurrent ({len(profile['ttfts'])} requests over the rounds):")
    print(f"    {'stage':<50} {'mean ms':>9} {'p50 ms':>9} {'n':>5}  source")
    for name, mean, p50, n, source in stage_profile(profile):
        print(f"    {name:<50} {mean:9.2f} {p50:9.2f} {n:5d}  {source}")
    print("  not reported by the server yet:")
    for line in unreported(profile["timings"]):
        print(f"    - {line}")


def print_aiperf(check: dict) -> None:
    print(f"\nindependent client: aiperf vs this script against {BASELINE} at 16 concurrent, {check['requests']} new images each")
    if "error" in check:
        print(f"  aiperf failed ({check['error'][-800:]})\n  command: {check['command']}")
        return
    ours, theirs = check["ours"], check["aiperf"]
    for key, title in (("req_s", "req/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("output_tok_s", "output tok/s")):
        print(f"  {title:<13} script {ours[key]:9.2f}   aiperf {theirs[key]:9.2f}   aiperf / script {ratio(theirs[key], ours[key]):.2f}x")
    saw = check["server_saw"]
    print(f"  (script: the mean of runs just before and after aiperf's; aiperf's own wall time {check['wall_s']:.0f} s, start-up included)")
    print(f"  client CPU seconds: script {check['script_cpu_s']:.1f} a run, aiperf {check['aiperf_cpu_s']:.1f} (its processes together;"
          " on a machine this small the client's CPU is the server's loss)")  # fmt: skip
    print(f"  the server saw during aiperf's run: {saw['requests']:.0f} requests, {saw['image_tokens']:.0f} image tokens,"
          f" {saw['generation_tokens']:.0f} generated tokens")  # fmt: skip
