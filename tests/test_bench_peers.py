"""The pure helpers of benchmarks/peers.py: what its figures are made of (no server started)."""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(BENCHMARKS))  # peers.py imports its sibling served.py
    try:
        import peers as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def report(peers):
    """benchmarks/peers_report.py, which peers.py imports: the profile and the printed tables."""
    return sys.modules["peers_report"]


def test_levels_parse_and_refuse(peers):
    assert peers.parse_levels("1,4,16,64") == (1, 4, 16, 64)
    with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
        peers.parse_levels("0,4")


def test_percentile_is_nearest_rank(report):
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 51.0
    assert report.percentile(values, 99) == 100.0
    assert math.isnan(report.percentile([], 50))


def test_scaled_images_are_new_and_in_range(peers):
    rng = random.Random(0)
    image = Image.new("RGB", (64, 48), (10, 20, 30))
    urls = set()
    for _ in range(20):
        out = peers.scaled(image, rng)
        assert 200 <= max(out.size) <= 800
        urls.add(peers.png_url(out))
    assert len(urls) == 20  # no image sent twice


def test_level_figures(peers):
    level = peers.Level(seconds=2.0, ttfts=[0.1, 0.2], itls=[0.01] * 4, tpots=[0.01, 0.02], tokens=64, chunks=32)
    figures = level.figures()
    assert figures["req_s"] == 1.0
    assert figures["output_tok_s"] == 32.0
    assert figures["tokens_per_chunk"] == 2.0
    assert figures["ttft_p50_ms"] == pytest.approx(200.0)


def test_stage_profile_rows(report):
    timings = {"queue_ms": 2.0, "preprocess_ms": 30.0, "ttft_ms": 50.0, "total_ms": 90.0,
               "stages_ms": {"engine": 80.0, "fetch": 0.5, "encode": 20.0, "custom": 1.0}}  # fmt: skip
    profile = {"timings": [timings, None], "ttfts": [0.06, 0.07], "e2es": [0.1, 0.2],
               "metrics": {"vllm:request_prefill_time_seconds_sum": 0.2, "vllm:request_prefill_time_seconds_count": 2.0}}  # fmt: skip
    rows = {name.strip(): (mean, n) for name, mean, _, n, _ in report.stage_profile(profile)}
    assert rows["HTTP + SSE + client (client e2e - server total)"] == (pytest.approx(10.0), 1)
    assert rows["vision tower (encode)"] == (20.0, 1)
    assert rows["prefill (engine start -> first token)"] == (pytest.approx(100.0), 2)
    names = [name.strip() for name, *_ in report.stage_profile(profile)]
    # pipeline order, stages the script does not know last
    assert names.index("image fetch (data URL base64)") < names.index("vision tower (encode)") < names.index("engine (slot acquired -> result)") < names.index("custom")


def test_level_requests_default_fills_the_level(peers):
    assert [peers.level_requests(None, c) for c in (1, 4, 16, 64, 256)] == [16, 16, 32, 64, 64]
    assert peers.level_requests(8, 64) == 8


def test_unreported_lines_drop_once_reported(report):
    assert len(report.unreported([None])) == len(report.UNREPORTED)
    left = report.unreported([{"prefill_ms": 1.0, "stages_ms": {"sse": 0.1}}])
    assert not any("prefill per request" in line or line.startswith("SSE") for line in left)
    assert len(left) == len(report.UNREPORTED) - 2
