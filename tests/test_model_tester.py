from __future__ import annotations

import json
import subprocess
import sys

from vlmlab.config import EngineSpec
from vlmlab.nano.tasks import TASKS
from vlmlab.testing import test_model as run_model_tester


def test_nano_passes_every_check() -> None:
    report = run_model_tester(EngineSpec(model="nano", device="cpu"))
    assert report.passed, report.to_dict()
    assert [c.name for c in report.checks] == ["load", "answers", "streaming", "usage", "multi_image", "bad_image"]
    assert [a["task"] for a in report.answers] == list(TASKS)
    assert all(a["answer"] for a in report.answers)
    assert report.family == "nano" and report.load_s > 0


def test_a_model_that_cannot_load_fails_with_the_reason(tmp_path) -> None:
    report = run_model_tester(str(tmp_path / "nothing-here"))
    assert not report.passed
    assert report.checks[0].name == "load" and "does not exist" in report.checks[0].detail


def test_cli_exit_code_and_json(tmp_path) -> None:
    ok = subprocess.run([sys.executable, "-m", "vlmlab", "test-model", "nano", "--json"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["passed"] is True
    bad = subprocess.run([sys.executable, "-m", "vlmlab", "test-model", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "does not exist" in bad.stdout
