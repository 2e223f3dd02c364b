"""Issue 17 item 10: `vlmlab bench` as a newcomer meets it.

- it shows progress while it runs (a live bar on a terminal, a line per finished run in logs),
  on stderr only;
- "peak output tok/s" is the most tokens that arrived within any one-second window, so it is at
  least the mean under a steady load;
- the throughput plot gives each metric its own panel and unit, with legends off the data;
- reports (the terminal table, compare/sweep HTML) read 25.3 ms and 846.0 MiB, not 0.02534 and
  887054336, while the JSON keeps raw seconds and bytes.

Every bench here is the real `vlmlab bench` command against nano served on a loopback port.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from itertools import pairwise
from pathlib import Path

import pytest
from serverutil import running_server

from vlmlab.bench import BenchConfig, parse_image_sizes, run_bench
from vlmlab.bench.client import RequestRecord
from vlmlab.bench.progress import BenchProgress
from vlmlab.bench.report import latency_cdf_figure, throughput_figure
from vlmlab.bench.stats import peak_output_throughput, summarize, token_arrivals
from vlmlab.compare import load_questions, run_compare, write_outputs
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.units import format_bytes, format_duration

# Small, quick runs: 128x128 images, exactly --max-tokens tokens each (ignore_eos).
BENCH_ARGS = ["--image-size", "128x128", "--ignore-eos", "--warmups", "1"]


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),))
    with running_server(settings) as running:
        yield running


def bench_cli(server, *args: str, stderr_tty: bool = False) -> tuple[int, str, str]:
    """Run `python -m vlmlab bench --base-url SERVER ARGS`; returns (status, stdout, stderr).

    ``stderr_tty``: stderr is a pseudo-terminal (160 columns), as in an interactive shell.
    """
    command = [sys.executable, "-m", "vlmlab", "bench", "--base-url", server.base_url, *args]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")
    }
    if not stderr_tty:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=180, env=env, check=False
        )
        return done.returncode, done.stdout, done.stderr
    master, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child, env=env
    )
    os.close(child)
    received: list[bytes] = []

    def drain() -> None:  # keep reading so the child never blocks on a full terminal buffer
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = process.communicate(timeout=180)
    finally:
        reader.join(timeout=10)
        os.close(master)
    return process.returncode, stdout.decode(), b"".join(received).decode("utf-8", "replace")


def table_cells(stdout: str, metric: str) -> list[str]:
    """The cells of one row of the printed result table (``│ metric │ a │ b │``)."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == metric:
            return cells[1:]
    raise AssertionError(f"no row {metric!r} in:\n{stdout}")


# -- units ------------------------------------------------------------------------------------------


def test_durations_and_sizes_read_in_human_units() -> None:
    assert format_duration(0.02534) == "25.3 ms"
    assert format_duration(0.00129) == "1.29 ms"  # a TPOT keeps its decimals
    assert format_duration(0.99996) == "1.00 s"  # no "1000.0 ms"
    assert format_duration(1.5234) == "1.52 s"
    assert format_duration(125) == "2 min 05 s"
    assert format_duration(None) == "-"
    assert format_bytes(887054336) == "846.0 MiB"


# -- peak output throughput ---------------------------------------------------------------------------


def streamed(
    index: int, start_s: float, chunk_times: list[float], tokens: int | None = None
) -> RequestRecord:
    """A successful record whose text chunks arrived at ``chunk_times`` (run offsets, s)."""
    first = chunk_times[0]
    gaps = [b - a for a, b in pairwise(chunk_times)]
    return RequestRecord(
        index=index, success=True, start_s=start_s, end_s=chunk_times[-1], ttft_s=first - start_s,
        e2el_s=chunk_times[-1] - start_s, itl_s=gaps, output_chunks=len(chunk_times),
        output_tokens=len(chunk_times) if tokens is None else tokens,
    )  # fmt: skip


def test_peak_is_the_most_tokens_in_any_one_second_window() -> None:
    # Eight tokens between 0.625 s and 1.5 s. One-second buckets from t = 0 (vLLM's, and the old
    # rule here) split them 3 + 5; the window [0.625 s, 1.625 s) holds all eight.
    steady = streamed(0, 0.5, [0.625 + 0.125 * k for k in range(8)])
    peak, window = peak_output_throughput([steady], duration_s=2.0)
    assert (peak, window) == (8.0, 1.0)
    # A chunk carrying several tokens counts them all: usage says 5 tokens in 3 chunks.
    packed = streamed(1, 3.0, [3.25, 3.5, 3.75], tokens=5)
    assert [n for _, n in token_arrivals(packed)] == [1, 2, 2]
    assert peak_output_throughput([packed], duration_s=5.0) == (5.0, 1.0)
    # Failed requests produce no tokens; a request with tokens but no text chunk has them at its end.
    failed = RequestRecord(
        index=2, success=False, output_chunks=3, output_tokens=3, ttft_s=0.1, start_s=0.0
    )
    silent = RequestRecord(
        index=3, success=True, start_s=0.0, end_s=0.4, ttft_s=0.4, e2el_s=0.4, output_tokens=2
    )
    assert token_arrivals(failed) == [] and token_arrivals(silent) == [(0.4, 2)]
    assert peak_output_throughput([failed], 1.0) == (None, 1.0)
    # A run shorter than the window is measured over its own duration: peak == mean.
    short = [streamed(i, 0.0, [0.1 + 0.05 * k for k in range(6)]) for i in range(4)]
    summary = summarize(short, duration_s=0.5)
    throughput = summary["throughput"]
    assert throughput["peak_output_window_s"] == 0.5
    assert throughput["peak_output_tokens_per_s"] == throughput["output_tokens_per_s"] == 24 / 0.5


def test_steady_closed_loop_peak_is_at_least_the_mean(server, tmp_path: Path) -> None:
    """A run longer than the window, at a steady load (two workers back to back): the busiest
    second produces at least the run's average, which also counts the first TTFT and the tail."""
    out = tmp_path / "steady.json"
    status, _, stderr = bench_cli(
        server,
        *BENCH_ARGS,
        "--max-tokens",
        "16",
        "--duration",
        "1.5",
        "--max-concurrency",
        "2",
        "--seed",
        "5",
        "-o",
        str(out),
        "--no-plots",
    )
    assert status == 0, stderr[-2000:]
    throughput = json.loads(out.read_text())["summary"]["throughput"]
    assert json.loads(out.read_text())["summary"]["duration_s"] > 1.5
    assert throughput["peak_output_window_s"] == 1.0
    assert throughput["peak_output_tokens_per_s"] >= throughput["output_tokens_per_s"] > 0


# -- the CLI: progress, humanised table, raw JSON, plots -----------------------------------------------


def test_bench_logs_a_line_per_run_and_prints_human_units(server, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    status, stdout, stderr = bench_cli(
        server,
        *BENCH_ARGS,
        "--max-tokens",
        "8",
        "--num-requests",
        "6",
        "--concurrency",
        "1,2",
        "--seed",
        "3",
        "-o",
        str(out),
    )
    assert status == 0, stderr[-2000:]
    # Not a terminal: one plain line per finished run, on stderr only.
    for line in (
        "run 1/2 concurrency=1: 6/6 requests, 6 ok, 0 failed in ",
        "run 2/2 concurrency=2: 6/6 requests, 6 ok, 0 failed in ",
    ):
        assert line in stderr and line not in stdout
    assert stderr.index("run 1/2") < stderr.index("run 2/2")
    assert "\x1b[" not in stderr  # nothing animated in a log
    # The table: durations with their unit, sizes in KiB, no "(ms)" column of bare numbers.
    duration = re.compile(r"^-?\d+\.\d+ (ms|s)$")
    for metric in (
        "benchmark duration",
        "mean TTFT",
        "p99 TTFT",
        "mean TPOT (excl. 1st token)",
        "median ITL",
        "mean E2EL",
        "mean server preprocess",
    ):
        cells = table_cells(stdout, metric)
        assert len(cells) == 2 and all(duration.match(c) for c in cells), (metric, cells)
    assert all(re.fullmatch(r"\d+\.\d KiB", c) for c in table_cells(stdout, "mean request size"))
    assert all(c.endswith("%") for c in table_cells(stdout, "server preprocess share of E2EL"))
    assert "(ms)" not in stdout and "(KiB)" not in stdout
    peak_cells = table_cells(stdout, "peak output tok/s (max over 1-s windows)")
    # The JSON keeps machine numbers under the same keys as before.
    result = json.loads(out.read_text())
    for run, peak_cell in zip(result["runs"], peak_cells, strict=True):
        summary = run["summary"]
        assert isinstance(summary["duration_s"], float) and isinstance(
            summary["ttft"]["mean_ms"], float
        )
        assert isinstance(summary["payload"]["mean_request_bytes"], float)
        throughput = summary["throughput"]
        assert throughput["peak_output_tokens_per_s"] >= throughput["output_tokens_per_s"] > 0
        if (
            summary["duration_s"] < 1.0
        ):  # a sub-second run: the window is the run, and the table says so
            assert throughput["peak_output_window_s"] == summary[
                "duration_s"
            ] and peak_cell.endswith("*")
            assert "* run shorter than 1 s: peak over the whole run (= mean)" in stdout
    # The plots it wrote: throughput panels apart, each with its unit; legends off the data.
    assert [Path(p).name for p in result["plots"]] == [
        "sweep-latency-cdf.png",
        "sweep-vs-concurrency.png",
    ]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in result["plots"])
    figure = throughput_figure(result)
    axes = figure.axes
    assert [ax.get_ylabel() for ax in axes] == [
        "output tokens per second (tok/s)",
        "requests per second (req/s)",
        "TTFT (ms)",
    ]
    assert [len(ax.get_lines()) for ax in axes] == [1, 1, 2]  # one metric per panel
    assert all(ax.get_xlabel() for ax in axes)
    for i, a in enumerate(axes):  # no twin axes stacked on one panel
        assert not any(a.get_position().overlaps(b.get_position()) for b in axes[i + 1 :])
    for fig in (figure, latency_cdf_figure(result)):
        fig.canvas.draw()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends, "the multi-line panels have a legend"
        for legend in legends:
            box = legend.get_window_extent()
            assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes), (
                "a legend covers a plot"
            )


def test_bench_on_a_terminal_shows_a_live_bar_on_stderr(server, tmp_path: Path) -> None:
    status, stdout, terminal = bench_cli(
        server,
        *BENCH_ARGS,
        "--max-tokens",
        "8",
        "--num-requests",
        "5",
        "--max-concurrency",
        "2",
        "--seed",
        "7",
        "--no-plots",
        stderr_tty=True,
    )
    assert status == 0, terminal[-2000:]
    assert "\x1b[?25l" in terminal  # rich's live display (cursor hidden while it redraws)
    assert (
        "concurrency=2" in terminal
        and "5/5" in terminal
        and "5 ok · 0 failed" in terminal
        and "warming up" in terminal
    )
    assert "requests, 5 ok" not in terminal  # the log line is for non-terminals only
    assert "5 ok" not in stdout and "successful requests" in stdout  # stdout: the result only


def test_progress_events_count_ok_and_failed_requests(server) -> None:
    events: list[BenchProgress] = []
    config = BenchConfig(base_url=server.base_url, model="no-such-model", image_sizes=parse_image_sizes("64x64"),
                         num_requests=3, max_tokens=2, warmups=0, make_plots=False, concurrency=(1,))  # fmt: skip
    run_bench(config, on_progress=events.append)
    assert [e.phase for e in events] == ["running", "request", "request", "request", "finished"]
    assert [(e.done, e.ok, e.failed) for e in events] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 0, 2),
        (3, 0, 3),
        (3, 0, 3),
    ]
    assert (
        events[-1].total == 3 and events[-1].label == "concurrency=1" and events[-1].elapsed_s > 0
    )
    assert events[-1].finished_line().startswith("concurrency=1: 3/3 requests, 0 ok, 3 failed in ")


# -- compare / sweep reports --------------------------------------------------------------------------


def test_compare_report_shows_ms_and_mib(tmp_path: Path) -> None:
    questions = load_questions(dataset="synth", limit=2)
    answers = run_compare(["nano"], questions, max_tokens=4, device="cpu")
    page = write_outputs(answers, questions, tmp_path, "units").read_text()
    summary = page[page.index("<h2>Summary</h2>") : page.index("<h2>Answers</h2>")]
    assert "<th>mean latency</th>" in summary and "mean_latency_s" not in summary
    cells = re.findall(r'<td class="num">([^<]*)</td>', summary)
    assert re.fullmatch(r"\d+\.\d+ (ms|s)", cells[3]) and re.fullmatch(r"\d+\.\d+ (ms|s)", cells[4])
    assert cells[6] == "-" or re.fullmatch(r"\d+\.\d (KiB|MiB|GiB)", cells[6])
    assert not re.search(r">0\.\d{3,}<|>\d{7,}<", summary)  # no raw seconds or bytes
    saved = json.loads((tmp_path / "answers.json").read_text())["summary"][0]
    assert isinstance(saved["mean_latency_s"], float)  # the JSON keeps seconds
