"""`vlmlab score` never loses what a run recorded, and says which metric mode it used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlmlab.eval.runner import EvalConfig, rescore, run_eval


def test_score_in_another_mode_keeps_the_run_summary(tmp_path: Path) -> None:
    run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, limit=6, device="cpu", progress=False))
    top = tmp_path / "summary.json"
    before = top.read_text()
    assert "run" in json.loads(before)[0] and "settings" in json.loads(before)[0]

    done = subprocess.run(
        [sys.executable, "-m", "vlmlab", "score", str(tmp_path), "--metric-mode", "lmms-eval"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "metric mode: lmms-eval" in done.stdout
    assert top.read_text() == before  # the run's own overview is untouched
    beside = json.loads((tmp_path / "summary.lmms-eval.json").read_text())
    assert beside[0]["metric_mode"] == "lmms-eval"
    assert beside[0]["run"] == json.loads(before)[0]["run"]
    assert beside[0]["settings"] == json.loads(before)[0]["settings"]
    assert (tmp_path / "summary.lmms-eval.md").exists()


def test_rescoring_in_the_default_mode_keeps_run_and_settings(tmp_path: Path) -> None:
    run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, limit=4, device="cpu", progress=False))
    recorded = json.loads((tmp_path / "nano" / "synth.summary.json").read_text())
    (again,) = rescore(tmp_path)
    assert again["run"] == recorded["run"] and again["settings"] == recorded["settings"]
    assert json.loads((tmp_path / "summary.json").read_text())[0]["settings"] == recorded["settings"]
