"""nano answers its training questions and little else: `vlmlab chat` says so when a question is
outside them, and stays quiet for the ones it knows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vlmlab.chat import NANO_EXAMPLES, nano_hint
from vlmlab.nano.tasks import known_questions

SAMPLE = Path(__file__).resolve().parent.parent / "src" / "vlmlab" / "nano" / "samples" / "red_square.png"


def chat(question: str, *images: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "vlmlab", "chat", "--max-tokens", "8", question]
    for image in images:
        command += ["--image", str(image)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_chat_hints_at_nano_questions_outside_its_training() -> None:
    outside = chat("Describe this image.", SAMPLE)
    assert outside.returncode == 0, outside.stderr
    assert "note: nano only answers the questions it was trained on" in " ".join(outside.stderr.split())
    inside = chat("What colour is the shape?", SAMPLE)
    assert inside.returncode == 0 and "note: nano" not in inside.stderr
    assert inside.stdout.strip() == "red"


def test_the_examples_are_questions_nano_knows() -> None:
    assert len(known_questions()) > 100
    assert all(example.lower() in known_questions() for example in NANO_EXAMPLES)
    assert nano_hint("nano", "what colour is the shape? ", 1) is None
    assert "needs an image" in (nano_hint("nano", "What colour is the shape?", 0) or "")
    assert nano_hint("Qwen/Qwen2-VL-2B-Instruct", "Describe this image.", 1) is None
