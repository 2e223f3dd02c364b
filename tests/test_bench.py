"""`vlmlab bench` against a real nano server on loopback: the numbers it reports must agree with
what the server itself counted (usage, /metrics) and with vllm bench serve's definitions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serverutil import running_server
from vlmlab.bench import BenchConfig, arrival_times, parse_image_sizes, parse_slo, run_bench
from vlmlab.bench.client import RequestRecord, _Stream
from vlmlab.bench.config import bench_config, parse_concurrency
from vlmlab.bench.stats import metric_deltas, parse_prometheus, summarize
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.families import get_family
from vlmlab.protocol.errors import ConfigError, EngineUnavailableError

SIZE = (320, 240)


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), trusted_media_hosts=("127.0.0.1",))
    with running_server(settings) as running:
        yield running


def config(server, **overrides) -> BenchConfig:
    """Small runs; every test passes its own seed so no test meets another's cached images."""
    settings = dict(base_url=server.base_url, image_sizes=parse_image_sizes(f"{SIZE[0]}x{SIZE[1]}"), num_requests=6,
                    max_tokens=4, ignore_eos=True, warmups=1, make_plots=False)  # fmt: skip
    settings.update(overrides)
    return BenchConfig(**settings)


def records_of(run: dict) -> list[RequestRecord]:
    return [RequestRecord(**{k: v for k, v in r.items() if k != "tpot_s"}) for r in run["requests"]]


# -- schedule and parsing (no server) --------------------------------------------------------------


def test_poisson_schedule_spans_n_over_rate_and_burstiness_sets_the_spread() -> None:
    n, rate = 2000, 25.0
    poisson = arrival_times(n, rate, burstiness=1.0, seed=3)
    assert len(poisson) == n and poisson[0] > 0
    assert math.isclose(poisson[-1], n / rate, rel_tol=1e-12)  # vLLM's rescaling: exactly N / rate
    gaps = np.diff([0.0, *poisson])
    assert (gaps >= 0).all()
    # Gamma(shape k) gaps have coefficient of variation 1/sqrt(k): 1 for Poisson, 0.5 for k = 4.
    assert 0.9 < gaps.std() / gaps.mean() < 1.1
    even = np.diff([0.0, *arrival_times(n, rate, burstiness=4.0, seed=3)])
    assert 0.45 < even.std() / even.mean() < 0.55
    assert arrival_times(n, rate, seed=3) == poisson and arrival_times(n, rate, seed=4) != poisson
    assert arrival_times(5, math.inf) == [0.0] * 5


def test_flag_parsers_read_values_and_name_bad_ones() -> None:
    assert parse_slo("ttft=500,tpot:50 e2el=2000") == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    assert [(b.width, b.height, b.weight) for b in parse_image_sizes(["512x512,1080p:3"])] == [(512, 512, 1.0), (1920, 1080, 3.0)]
    assert parse_concurrency("16,1,4,4") == (1, 4, 16) and parse_concurrency(None) == (None,)
    for bad, call in (("latency", lambda: parse_slo("latency=5")), ("ttft=-1", lambda: parse_slo("ttft=-1")),
                      ("0", lambda: parse_concurrency("0,2")), ("512x", lambda: parse_image_sizes("512x"))):  # fmt: skip
        with pytest.raises(ConfigError, match=bad):
            call()
    with pytest.raises(ConfigError, match="not both"):
        bench_config(max_concurrency=2, concurrency="1,2")
    with pytest.raises(ConfigError, match="--max-concurrency"):
        BenchConfig(duration_s=5.0)  # an open-ended closed loop needs a cap


def test_prometheus_parser_sums_labels_and_counts_declared_counters_as_zero() -> None:
    before = parse_prometheus(
        "# TYPE vllm:mm_cache_hits_total counter\n# TYPE vllm:mm_cache_queries_total counter\n"
        'vllm:mm_cache_queries_total{model_name="m"} 2.0\nvllm:mm_cache_queries_created{model_name="m"} 1.7e9\n'
    )
    after = parse_prometheus(
        'vllm:mm_cache_hits_total{model_name="m"} 3.0\nvllm:mm_cache_queries_total{model_name="m"} 5.0\n'
        'vllm:mm_cache_queries_total{model_name="other"} 1.0\nvllm:num_requests_running{model_name="m"} 4\n'
    )
    assert before == {"vllm:mm_cache_hits_total": 0.0, "vllm:mm_cache_queries_total": 2.0}
    assert metric_deltas(before, after) == {"vllm:mm_cache_hits_total": 3.0, "vllm:mm_cache_queries_total": 4.0}


def test_an_error_inside_a_200_stream_is_a_failure() -> None:
    record = RequestRecord(index=0)
    stream = _Stream(record, t0=0.0)
    stream.feed({"choices": [{"delta": {"content": "Hi"}}]}, now=0.1)
    stream.feed({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}, now=0.2)
    stream.finish(now=0.3)
    assert not record.success and record.error == "engine died"


# -- against the nano server -----------------------------------------------------------------------


def test_pooled_images_numbers_agree_with_the_server(server) -> None:
    result = run_bench(config(server, seed=11, num_requests=8, image_pool=2, concurrency=(2,), slo={"ttft": 1e7, "tpot": 1e7}))
    run = result["runs"][0]
    summary, records = run["summary"], records_of(run)
    assert summary["completed"] == 8 and summary["failed"] == 0 and summary["errors"] == []
    image_tokens = get_family("nano").image_tokens(*SIZE)
    for r in records:
        assert r.success and 0 < r.ttft_s <= r.e2el_s
        # usage from the include_usage chunk; ignore_eos makes every answer exactly max_tokens
        assert r.tokens_from_usage and r.completion_tokens == r.output_tokens == 4
        assert 1 <= r.output_chunks <= r.output_tokens and len(r.itl_s) == r.output_chunks - 1
        assert r.image_tokens == image_tokens and r.prompt_tokens > r.image_tokens
        assert r.tpot_s == pytest.approx((r.e2el_s - r.ttft_s) / 3)
    # The client's totals are the server's own counters.
    delta = run["server_metrics"]["delta"]
    assert summary["total_input_tokens"] == delta["vllm:prompt_tokens_total"] == sum(r.prompt_tokens for r in records)
    assert summary["total_output_tokens"] == delta["vllm:generation_tokens_total"] == 32
    assert summary["total_image_tokens"] == delta["vlmlab:image_tokens_total"] == 8 * image_tokens
    # Two pooled images over eight requests: the later requests hit the preprocessing cache.
    assert summary["cache"]["expected_image_hit_ratio"] == 0.75
    assert 0 < delta["vllm:mm_cache_hits_total"] <= 6 and delta["vllm:mm_cache_queries_total"] == 8
    assert summary["warnings"] == []
    # vllm bench serve definitions.
    assert summary["peak_concurrency"] <= 2
    assert summary["duration_s"] >= max(r.end_s for r in records)
    assert summary["tpot"]["mean_ms"] == pytest.approx(1000 * np.mean([r.tpot_s for r in records]))
    assert summary["itl"]["n"] == sum(len(r.itl_s) for r in records)
    throughput = summary["throughput"]
    assert throughput["requests_per_s"] == pytest.approx(8 / summary["duration_s"])
    assert throughput["total_tokens_per_s"] == pytest.approx((summary["total_input_tokens"] + 32) / summary["duration_s"])
    # Goodput: a generous SLO keeps every request, an impossible one none.
    assert throughput["goodput_requests_per_s"] == pytest.approx(throughput["requests_per_s"])
    assert summarize(records, summary["duration_s"], {"ttft": 1e-3})["throughput"]["goodput_requests_per_s"] == 0
    assert summarize(records, summary["duration_s"], {"e2el": 1e9})["goodput"]["good_requests"] == 8
    timings = summary["server_timings"]
    assert timings["requests"] == 8 and 0 < timings["preprocess_share"] < 1


def test_unique_images_over_http_never_hit_the_cache_and_follow_the_schedule(server) -> None:
    cfg = config(server, seed=23, num_requests=4, transport="http", request_rate=20.0, concurrency=(2,))
    run = run_bench(cfg)["runs"][0]
    summary, records = run["summary"], records_of(run)
    assert summary["failed"] == 0, summary["errors"]
    delta = run["server_metrics"]["delta"]
    assert delta["vllm:mm_cache_hits_total"] == 0 and delta["vllm:mm_cache_queries_total"] == 4
    assert summary["cache"]["expected_image_hit_ratio"] == 0.0
    assert all(r.payload_bytes < 1024 < r.image_bytes for r in records)  # URLs, not data, in the body
    # Requests leave at the Poisson offsets (level 0 uses seed + 0), the last at N / rate.
    assert [r.scheduled_s for r in records] == arrival_times(4, 20.0, 1.0, seed=23)
    assert records[-1].scheduled_s == pytest.approx(0.2)
    assert all(r.start_s >= r.scheduled_s - 1e-3 for r in records)  # never sent early


def test_closed_loop_duration_run(server) -> None:
    run = run_bench(config(server, seed=31, num_requests=None, duration_s=1.0, concurrency=(2,), warmups=0))["runs"][0]
    records = records_of(run)
    assert run["summary"]["failed"] == 0 and len(records) >= 2
    assert all(r.start_s < 1.0 for r in records) and run["summary"]["peak_concurrency"] <= 2


def test_failed_requests_are_counted_with_their_errors(server) -> None:
    summary = run_bench(config(server, seed=37, num_requests=3, model="no-such-model", warmups=0))["summary"]
    assert summary["completed"] == 0 and summary["failed"] == 3
    assert "no-such-model" in summary["errors"][0] and "HTTP 404" in summary["errors"][0]
    with pytest.raises(EngineUnavailableError, match="warm-up"):
        run_bench(config(server, seed=37, num_requests=1, model="no-such-model"))


def test_sweep_writes_documented_json_and_plots(server, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cfg = config(server, seed=41, dataset="synth", num_requests=3, concurrency=(1, 2), output=str(out), make_plots=True)
    run_bench(cfg)
    result = json.loads(out.read_text())
    assert {"schema", "environment", "target", "settings", "runs", "summary", "sweep", "plots"} <= set(result)
    assert {"platform", "cpu", "python", "vlmlab"} <= set(result["environment"])
    assert result["target"]["card"]["id"] == "nano" and result["settings"]["dataset"] == "synth"
    assert {"ttft", "tpot", "itl", "e2el", "throughput"} <= set(result["summary"])
    assert [r["max_concurrency"] for r in result["sweep"]] == [1, 2]
    assert all(len(run["requests"]) == 3 and run["summary"]["failed"] == 0 for run in result["runs"])
    assert len(result["plots"]) == 2
    for plot in result["plots"]:
        assert Path(plot).parent == tmp_path and Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_starts_its_own_server_and_serves_it_images_over_http(tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    args = ["bench", "-m", "nano", "--num-requests", "2", "--max-tokens", "2", "--image-size", "256x256",
            "--transport", "http", "--output", str(out), "--no-plots", "--serve-arg=--device=cpu"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "vlmlab", *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["target"]["started_by_bench"] and "--trusted-media-hosts" in result["target"]["command"]
    assert result["summary"]["completed"] == 2 and result["summary"]["failed"] == 0
    assert "successful requests" in done.stdout
