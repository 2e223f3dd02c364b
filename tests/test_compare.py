from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from browser import inline_images_decode, open_in_chromium

from vlmlab.compare import (
    Question,
    load_questions,
    run_compare,
    run_sweep,
    summarize,
    write_outputs,
)
from vlmlab.config import model_target
from vlmlab.nano import checkpoint_path
from vlmlab.protocol.errors import ConfigError


def test_model_target() -> None:
    label, spec = model_target("http://gpu1:8000/v1#mistralai/Pixtral-12B-2409")
    assert spec.engine == "remote" and spec.model == "mistralai/Pixtral-12B-2409" and spec.extra["base_url"] == "http://gpu1:8000/v1"
    assert model_target("vllm:microsoft/Phi-3.5-vision-instruct")[1].engine == "vllm"
    assert model_target("nano", device="cpu")[1] .device == "cpu"
    with pytest.raises(ConfigError, match="at least one model"):
        run_compare([], [Question((), "x")])


def test_compare_two_models_and_open_the_report(tmp_path: Path) -> None:
    questions = load_questions(dataset="synth", limit=5)
    answers = run_compare(["nano", str(checkpoint_path())], questions, max_tokens=8, device="cpu")
    assert len(answers) == 10 and {a.model for a in answers} == {"nano", str(checkpoint_path())}
    # the same weights, the same greedy prompts: the same answers and counts
    first, second = answers[:5], answers[5:]
    assert [a.answer for a in first] == [a.answer for a in second]
    assert [a.image_tokens for a in first] == [a.image_tokens for a in second]
    summary = summarize(answers)
    assert [row["questions"] for row in summary] == [5, 5] and summary[0]["accuracy"] == summary[1]["accuracy"]
    path = write_outputs(answers, questions, tmp_path, "compare test")
    dom, console = open_in_chromium(path)
    assert console == []
    assert "compare test" in dom and dom.count("<tr>") >= 1 + 5
    assert inline_images_decode(path.read_text()) >= 5
    saved = json.loads((tmp_path / "answers.json").read_text())
    assert len(saved["answers"]) == 10 and saved["summary"][0]["model"] == "nano"


def test_sweep_by_resolution_and_image_count(tmp_path: Path) -> None:
    questions = load_questions(dataset="synth", limit=3)
    answers = run_sweep("nano", questions, resolutions=[64, 192], images_per_prompt=[1, 2], max_tokens=6, device="cpu")
    by_res = summarize([a for a in answers if "resolution" in a.extra], "resolution")
    assert [r["resolution"] for r in by_res] == [64, 192]
    assert by_res[0]["mean_image_tokens"] < by_res[1]["mean_image_tokens"]  # more pixels, more tokens
    by_count = summarize([a for a in answers if "images_per_prompt" in a.extra], "images_per_prompt")
    assert by_count[1]["mean_image_tokens"] > by_count[0]["mean_image_tokens"]
    path = write_outputs([a for a in answers if "resolution" in a.extra], questions, tmp_path, "sweep test", by="resolution")
    dom, console = open_in_chromium(path)
    assert console == [] and "sweep test" in dom
    assert inline_images_decode(path.read_text()) >= 4  # 3 thumbnails + the plot


def test_cli_compare_with_image_and_question(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parents[1] / "src" / "vlmlab" / "nano" / "samples" / "red_square.png"
    out = subprocess.run(
        [sys.executable, "-m", "vlmlab", "compare", "--models", "nano", "--image", str(sample), "--question", "What colour is the shape?", "--output-dir", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report.html").exists()
    answers = json.loads((tmp_path / "answers.json").read_text())["answers"]
    assert answers[0]["question"] == "What colour is the shape?" and answers[0]["answer"]
