"""Issue 17 item 2: the same model named twice stays two columns (``nano``, ``nano#2``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlmlab.compare import load_questions, run_compare, summarize


def test_run_compare_keeps_duplicate_models_apart() -> None:
    questions = load_questions(dataset="synth", limit=2)
    answers = run_compare(["nano", " nano", "nano"], questions, max_tokens=4, device="cpu")
    assert [a.model for a in answers] == ["nano"] * 2 + ["nano#2"] * 2 + ["nano#3"] * 2
    assert [(r["model"], r["questions"]) for r in summarize(answers)] == [("nano", 2), ("nano#2", 2), ("nano#3", 2)]


def test_cli_compare_same_model_twice_gives_two_rows_and_columns(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vlmlab", "compare", "--models", "nano,nano", "--dataset", "synth", "--limit", "3",
         "--max-tokens", "6", "--output-dir", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "nano#2" in out.stdout  # the printed table has a row for each entry
    saved = json.loads((tmp_path / "answers.json").read_text())
    assert [(r["model"], r["questions"]) for r in saved["summary"]] == [("nano", 3), ("nano#2", 3)]
    assert [a["model"] for a in saved["answers"]] == ["nano"] * 3 + ["nano#2"] * 3
    html = (tmp_path / "report.html").read_text()
    assert html.count("<th>nano</th>") == 1 and html.count("<th>nano#2</th>") == 1, "one answers column per entry"
