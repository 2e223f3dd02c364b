"""``vlmlab eval --ray`` (issue 20): the samples spread over Ray actors that each hold the model,
on a local cluster of two nodes that the tests start. Each worker reads its own share of the
dataset (the driver only writes the results); the results are exactly those of a one-process
run, also on resume and when a worker is killed mid-run (its ranges are retried, nothing is lost
or written twice), and a dataset the workers cannot read themselves still goes through them,
sent from the driver."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (vlmlab[ray])")

from fixtures_eval import write_chartqa  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from vlmlab.engines.ray_pool import RayEnginePool  # noqa: E402
from vlmlab.eval.datasets import get_dataset, load_samples  # noqa: E402
from vlmlab.eval.runner import EvalConfig, run_dataset, run_eval  # noqa: E402

LIMIT = 16
FALLBACK = "cannot read"  # the driver's warning when it sends the samples itself


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each: one worker lands on each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    """Two nano workers shared by the tests below that drive ``run_dataset`` themselves."""
    pool = RayEnginePool(EvalConfig(("nano",), ("synth",), Path("."), device="cpu").engine_spec("nano"), 2)
    yield pool
    pool.close()


def records(path: Path) -> list[dict]:
    found = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [r["key"] for r in found]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    return found


def answers(folder: Path, dataset: str = "synth") -> dict[str, tuple]:
    """Everything a record holds but its timings, by key."""
    return {r["key"]: {k: v for k, v in r.items() if k != "timings"} for r in records(folder / "nano" / f"{dataset}.jsonl")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    run_eval(EvalConfig(("nano",), ("synth",), out, device="cpu", limit=LIMIT, progress=False))
    return out


def run_on(engine, out: Path, spec=None, limit: int = LIMIT, on_result=None, **settings):
    spec = spec or get_dataset("synth")
    config = EvalConfig(("nano",), (spec.key,), out, device="cpu", limit=limit, progress=False, **settings)
    samples, info = load_samples(spec, config.data_dir, limit)
    return asyncio.run(run_dataset(engine, "nano", spec, samples, dict(info), config, on_result))


def test_two_workers_on_two_nodes_give_the_one_process_results(cluster, one_process: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vlmlab"):
        summaries = run_eval(EvalConfig(("nano",), ("synth",), tmp_path, device="cpu", limit=LIMIT, progress=False, ray=True, workers=2))
    assert FALLBACK not in caplog.text  # the workers read the samples themselves
    assert answers(tmp_path) == answers(one_process)
    alone = json.loads((one_process / "nano" / "synth.summary.json").read_text())
    strip = ("run", "settings", "cluster", "latency_seconds_sum")  # all but how and how fast it ran
    assert {k: v for k, v in summaries[0].items() if k not in strip} == {k: v for k, v in alone.items() if k not in strip}
    assert summaries[0]["n"] == LIMIT
    assert summaries[0]["cluster"]["workers"] == 2 and summaries[0]["cluster"]["worker_nodes"] == 2
    assert summaries[0]["cluster"]["nodes"] == 2 and summaries[0]["settings"]["ray"] is True
    assert summaries[0]["cluster"]["samples_read_by"] == "workers"


def test_a_resumed_run_answers_only_the_missing_samples(pool, one_process: Path, tmp_path: Path) -> None:
    first = run_on(pool, tmp_path, limit=LIMIT // 2 + 1)
    assert first.answered == LIMIT // 2 + 1 and first.done_before == 0
    again = run_on(pool, tmp_path, batch_size=3)  # other ranges than the first run's
    assert again.done_before == LIMIT // 2 + 1 and again.answered == LIMIT - again.done_before
    assert answers(tmp_path) == answers(one_process)
    assert run_on(pool, tmp_path).answered == 0


def test_a_dataset_read_from_disk_by_the_workers(pool, tmp_path: Path, caplog) -> None:
    """ChartQA's human half of a ``save_to_disk`` copy (the other half's rows are skipped)."""
    data = write_chartqa(tmp_path / "chartqa")
    spec = get_dataset("chartqa_test_human")
    alone = tmp_path / "alone"
    run_eval(EvalConfig(("nano",), (spec.key,), alone, device="cpu", data_dir=data, max_tokens=4, progress=False))
    with caplog.at_level(logging.WARNING, logger="vlmlab"):
        run = run_on(pool, tmp_path / "ray", spec, limit=None, data_dir=data, max_tokens=4, batch_size=2)
    assert FALLBACK not in caplog.text and run.samples_read_by == "workers"
    assert run.answered == 3 and run.errors == 0
    assert answers(tmp_path / "ray", spec.key) == answers(alone, spec.key)


def _here_only(sample):  # a prompt the workers cannot import (tests/ is not on their path)
    return [*range(len(sample.images)), sample.question]


def test_a_dataset_the_workers_cannot_read_is_sent_to_them(pool, one_process: Path, tmp_path: Path, caplog) -> None:
    spec = dataclasses.replace(get_dataset("synth"), prompts={"default": _here_only})
    with caplog.at_level(logging.WARNING, logger="vlmlab"):
        run = run_on(pool, tmp_path, spec)
    assert FALLBACK in caplog.text and run.samples_read_by == "driver"
    assert run.answered == LIMIT and run.errors == 0
    assert answers(tmp_path) == answers(one_process)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_worker_killed_mid_run_loses_nothing(pool, one_process: Path, tmp_path: Path, how: str) -> None:
    pids = asyncio.run(pool.call_each(lambda engine, scratch: os.getpid()))
    seen: list[dict] = []
    killed = threading.Event()

    def on_result(record: dict) -> None:
        seen.append(record)
        if not killed.is_set() and pool.in_flight[0] > 0:  # mid-run, with ranges on worker 0
            if how == "SIGKILL":
                os.kill(pids[0], signal.SIGKILL)
            else:
                ray.kill(pool.workers[0], no_restart=False)
            killed.set()

    start = time.monotonic()
    run = run_on(pool, tmp_path, on_result=on_result, batch_size=2)  # 8 ranges, 4 in flight
    assert time.monotonic() - start < 120
    assert killed.is_set()
    assert run.answered == LIMIT and run.errors == 0
    assert answers(tmp_path) == answers(one_process)
    assert asyncio.run(pool.call_each(lambda engine, scratch: os.getpid()))[0] != pids[0]  # restarted


def test_a_one_cpu_worker_loads_the_hf_engine_without_prefill_overlap() -> None:
    """It has no second core to overlap prefills on; a user's own setting wins."""
    from vlmlab.engines.ray_pool import worker_spec

    spec = EvalConfig(("nano",), ("synth",), Path("."), device="cpu").engine_spec("nano")
    assert worker_spec(spec, 1).extra["overlap_prefill"] is False
    assert "overlap_prefill" not in worker_spec(spec, 2).extra
    mine = dataclasses.replace(spec, extra={"overlap_prefill": True})
    assert worker_spec(mine, 1).extra["overlap_prefill"] is True
    remote = dataclasses.replace(spec, engine="remote", extra={"base_url": "http://x"})
    assert worker_spec(remote, 1) == remote
