"""``vlmlab compare --ray`` and ``sweep --ray`` (issue 20): each model (or sweep level) on a Ray
worker of its own, all at once; the answers equal a one-process run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (vlmlab[ray])")

from vlmlab.compare import RayJobs, load_questions, run_compare, run_sweep  # noqa: E402


def same(answers) -> list[tuple]:
    return [(a.model, a.question, a.answer, a.correct, a.prompt_tokens, a.image_tokens, a.completion_tokens, a.error, dict(a.extra)) for a in answers]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def test_compare_and_sweep_on_ray_workers_equal_one_process(local_ray) -> None:
    questions = load_questions(dataset="synth", limit=6)
    alone = run_compare(["nano", "nano"], questions, max_tokens=16, device="cpu")
    on_ray = run_compare(["nano", "nano"], questions, max_tokens=16, ray=RayJobs(), device="cpu")
    assert same(on_ray) == same(alone) and {a.model for a in on_ray} == {"nano", "nano#2"}
    alone = run_sweep("nano", questions[:3], resolutions=[64, 128], max_tokens=8, device="cpu")
    on_ray = run_sweep("nano", questions[:3], resolutions=[64, 128], max_tokens=8, ray=RayJobs(), device="cpu")
    assert same(on_ray) == same(alone) and {a.extra["resolution"] for a in on_ray} == {64, 128}


def test_compare_cli_with_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "vlmlab", "compare", "--models", "nano,nano", "--dataset", "synth", "--limit", "3",
         "--max-tokens", "8", "--device", "cpu", "--ray", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads((out / "answers.json").read_text())
    rows = answers["answers"] if isinstance(answers, dict) else answers
    assert {r["model"] for r in rows} == {"nano", "nano#2"} and len(rows) == 6
    refused = subprocess.run([sys.executable, "-m", "vlmlab", "compare", "--models", "nano", "--dataset", "synth", "--worker-gpus", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--worker-gpus need --ray" in refused.stderr and "Traceback" not in refused.stderr
