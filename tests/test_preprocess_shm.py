"""Large preprocessing results come back from pool workers through shared memory.

A real :class:`PreprocessPool` (spawned worker processes) against in-process results, the files
it leaves (none), the pipe fallback, and the arena's clean-up, space check and stale-file sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_preprocess_fast import jpeg, photo

from vlmlab.preprocess import PreprocessPool, preprocess_bytes, shm
from vlmlab.preprocess.kernels import output_array

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")

SMALL = 1 << 20  # tensors from 1 MB on are shared here, so that small test images use the path


def our_files() -> list[str]:
    return sorted(p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{os.getpid()}-*"))


def test_pool_ships_large_tensors_through_shared_memory_and_leaves_no_file() -> None:
    jobs = [
        (jpeg(photo(1500, 600, 8)), "llava_onevision", {}),  # 10 tiles: ~18 MB
        (jpeg(photo(900, 700, 7)), "qwen2_vl", {"max_pixels": 1003520}),  # ~15 MB of patches
        (jpeg(photo(300, 200, 2)), "nano", {}),  # under 1 MB: through the pipe
    ]
    with PreprocessPool(max_workers=2, share_min_bytes=SMALL) as shared, PreprocessPool(1, share_min_bytes=None) as piped:
        assert shared.share_min_bytes == SMALL and piped.share_min_bytes is None
        results = [shared.submit(data, family, "exact", options).result(timeout=120) for data, family, options in jobs]
        through_pipe = piped.submit(jobs[0][0], "llava_onevision").result(timeout=120)
    assert our_files() == []  # every file was mapped and its name removed at once
    with PreprocessPool(1) as default:
        assert default.share_min_bytes == shm.MIN_BYTES
    for (data, family, options), result in zip(jobs, results, strict=True):
        local = preprocess_bytes(data, family, "exact", **options)
        assert list(result.tensors) == list(local.tensors)  # the worker's order
        assert result.grid == local.grid
        for name, value in local.tensors.items():
            np.testing.assert_array_equal(result.tensors[name], value, err_msg=f"{family} {name}")
    mapped = results[0].tensors["pixel_values"]
    assert isinstance(mapped.base, np.ndarray) or mapped.base is not None
    assert mapped.flags.writeable  # consumers may normalize in place
    mapped[0, 0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(through_pipe.tensors["pixel_values"], preprocess_bytes(jobs[0][0], "llava_onevision").tensors["pixel_values"])


def test_arena_writes_outputs_in_place_and_removes_what_it_does_not_ship() -> None:
    parent = os.getpid()
    with shm.Arena(f"{parent}-test", SMALL) as arena:
        big = output_array((512, 1024))  # 2 MB: in a shared-memory file
        small = output_array((4, 4))  # ordinary
        intermediate = output_array((600, 1024), zeros=True)
        assert len(our_files()) == 2
        assert not intermediate.any()  # fallocate's pages are zero
        big[...] = 3.0
        pre = preprocess_bytes(jpeg(photo(64, 64)), "nano")
        pre.tensors = {"pixel_values": big, "small": small}
        result = arena.ship(pre)
    assert isinstance(result, shm.Shipped)
    assert list(result.shared) == ["pixel_values"] and list(result.pre.tensors) == ["small"]
    assert len(our_files()) == 1  # the intermediate's file is gone, the shipped one waits
    back = shm.receive(result)
    assert our_files() == []
    assert list(back.tensors) == ["pixel_values", "small"]
    np.testing.assert_array_equal(back.tensors["pixel_values"], np.full((512, 1024), 3.0, np.float32))
    # Outside an arena output_array is plain numpy.
    assert output_array((512, 1024)).base is None


def test_arena_copies_a_large_tensor_it_did_not_allocate_and_cleans_up_after_an_error() -> None:
    with shm.Arena(f"{os.getpid()}-test", SMALL) as arena:
        pre = preprocess_bytes(jpeg(photo(64, 64)), "nano")
        plain = np.arange(300_000, dtype=np.float32)  # 1.2 MB, allocated by numpy
        pre.tensors = {"pixel_values": plain}
        result = arena.ship(pre)
    assert isinstance(result, shm.Shipped)
    np.testing.assert_array_equal(shm.receive(result).tensors["pixel_values"], plain)
    with pytest.raises(RuntimeError), shm.Arena(f"{os.getpid()}-test", SMALL):
        output_array((1024, 1024))
        assert len(our_files()) == 1
        raise RuntimeError("the pipeline failed")
    assert our_files() == []


def test_arena_falls_back_to_ordinary_memory_when_dev_shm_lacks_room() -> None:
    stats = os.statvfs(shm.SHM_DIR)
    too_big = stats.f_blocks * stats.f_frsize * 2  # twice the whole tmpfs
    with shm.Arena(f"{os.getpid()}-test", SMALL) as arena:
        assert arena.allocate((too_big // 4,), np.dtype(np.float32)) is None  # ENOSPC, no SIGBUS
        assert our_files() == []


def test_sweep_removes_files_of_dead_parents_only() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = shm.SHM_DIR / f"{shm.PREFIX}{int(dead.stdout)}-leftover"
    mine = shm.SHM_DIR / f"{shm.PREFIX}{os.getpid()}-inuse"
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    try:
        assert shm.sweep() >= 1
        assert not stale.exists() and mine.exists()
    finally:
        for path in (stale, mine):
            path.unlink(missing_ok=True)


def test_pool_shutdown_removes_files_its_workers_left() -> None:
    pool = PreprocessPool(1, share_min_bytes=SMALL)
    leftover = shm.SHM_DIR / f"{shm.PREFIX}{pool._owner}-from-a-killed-worker"
    other = shm.SHM_DIR / f"{shm.PREFIX}{os.getpid()}-another-pool-in-flight"
    leftover.write_bytes(b"x")
    other.write_bytes(b"x")
    try:
        pool.shutdown()
        assert not leftover.exists() and other.exists()
    finally:
        leftover.unlink(missing_ok=True)
        other.unlink(missing_ok=True)


def test_discarded_result_leaves_no_file() -> None:
    with shm.Arena(f"{os.getpid()}-test", SMALL) as arena:
        pre = preprocess_bytes(jpeg(photo(64, 64)), "nano")
        pre.tensors = {"pixel_values": output_array((1024, 1024))}
        result = arena.ship(pre)
    assert len(our_files()) == 1
    shm.discard(result)
    assert our_files() == []


def test_server_recovers_when_its_preprocessing_worker_is_killed() -> None:
    """A preprocessing worker killed by the OS (out of memory, say) breaks the pool: the request
    in flight still gets its answer (decoded in the server), the next one gets a new pool, and
    the broken pool's shared-memory files are gone."""
    import signal

    import httpx
    from serverutil import data_url, image_message, png_bytes, running_server

    from vlmlab.config import EngineSpec, ServerSettings

    settings = ServerSettings(
        engines=(EngineSpec(model="nano", device="cpu"),), response_cache_entries=0,
        preprocess_pool_min_bytes=0, preprocess_workers=1,
    )  # fmt: skip
    with running_server(settings) as server:
        def ask(colour: str) -> httpx.Response:
            body = {"model": "nano", "max_tokens": 2, "messages": image_message("Colour?", data_url(png_bytes(colour=colour)))}
            return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)

        assert ask("red").status_code == 200
        pool = server.service._preprocess_pool
        assert pool is not None
        stale = shm.SHM_DIR / f"{shm.PREFIX}{pool._owner}-written-before-the-kill"
        stale.write_bytes(b"x")
        for worker in list(pool._executor._processes.values()):
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=30)
        answers = [ask("blue"), ask("green")]
        assert [a.status_code for a in answers] == [200, 200]
        assert server.service._preprocess_pool is not pool
        assert not stale.exists()


def test_a_cancelled_request_leaves_no_file() -> None:
    """Cancelling (a client gone) before the worker starts drops the job; after it has started,
    the shipped result is discarded on arrival."""
    import asyncio

    data = jpeg(photo(1500, 600, 8))
    with PreprocessPool(1, share_min_bytes=SMALL) as pool:
        running = pool.submit(data, "llava_onevision")  # occupies the worker
        queued = pool.submit(data, "llava_onevision")
        assert queued.cancel()

        async def cancelled_while_running() -> None:
            task = asyncio.ensure_future(pool.run(data, "llava_onevision"))
            await asyncio.sleep(0.5)  # the worker is on it by now (or still on the first job)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancelled_while_running())
        running.result(timeout=120)
        pool.submit(data, "nano").result(timeout=120)  # the worker has finished all before it
        assert our_files() == []  # before the pool's shutdown, which would remove leftovers
