"""`--help` as a newcomer reads it: flags show no value type, `eval --dataset` lists the datasets,
and every option of `sweep` and `families` says what it does."""

from __future__ import annotations

import re
import subprocess
import sys

from vlmlab.eval.datasets import DATASETS


def help_text(*command: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vlmlab", *command, "--help"], capture_output=True, text=True,
        timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def option_rows(text: str) -> dict[str, str]:
    """option -> the rest of its first help row."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"[│|]\s+(?:\*\s+)?(--[\w-]+)(.*)", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_flags_show_no_value_type() -> None:
    rows = option_rows(help_text("chat"))
    for flag in ("--load-in-4bit", "--load-in-8bit", "--trust-remote-code", "--stream", "--help"):
        assert "<bool>" not in rows[flag], (flag, rows[flag])
    assert "<int>" in rows["--max-tokens"]  # options with values keep their type


def test_eval_dataset_help_lists_the_datasets() -> None:
    text = " ".join(help_text("eval").split())
    for name in DATASETS.names():
        assert name in text, name


def test_sweep_and_families_options_have_help() -> None:
    for command, options in (("sweep", ("--model", "--image", "--question", "--questions-file", "--limit")), ("families", ("--json",))):
        rows = option_rows(help_text(command))
        for option in options:
            words = re.sub(r"<[^>]*>|[-│|]", " ", rows[option]).split()
            assert len(words) >= 3, (command, option, rows[option])
