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


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def summary_table(result: dict[str, Any]) -> Table:
    """The "Serving Benchmark Result" block of `vllm bench serve`, one column per level."""
    runs = result["runs"]
    target = result["target"]
    table = Table(title=f"vlmlab bench: {target['model']} at {target['root_url']}")
    table.add_column("metric")
    for run in runs:
        table.add_column(run["label"], justify="right")

    def row(label: str, get: Any, digits: int = 2) -> None:
        table.add_row(label, *(_fmt(get(run["summary"]), digits) for run in runs))

    row("successful requests", lambda s: s["completed"])
    row("failed requests", lambda s: s["failed"])
    row("benchmark duration (s)", lambda s: s["duration_s"])
    row("peak concurrent requests", lambda s: s["peak_concurrency"])
    row("total input tokens", lambda s: s["total_input_tokens"])
    row("  of which image tokens", lambda s: s["total_image_tokens"])
    row("total generated tokens", lambda s: s["total_output_tokens"])
    row("request throughput (req/s)", lambda s: s["throughput"]["requests_per_s"])
    if result["settings"].get("slo"):
        row("request goodput (req/s)", lambda s: s["throughput"]["goodput_requests_per_s"])
    row("output token throughput (tok/s)", lambda s: s["throughput"]["output_tokens_per_s"])
    row("peak output token throughput (tok/s)", lambda s: s["throughput"]["peak_output_tokens_per_s"])
    row("total token throughput (tok/s)", lambda s: s["throughput"]["total_tokens_per_s"])
    for metric, title in (("ttft", "TTFT"), ("tpot", "TPOT (excl. 1st token)"), ("itl", "ITL"), ("e2el", "E2EL")):
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat} {title} (ms)", lambda s, m=metric, k=stat: s[m][f"{k}_ms"])
    row("mean request size (KiB)", lambda s: None if s["payload"]["mean_request_bytes"] is None else s["payload"]["mean_request_bytes"] / 1024)
    if any(run["summary"]["server_timings"] for run in runs):
        row("server preprocess share of E2EL", lambda s: (s["server_timings"] or {}).get("preprocess_share"), 3)
        row("mean server preprocess (ms)", lambda s: ((s["server_timings"] or {}).get("preprocess_ms") or {}).get("mean_ms"))
    row("expected image cache-hit ratio", lambda s: s["cache"]["expected_image_hit_ratio"], 3)
    row("server mm-cache hits / queries", lambda s: _hits(s["cache"]))
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
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from exc
    directory.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "e2el_s", "E2EL")):
        for run in runs:
            values = sorted(r[key] * 1000 for r in run["requests"] if r["success"] and r[key] is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=run["label"])
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(directory / f"{stem}-latency-cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rows = result["sweep"]
    x = [r["max_concurrency"] or r["peak_concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(x, [r["output_tokens_per_s"] for r in rows], "o-", label="output tok/s")
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title("throughput vs concurrency")
    # Requests/s on its own axis: input (image) tokens dwarf output tokens on one scale.
    twin = axes[0].twinx()
    twin.plot(x, [r["requests_per_s"] for r in rows], "s--", color="tab:orange", label="requests/s")
    twin.set_ylabel("requests / s")
    twin.legend(fontsize=8, loc="lower right")
    axes[1].plot(x, [r["ttft_median_ms"] for r in rows], "o-", label="median")
    axes[1].plot(x, [r["ttft_p99_ms"] for r in rows], "s--", label="p99")
    axes[1].set_ylabel("TTFT (ms)")
    axes[1].set_title("TTFT vs concurrency")
    for ax in axes:
        ax.set_xlabel("max concurrency (peak when uncapped)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        if len(set(x)) > 1 and min(x) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(x)), [str(v) for v in sorted(set(x))])
        ax.minorticks_off()
    fig.tight_layout()
    paths.append(directory / f"{stem}-vs-concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
