"""``vlmlab env``: the environment report a bug report needs (see :mod:`vlmlab.envreport`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from vlmlab.cli import app, console


@app.command("env")
def env_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON, for tooling.")
    ] = False,
) -> None:
    """What to paste into a bug report: platform, packages, devices, browser, Hub access."""
    from vlmlab.envreport import collect_env, report_rows

    report = collect_env()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title="vlmlab env")
    table.add_column("section", style="bold")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    previous = None
    for section, item, value in report_rows(report):
        if previous is not None and section != previous:
            table.add_section()
        # Text, not markup: values such as "[bold]" in an env variable print as they are.
        table.add_row(section if section != previous else "", item, Text(value))
        previous = section
    console.print(table)
