"""`vlmlab sweep` measures what it says: every question keeps its own images at every image
count, and crossing both axes leaves no answer without a value on either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlmlab.compare import load_questions, run_compare, run_sweep, summarize, with_image_count


def test_each_question_keeps_its_own_images_first() -> None:
    questions = load_questions(dataset="synth", limit=10)
    assert {len(q.images) for q in questions} == {1, 2}  # single- and two-image tasks
    for count in (1, 2, 3):
        built = with_image_count(questions, count)
        kept = [q for q in questions if len(q.images) <= count]
        assert [b.question for b in built] == [q.question for q in kept]
        for question, asked in zip(kept, built, strict=True):
            assert len(asked.images) == count
            assert asked.images[: len(question.images)] == question.images


def test_one_image_per_prompt_answers_as_compare_does() -> None:
    """At its own image count a question is asked exactly as `compare` asks it (greedy), so the
    sweep's accuracy there is compare's on the same questions."""
    questions = [q for q in load_questions(dataset="synth", limit=10) if len(q.images) == 1]
    swept = run_sweep("nano", questions, images_per_prompt=[1], max_tokens=8, device="cpu")
    compared = run_compare(["nano"], questions, max_tokens=8, device="cpu")
    assert [a.answer for a in swept] == [a.answer for a in compared]
    assert summarize(swept, "images_per_prompt")[0]["accuracy"] == summarize(compared)[0]["accuracy"]


def test_both_axes_give_every_pair_and_no_empty_rows(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "-m", "vlmlab", "sweep", "--model", "nano", "--dataset", "synth", "--limit", "4",
         "--resolutions", "64,128", "--images-per-prompt", "1,2", "--max-tokens", "4", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "answers.json").read_text())["summary"]
    assert sorted(row["setting"] for row in summary) == [
        "128 px, 1 image(s)", "128 px, 2 image(s)", "64 px, 1 image(s)", "64 px, 2 image(s)",
    ]  # fmt: skip
    page = (out / "report.html").read_text()
    assert "None" not in page
    assert page.index("By resolution") < page.index("By images per prompt") < page.index("<h2>Summary")
