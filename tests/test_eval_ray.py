"""``vlmlab eval --ray`` (issue 20, first part): the samples spread over Ray actors that each hold
the model, on a local cluster of two nodes that the tests start; the results are exactly those of
a one-process run, also when a worker is killed mid-run (its requests are retried, nothing is
lost or written twice)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (vlmlab[ray])")

from ray.cluster_utils import Cluster  # noqa: E402

from vlmlab.eval.datasets import get_dataset, load_samples  # noqa: E402
from vlmlab.eval.runner import EvalConfig, run_dataset, run_eval  # noqa: E402

LIMIT = 16


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each: one worker lands on each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def answers(folder: Path) -> dict[str, tuple]:
    lines = (folder / "nano" / "synth.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    return {r["key"]: (r["prediction"], r["finish_reason"], r["usage"], r["error"]) for r in records}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    run_eval(EvalConfig(("nano",), ("synth",), out, device="cpu", limit=LIMIT, progress=False))
    return out


def test_two_workers_on_two_nodes_give_the_one_process_results(cluster, one_process: Path, tmp_path: Path) -> None:
    summaries = run_eval(EvalConfig(("nano",), ("synth",), tmp_path, device="cpu", limit=LIMIT, progress=False, ray=True, workers=2))
    assert answers(tmp_path) == answers(one_process)
    alone = json.loads((one_process / "nano" / "synth.summary.json").read_text())
    assert summaries[0]["score"] == alone["score"] and summaries[0]["n"] == alone["n"] == LIMIT
    assert summaries[0]["cluster"]["workers"] == 2 and summaries[0]["cluster"]["worker_nodes"] == 2
    assert summaries[0]["cluster"]["nodes"] == 2 and summaries[0]["settings"]["ray"] is True


def test_a_worker_killed_mid_run_loses_nothing(cluster, one_process: Path, tmp_path: Path) -> None:
    from vlmlab.engines.ray_pool import RayEnginePool

    config = EvalConfig(("nano",), ("synth",), tmp_path, device="cpu", limit=LIMIT, progress=False, concurrency=4)
    pool = RayEnginePool(config.engine_spec("nano"), 2)
    spec = get_dataset("synth")
    samples, info = load_samples(spec, None, LIMIT)
    seen: list[dict] = []
    killed = threading.Event()

    def on_result(record: dict) -> None:
        seen.append(record)
        if len(seen) == 3 and not killed.is_set():  # mid-run: a worker process dies
            ray.kill(pool.workers[0], no_restart=False)
            killed.set()

    try:
        start = time.monotonic()
        run = asyncio.run(run_dataset(pool, "nano", spec, samples, dict(info), config, on_result))
        assert time.monotonic() - start < 120
    finally:
        pool.close()
    assert killed.is_set()
    assert run.answered == LIMIT and run.errors == 0
    assert answers(tmp_path) == answers(one_process)
