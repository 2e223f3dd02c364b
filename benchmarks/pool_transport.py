"""Preprocessing through the worker pool: the default transport vs the pipe alone.

For a 4032x3024 photo-like JPEG and each family, the time from ``PreprocessPool.submit`` to the
result in the parent, with one worker, side by side (round-robin, median of ``--repeats``):
``default`` (output tensors of ``shm.MIN_BYTES`` = 64 MB or more written into ``/dev/shm`` by
the worker and mapped by the parent, the rest pickled through the pipe) and ``pipe``
(``share_min_bytes=None``: everything through the executor's pipe), plus ``local``: the same call
in this process, no pool. Only Qwen2-VL at its default ``max_pixels`` (293 MB) crosses the
threshold; for the other rows both columns take the same path, so their ratio shows the noise.
(``--share-min-mb 1`` sends every row's pixels through shared memory instead.)

    .venv/bin/python benchmarks/pool_transport.py [--repeats 7] [--size 4032x3024] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
from PIL import Image

from vlmlab.preprocess import PreprocessPool, preprocess_bytes

CASES = [
    ("pixtral(hf)", "pixtral", {"variant": "hf"}),
    ("nano", "nano", {}),
    ("qwen2_vl(1M px)", "qwen2_vl", {"max_pixels": 1003520}),
    ("qwen2_vl", "qwen2_vl", {}),
    ("llava_next", "llava_next", {}),
    ("llava_onevision", "llava_onevision", {}),
    ("internvl2", "internvl2", {}),
    ("idefics3", "idefics3", {}),
    ("phi3_5_vision", "phi3_5_vision", {}),
]


def photo_jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", default="4032x3024")
    parser.add_argument("--families", nargs="*", default=None, help="labels from the table to run")
    parser.add_argument("--share-min-mb", type=float, default=None, help="shared-memory threshold (default: the pool's)")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    # One intra-op thread here as in the workers: a second OpenMP thread left spinning after the
    # in-process run would take the core from the worker measured next.
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.split("x"))
    data = photo_jpeg(width, height)
    rows = []
    share = {} if args.share_min_mb is None else {"share_min_bytes": int(args.share_min_mb * 2**20)}
    with PreprocessPool(1, **share) as shared, PreprocessPool(1, share_min_bytes=None) as piped:
        for label, family, options in CASES:
            if args.families and label not in args.families:
                continue
            times: dict[str, list[float]] = {"default": [], "pipe": [], "local": []}
            runs = {
                "default": lambda f=family, o=options: shared.submit(data, f, "exact", o).result(),
                "pipe": lambda f=family, o=options: piped.submit(data, f, "exact", o).result(),
                "local": lambda f=family, o=options: preprocess_bytes(data, f, "exact", **o),
            }
            for name, run in runs.items():  # warm-up: imports and processor set-up in the workers
                run()
            nbytes = 0
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    result = run()
                    times[name].append(time.perf_counter() - start)
                    nbytes = result.nbytes
                    del result
            median = {name: statistics.median(values) * 1000 for name, values in times.items()}
            rows.append({"family": label, "output_mb": round(nbytes / 1e6, 1), **{f"{k}_ms": round(v, 1) for k, v in median.items()},
                         "pipe_over_default": round(median["pipe"] / median["default"], 2)})  # fmt: skip
    print(f"{args.size} JPEG through a one-worker PreprocessPool, median of {args.repeats}, ms")
    print(f"{'family':<18} {'output MB':>9} {'local':>8} {'default':>8} {'pipe':>8} {'pipe/default':>12}")
    for r in rows:
        print(f"{r['family']:<18} {r['output_mb']:>9} {r['local_ms']:>8} {r['default_ms']:>8} {r['pipe_ms']:>8} {r['pipe_over_default']:>11}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
