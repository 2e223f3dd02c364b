"""Results out: machine metadata, the result JSON, a rich table and matplotlib plots."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.table import Table

from vlmlab.bench.config import BenchConfig
from vlmlab.protocol.errors import ConfigError
from vlmlab.units import format_bytes, format_duration

logger = logging.getLogger(__name__)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    """Where the client ran: OS, CPU, memory, Python and package versions.

    The server's side (model, engine, limits) is in the result's ``target.card``.
    """
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "vlmlab": _version("vlmlab"),
        "packages": {name: _version(name) for name in ("httpx", "numpy", "pillow")},
    }


def sweep_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per level: the figures a throughput/latency-vs-concurrency plot needs."""
    rows = []
    for run in runs:
        s = run["summary"]
        rows.append({
            "max_concurrency": run["max_concurrency"],
            "peak_concurrency": s["peak_concurrency"],
            "requests_per_s": s["throughput"]["requests_per_s"],
            "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
            "total_tokens_per_s": s["throughput"]["total_tokens_per_s"],
            "goodput_requests_per_s": s["throughput"]["goodput_requests_per_s"],
            "ttft_median_ms": s["ttft"]["median_ms"],
            "ttft_p99_ms": s["ttft"]["p99_ms"],
            "tpot_median_ms": s["tpot"]["median_ms"],
            "e2el_median_ms": s["e2el"]["median_ms"],
            "failed": s["failed"],
        })  # fmt: skip
    return rows


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ms(value_ms: float | None) -> str:
    return format_duration(None if value_ms is None else value_ms / 1000.0)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _peak(throughput: dict[str, Any]) -> str:
    peak, window = throughput["peak_output_tokens_per_s"], throughput.get("peak_output_window_s")
    if peak is None:
        return "-"
    return f"{peak:,.2f}" + (" *" if _short(window) else "")


def _short(window_s: float | None) -> bool:
    """A run shorter than the one-second window: its peak is taken over the whole run."""
    return window_s is not None and window_s < 1.0


def summary_table(result: dict[str, Any]) -> Table:
    """The "Serving Benchmark Result" block of `vllm bench serve`, one column per level.

    Figures are for people: durations as ``25.3 ms`` / ``1.52 s``, sizes as ``25.8 KiB``, shares
    as percentages (the result JSON keeps seconds, milliseconds and bytes in ``*_s`` / ``*_ms`` /
    ``*_bytes`` keys).
    """
    runs = result["runs"]
    target = result["target"]
    table = Table(title=f"vlmlab bench: {target['model']} at {target['root_url']}")
    table.add_column("metric")
    for run in runs:
        table.add_column(run["label"], justify="right")

    def row(label: str, get: Any, show: Any = _number) -> None:
        table.add_row(label, *(show(get(run["summary"])) for run in runs))

    row("successful requests", lambda s: s["completed"])
    row("failed requests", lambda s: s["failed"])
    row("benchmark duration", lambda s: s["duration_s"], format_duration)
    row("peak concurrent requests", lambda s: s["peak_concurrency"])
    row("total input tokens", lambda s: s["total_input_tokens"])
    row("  of which image tokens", lambda s: s["total_image_tokens"])
    row("total generated tokens", lambda s: s["total_output_tokens"])
    row("request throughput (req/s)", lambda s: s["throughput"]["requests_per_s"])
    if result["settings"].get("slo"):
        row("request goodput (req/s)", lambda s: s["throughput"]["goodput_requests_per_s"])
    row("output token throughput (tok/s)", lambda s: s["throughput"]["output_tokens_per_s"])
    row("peak output tok/s (max over 1-s windows)", lambda s: s["throughput"], _peak)
    row("total token throughput (tok/s)", lambda s: s["throughput"]["total_tokens_per_s"])
    metrics = (("ttft", "TTFT"), ("tpot", "TPOT (excl. 1st token)"), ("itl", "ITL"), ("e2el", "E2EL"))
    for metric, title in metrics:
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat} {title}", lambda s, m=metric, k=stat: s[m][f"{k}_ms"], _ms)
    row("mean request size", lambda s: s["payload"]["mean_request_bytes"], format_bytes)
    if any(run["summary"]["server_timings"] for run in runs):
        row("server preprocess share of E2EL", lambda s: (s["server_timings"] or {}).get("preprocess_share"), _percent)
        row("mean server preprocess", lambda s: ((s["server_timings"] or {}).get("preprocess_ms") or {}).get("mean_ms"), _ms)
    row("expected image cache-hit ratio", lambda s: s["cache"]["expected_image_hit_ratio"], _percent)
    row("server mm-cache hits / queries", lambda s: _hits(s["cache"]))
    if any(_short(run["summary"]["throughput"].get("peak_output_window_s")) for run in runs):
        table.caption = "* run shorter than 1 s: peak over the whole run (= mean)"
    return table


def _hits(cache: dict[str, Any]) -> str | None:
    hits, queries = cache["server_mm_cache_hits"], cache["server_mm_cache_queries"]
    return None if hits is None or queries is None else f"{hits:.0f} / {queries:.0f}"


def write_outputs(result: dict[str, Any], config: BenchConfig) -> list[Path]:
    """Write ``config.output`` (JSON) and the plots; returns the plot paths.

    Plots go to ``config.plots``, else next to the JSON; with neither, none are drawn.

    Raises:
        ConfigError: plots were asked for but matplotlib is not installed.
    """
    plots: list[Path] = []
    out = Path(config.output).expanduser() if config.output else None
    plot_dir = Path(config.plots).expanduser() if config.plots else (out.parent if out else None)
    if config.make_plots and plot_dir is not None:
        stem = out.stem if out else "bench"
        plots = write_plots(result, plot_dir, stem)
        result["plots"] = [str(p) for p in plots]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, allow_nan=False, default=str))
    return plots


def write_plots(result: dict[str, Any], directory: Path, stem: str = "bench") -> list[Path]:
    """Latency CDFs (TTFT, E2EL per level) and throughput / TTFT against concurrency.

    Output: the PNG paths. Raises: ConfigError when matplotlib is missing.
    """
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for figure, name in ((latency_cdf_figure(result), "latency-cdf"), (throughput_figure(result), "vs-concurrency")):
        paths.append(directory / f"{stem}-{name}.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from exc
    return plt


def _legend_below(ax: Any) -> None:
    """A legend under the axes (beneath the x label), where it can never hide a curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(4, len(handles)), frameon=False)


def latency_cdf_figure(result: dict[str, Any]) -> Any:
    """TTFT and E2EL CDFs side by side, one step curve per level (a matplotlib Figure).

    Raises: ConfigError when matplotlib is missing.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for ax, key, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "e2el_s", "E2EL")):
        for run in result["runs"]:
            values = sorted(r[key] * 1000 for r in run["requests"] if r["success"] and r[key] is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=run["label"])
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        _legend_below(ax)
    return fig


def throughput_figure(result: dict[str, Any]) -> Any:
    """Output tok/s, requests/s and TTFT against concurrency: one panel per metric, each with
    its own unit on its y axis (a matplotlib Figure).

    Requests/s and tokens/s differ by orders of magnitude, so they get separate panels rather
    than one panel with a second y axis (whose two legends and crossing lines read badly).

    Raises: ConfigError when matplotlib is missing.
    """
    plt = _pyplot()
    rows = result["sweep"]
    x = [r["max_concurrency"] or r["peak_concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), layout="constrained")
    panels = (
        (axes[0], "output token throughput", "output tokens per second (tok/s)", [("output_tokens_per_s", "o-", None)]),
        (axes[1], "request throughput", "requests per second (req/s)", [("requests_per_s", "s-", None)]),
        (axes[2], "time to first token", "TTFT (ms)", [("ttft_median_ms", "o-", "median"), ("ttft_p99_ms", "s--", "p99")]),
    )
    for ax, title, ylabel, series in panels:
        for key, style, label in series:
            ax.plot(x, [r[key] if r[key] is not None else float("nan") for r in rows], style, label=label)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("max concurrency (peak when uncapped)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(set(x)) > 1 and min(x) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(x)), [str(v) for v in sorted(set(x))])
        ax.minorticks_off()
        _legend_below(ax)
    return fig
