"""What a running benchmark tells its caller, and a rich display of it for the CLI.

:func:`vlmlab.bench.run_bench` calls ``on_progress`` with a :class:`BenchProgress` when it starts
a local server, when each run (one concurrency level of a sweep) warms up and starts, after every
measured request, and when the run ends. The library only reports; :class:`ProgressDisplay` (or
any other callable) decides what a person sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from vlmlab.units import format_duration

if TYPE_CHECKING:
    from typing_extensions import Self

Phase = Literal["server", "warmup", "running", "request", "finished"]


@dataclass(frozen=True)
class BenchProgress:
    """One step of a benchmark.

    ``phase``: ``server`` (starting the local server; ``label`` is its command), ``warmup``,
    ``running`` (the measured load starts), ``request`` (one more measured request ended) or
    ``finished`` (the run is over; ``elapsed_s`` is its duration).
    ``run`` / ``runs``: which run of the sweep (0-based) out of how many; ``label`` names it
    (``concurrency=4``). ``total``: measured requests in the run, ``None`` for a ``--duration``
    closed loop (then ``duration_s`` is its time budget). ``done`` = ``ok`` + ``failed``.
    """

    phase: Phase
    run: int = 0
    runs: int = 1
    label: str = ""
    total: int | None = None
    done: int = 0
    ok: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    duration_s: float | None = None

    @property
    def title(self) -> str:
        """``run 2/3 concurrency=4`` (no run number when there is one run)."""
        return f"run {self.run + 1}/{self.runs} {self.label}" if self.runs > 1 else self.label

    def finished_line(self) -> str:
        """One plain line for logs: ``run 2/3 concurrency=4: 20/20 requests, 20 ok, 0 failed in 1.52 s``."""
        total = "" if self.total is None else f"/{self.total}"
        return f"{self.title}: {self.done}{total} requests, {self.ok} ok, {self.failed} failed in {format_duration(self.elapsed_s)}"


class ProgressDisplay:
    """Shows :class:`BenchProgress` events on ``console`` (the CLI passes its stderr console).

    On a terminal: one live bar per run (done / total, ok and error counts, elapsed time), left
    on screen when the run ends. Elsewhere (a pipe, a log file, CI), where an animated bar would
    print nothing useful: one line when a local server starts and one per finished run.
    Use as a context manager around :func:`~vlmlab.bench.run_bench` and pass it as ``on_progress``.
    """

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),  # last: its changing width moves no other column
            console=console, disable=not self.live,
        )  # fmt: skip
        self.tasks: dict[int, TaskID] = {}
        self.started = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.started:
            self.progress.stop()

    def __call__(self, event: BenchProgress) -> None:
        if event.phase == "server":
            self.console.print(
                f"[dim]starting a local server: {escape(event.label)}[/dim]", highlight=False
            )
            return
        if not self.live:
            if event.phase == "finished":
                self.console.print(escape(event.finished_line()), highlight=False)
            return
        description = escape(event.title)
        if event.total is None and event.duration_s is not None:
            description += f" [dim](for {format_duration(event.duration_s)})[/dim]"
        failed = f"[red]{event.failed} failed[/red]" if event.failed else "0 failed"
        status = "[dim]warming up[/dim]" if event.phase == "warmup" else f"{event.ok} ok · {failed}"
        task = self.tasks.get(event.run)
        if task is None:
            task = self.tasks[event.run] = self.progress.add_task(
                description, total=event.total, status=status
            )
        if not self.started:  # started with its first bar: an empty live display prints blank lines
            self.progress.start()
            self.started = True
        total = event.done if event.phase == "finished" and event.total is None else event.total
        self.progress.update(
            task, description=description, completed=event.done, total=total, status=status
        )
        if event.phase == "finished":
            self.progress.stop_task(task)
