"""A long fuzz run against `vlmlab serve` (nano): hypothesis-generated whole request bodies.

Starts the server as a subprocess on a loopback port, sends N bodies to /v1/chat/completions and
to /tokenize (strings of any code point, lone surrogates included; integers of any size; nested
and wrong types in every field), checks /health after each, and prints the status counts. The
run fails (exit 1) on any 5xx, any answer that is not OpenAI's error shape, or an unhealthy
server. `tests/test_server_fuzz.py` runs the same idea with a bounded number of examples.

Usage: python benchmarks/fuzz_server.py [--bodies 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import free_port, start_server

FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "n", "stream", "stream_options", "mm_processor_kwargs", "ignore_eos", "user",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec=None), max_size=40)
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)  # fmt: skip
CONTENT = st.text(alphabet=st.characters(codec=None), max_size=60) | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(alphabet=st.characters(codec=None))})
    | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": VALUES})}),
    max_size=3,
)  # fmt: skip
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 7]), "content": CONTENT}),
    max_size=4,
)  # fmt: skip
BODIES = st.fixed_dictionaries({"messages": MESSAGES}, optional={f: VALUES for f in FIELDS[2:]}).map(
    lambda body: {**body, "max_tokens": 2}
) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUES, max_size=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, ["--log-level", "error"])
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    problems: list[str] = []
    try:
        client = httpx.Client(timeout=60)
        start = time.perf_counter()

        @settings(max_examples=args.bodies, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=BODIES)
        def send(body: dict) -> None:
            text = json.dumps(body)
            for path in ("/v1/chat/completions", "/tokenize"):
                reply = client.post(f"{url}{path}", content=text, headers={"content-type": "application/json"})
                statuses[(path, reply.status_code)] += 1
                if reply.status_code >= 500:
                    problems.append(f"{reply.status_code} on {path}: {reply.text[:200]} for {text[:300]}")
                elif reply.status_code >= 400:
                    error = reply.json().get("error", {})
                    if set(error) != {"message", "type", "param", "code"}:
                        problems.append(f"not OpenAI's error shape on {path}: {reply.text[:200]}")
            if client.get(f"{url}/health").status_code != 200:
                problems.append(f"unhealthy after {text[:300]}")

        import random

        random.seed(args.seed)
        send()
        elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    bodies = sum(n for (path, _), n in statuses.items() if path == "/tokenize")
    print(f"{bodies:,} bodies, each to both routes, in {elapsed:.0f} s")
    for (path, status), count in sorted(statuses.items()):
        print(f"  {path:22s} {status}: {count:,}")
    print(f"problems: {len(problems)}")
    for line in problems[:20]:
        print("  " + line)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
