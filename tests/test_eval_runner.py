"""vlmlab eval end to end on nano + synth: resume after SIGKILL, re-scoring, summaries."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmlab.eval.datasets import get_dataset
from vlmlab.eval.runner import EvalConfig, ResultsFile, build_chat, rescore, run_eval
from vlmlab.eval.scoring import read_records
from vlmlab.protocol.errors import ConfigError, NotFoundError

N = 48
DETERMINISTIC = ("key", "sample_id", "prompt", "answers", "prediction", "finish_reason", "usage", "fields")


def eval_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "vlmlab", "eval", "--model", "nano", "--dataset", "synth", "--limit", str(N),
            "--output-dir", str(out), "--batch-size", "4", "--device", "cpu", "--no-progress"]  # fmt: skip


def stable(path: Path) -> list[dict]:
    return sorted(({k: r[k] for k in DETERMINISTIC} for r in read_records(path)), key=lambda r: r["key"])


def stable_summary(path: Path) -> dict:
    summary = json.loads(path.read_text())
    return {k: summary[k] for k in ("dataset", "model", "metric", "metric_mode", "score", "n", "scored", "errors", "unparsed", "by_category", "tokens")}


def test_sigkill_at_random_points_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    subprocess.run(eval_cmd(clean), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    results = killed / "nano" / "synth.jsonl"
    rng = random.Random(11)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(eval_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = len(read_records(results)) + rng.randint(3, 12) if results.exists() else rng.randint(1, 10)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if results.exists() and results.stat().st_size and len(read_records(results)) >= target:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    with results.open("ab") as f:  # a line torn mid-write by a crash must not survive
        f.write(b'{"key": "torn", "dataset": "syn')
    subprocess.run(eval_cmd(killed), check=True, capture_output=True, timeout=600)
    lines = results.read_text().splitlines()
    assert len(lines) == N and len({json.loads(line)["key"] for line in lines}) == N  # nothing lost, nothing twice
    assert stable(results) == stable(clean / "nano" / "synth.jsonl")
    assert stable_summary(killed / "nano" / "synth.summary.json") == stable_summary(clean / "nano" / "synth.summary.json")


def test_run_score_and_summary_files(tmp_path: Path) -> None:
    config = EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, limit=20, device="cpu", progress=False)
    (summary,) = run_eval(config)
    assert summary["n"] == 20 and summary["errors"] == 0 and 0.0 <= summary["score"] <= 1.0
    assert summary["metric"] == "exact_match" and summary["metric_mode"] == get_dataset("synth").default_mode
    assert set(summary["by_category"]) <= set(__import__("vlmlab.nano.tasks", fromlist=["TASKS"]).TASKS)
    assert summary["tokens"]["image_tokens"] > 0 and summary["versions"]["transformers"]
    # two timings, each named for what it is: samples overlap, so their latencies add up to more
    # than the run's wall time, and the rate is answered / wall time
    run = summary["run"]
    assert run["wall_seconds"] > 0 and run["samples_per_second"] == pytest.approx(20 / run["wall_seconds"], rel=0.01)
    assert summary["latency_seconds_sum"] > 0 and "generation_seconds" not in summary
    record = read_records(tmp_path / "nano" / "synth.jsonl")[0]
    assert "<image>" in record["prompt"] and record["generation"]["temperature"] == 0.0
    again = run_eval(config)[0]  # everything is done: nothing answered twice
    assert again["run"]["answered_now"] == 0 and again["run"]["resumed_from"] == 20 and again["score"] == summary["score"]
    rescored = rescore(tmp_path, "lmms-eval")
    assert rescored[0]["metric_mode"] == "lmms-eval" and rescored[0]["n"] == 20
    assert (tmp_path / "nano" / "synth.lmms-eval.summary.json").exists()
    assert "| nano |" in (tmp_path / "summary.md").read_text()


def test_bad_settings_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="unknown dataset 'chartqa'"):
        run_eval(EvalConfig(models=("nano",), datasets=("chartqa",), output_dir=tmp_path))
    with pytest.raises(ConfigError, match="metric mode 'anls-pypi' does not apply"):
        run_eval(EvalConfig(models=("nano",), datasets=("synth",), output_dir=tmp_path, metric_mode="anls-pypi"))
    assert not list(tmp_path.iterdir())


def test_prompt_rendering_is_stored_and_keys_depend_on_it() -> None:
    spec = get_dataset("synth")
    from vlmlab.eval.datasets import load_samples

    samples, _ = load_samples(spec, limit=1)
    sample = next(iter(samples))
    chat, rendered, digests = build_chat(spec, sample, "default")
    assert rendered.count("<image>") == len(sample.images) == len(digests) == len(chat.images)
    assert sample.question in rendered


def test_results_file_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "x": 1}\n{"key": "b", "x"')
    results = ResultsFile(path)
    assert list(results.records) == ["a"]
    results.append({"key": "c"})
    results.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_report_with_two_models_opens_in_chromium(tmp_path: Path) -> None:
    from browser import inline_images_decode, open_in_chromium
    from vlmlab.eval.report import bootstrap_ci, write_report
    from vlmlab.nano import checkpoint_path

    run_eval(EvalConfig(models=("nano", str(checkpoint_path())), datasets=("synth",), output_dir=tmp_path, limit=16, device="cpu", progress=False))
    report, page = write_report(tmp_path, html=True)
    rows = report["table"]
    assert len(rows) == 2 and rows[0]["score"] == rows[1]["score"]  # same weights, same answers
    low, high = rows[0]["ci95"]
    assert low <= rows[0]["score"] <= high
    (pair,) = report["paired"]
    assert pair["items"] == 16 and pair["mean_diff"] == 0 and pair["ties"] == 16
    dom, console = open_in_chromium(page)
    assert console == [] and "Paired comparisons" in dom
    assert inline_images_decode(page.read_text()) == 1
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert 0.35 < lo < 0.5 < hi < 0.65


def test_every_dataset_runs_end_to_end_on_its_fixture(tmp_path: Path) -> None:
    """nano answers every benchmark's fixture through the real loading path; summaries score it."""
    from fixtures_eval import write_all

    from vlmlab.eval.datasets import DATASETS

    fixtures = write_all(tmp_path / "data")
    keys = [k for k in DATASETS.names() if k != "synth"]
    summaries = []
    for key in keys:
        config = EvalConfig(models=("nano",), datasets=(key,), output_dir=tmp_path / "out", data_dir=fixtures.paths[key], max_tokens=4, device="cpu", progress=False)
        summaries += run_eval(config)
    assert [s["dataset"] for s in summaries] == keys
    for summary in summaries:
        assert summary["n"] >= 1 and summary["errors"] == 0, summary
        assert summary["score"] is None or 0.0 <= summary["score"] <= 1.0
    by_key = {s["dataset"]: s for s in summaries}
    assert set(by_key["hallusionbench"]["aggregate"]) == {"aAcc", "fAcc", "qAcc"}
    assert "circular_accuracy" in by_key["mmbench_en_dev"]["aggregate"]


def test_judge_is_asked_only_about_unparsed_rows_and_cached(tmp_path: Path) -> None:
    from fixtures_eval import write_all
    from serverutil import running_server
    from vlmlab.config import EngineSpec, ServerSettings
    from vlmlab.eval.judge import Judge

    fixtures = write_all(tmp_path / "data")
    out = tmp_path / "out"
    run_eval(EvalConfig(models=("nano",), datasets=("mmbench_en_dev",), output_dir=out, data_dir=fixtures.paths["mmbench_en_dev"], max_tokens=4, device="cpu", progress=False))
    plain = rescore(out)[0]
    assert plain["judged"] == 0 and plain["judge"] is None and plain["unparsed"] > 0
    with running_server(ServerSettings(engines=(EngineSpec(model="nano", device="cpu"),), default_max_tokens=4)) as judge_server:
        judge = Judge(judge_server.base_url, "nano", out / "judge_cache.jsonl")
        judged = rescore(out, judge=judge)[0]
        assert judged["judged"] == plain["unparsed"] == judge.calls
        again = Judge(judge_server.base_url, "nano", out / "judge_cache.jsonl")
        rescore(out, judge=again)
        assert again.calls == 0  # every judgement came from the cache
    assert judged["judge"] == {"url": judge_server.base_url, "model": "nano"}
