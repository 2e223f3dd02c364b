"""Image preprocessing: vlmlab exact / fast vs the reference processors and the decode+resize floor.

For 640x480, 1920x1080 and 4032x3024 photo-like JPEGs and each family, every variant runs from
the same JPEG bytes, round-robin (one of each per repeat, so background load hits all of them
alike), and the median of ``--repeats`` is reported:

* ``hf_pil``: ``vlmlab.media.decode_image`` + transformers' PIL-backend processor
  (``*ImageProcessorPil``); for Pixtral ``variant=mistral`` mistral_common's ``ImageEncoder``,
  for Phi-3.5 the step-by-step re-implementation of its remote code (both single references);
* ``hf_tv``: decode + transformers' torchvision-backend processor (the ``AutoProcessor`` default);
* ``exact``: ``preprocess_bytes(mode="exact")`` with the default backend (torchvision for the
  transformers families), and ``exact_pil``: the same with ``backend="pil"``;
* ``fast``: ``preprocess_bytes(mode="fast")``;
* ``floor``: decode + one ``PIL.Image.resize`` of the decoded image to the family's first
  target size with its filter: the least any pipeline from bytes must do.

Ratios are within one run. ``psnr`` is fast vs exact in dB (0..255 pixel units). References are
built as in ``tests/test_preprocess_reference.py`` (checkpoint config values). The JSON also
keeps, per variant, ``spread``: its max ms, minor page faults and system CPU ms (see ``measure``).

    .venv/bin/python benchmarks/preprocess.py [--repeats 5] [--sizes 4032x3024] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference builders live with the parity tests

from test_preprocess_reference import hf_processor, reference  # noqa: E402

from vlmlab import media  # noqa: E402
from vlmlab.preprocess import get_preprocessor, preprocess_bytes, psnr  # noqa: E402

# (label, family, options, resample filter of its first resize, has a torchvision/PIL pair)
CASES: list[tuple[str, str, dict, int, bool]] = [
    ("pixtral(mistral)", "pixtral", {}, Image.BICUBIC, False),
    ("pixtral(hf)", "pixtral", {"variant": "hf"}, Image.BICUBIC, True),
    ("nano", "nano", {}, Image.BICUBIC, True),
    ("qwen2_vl", "qwen2_vl", {}, Image.BICUBIC, True),
    ("qwen2_vl(1M px)", "qwen2_vl", {"max_pixels": 1003520}, Image.BICUBIC, True),
    ("llava_next", "llava_next", {}, Image.BICUBIC, True),
    ("llava_onevision", "llava_onevision", {}, Image.BICUBIC, True),
    ("internvl2", "internvl2", {}, Image.BICUBIC, True),
    ("idefics3", "idefics3", {}, Image.LANCZOS, True),
    ("phi3_5_vision", "phi3_5_vision", {}, Image.BILINEAR, False),
]
SIZES = [(640, 480), (1920, 1080), (4032, 3024)]


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG that compresses like a photo: smooth regions, mid-scale texture, sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(
        rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2), 3), dtype=np.uint8)
    )
    texture = Image.fromarray(
        rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    )
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16) * 3 // 4
    pixels += np.asarray(texture.resize((width, height), Image.BILINEAR), dtype=np.int16) // 4
    pixels += rng.integers(-6, 7, pixels.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    return media.decode_image(media.ImageBytes(data, "bench", "")).image


def variants(
    family: str, options: dict, resample: int, paired: bool, data: bytes
) -> dict[str, Callable[[], object]]:
    """Every timed variant of one (image, family): from bytes, ``*_proc`` from a decoded image."""
    image = decode(data)
    exact = get_preprocessor(family, **options)
    out: dict[str, Callable[[], object]] = {"decode": lambda: decode(data)}
    if paired:
        pil = hf_processor(family, "pil", options)
        tv = hf_processor(family, "torchvision", options)
        exact_pil = get_preprocessor(family, backend="pil", **options)
        out["hf_pil"] = lambda: pil(decode(data), return_tensors="np")
        out["hf_tv"] = lambda: tv(decode(data), return_tensors="pt")
        out["exact_pil"] = lambda: exact_pil.from_bytes(data)
        out["hf_pil_proc"] = lambda: pil(image, return_tensors="np")
        out["hf_tv_proc"] = lambda: tv(image, return_tensors="pt")
        out["exact_pil_proc"] = lambda: exact_pil(image)
    else:
        out["hf_pil"] = lambda: reference(family, decode(data), "pil", **options)
        out["hf_pil_proc"] = lambda: reference(family, image, "pil", **options)
    out["exact"] = lambda: exact.from_bytes(data)
    out["exact_proc"] = lambda: exact(image)
    out["fast"] = lambda: preprocess_bytes(data, family, "fast", **options)
    target = exact.pipeline.source_targets(image.width, image.height, exact.options)[0]
    out["floor"] = lambda: decode(data).resize(target, resample)
    return out


def kernel_counters() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def measure(
    fns: dict[str, Callable[[], object]], repeats: int, spread: dict[str, dict] | None = None
) -> dict[str, float]:
    """Median ms per variant; ``spread`` (when given) gets each one's max ms, median minor page
    faults and median and max system CPU ms. Writing a fresh 293 MB output (Qwen2-VL at its
    default ``max_pixels``) costs ~70,000 faults in 4 KiB pages or ~150 in huge pages, and on a
    VM whose freed memory goes back to the host, from 10 to 500 ms of system time per call for
    the same fault count: a slow median with high ``sys_ms`` is the kernel supplying memory,
    not the code under test."""
    for fn in fns.values():  # warm-up: imports, caches, first-touch allocations
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    system: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            # As timeit does: with torch and transformers loaded a full garbage collection takes
            # tens of ms and would land on whichever variant happens to trigger it.
            gc.collect()
            gc.disable()
            try:
                faults_before, system_before = kernel_counters()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                faults_after, system_after = kernel_counters()
                faults[name].append(faults_after - faults_before)
                system[name].append(system_after - system_before)
            finally:
                gc.enable()
    if spread is not None:
        for name in fns:
            spread[name] = {
                "max_ms": round(max(times[name]) * 1000, 1),
                "faults": int(statistics.median(faults[name])),
                "sys_ms": round(statistics.median(system[name]) * 1000, 1),
                "max_sys_ms": round(max(system[name]) * 1000, 1),
            }
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def run(sizes: list[tuple[int, int]], labels: set[str] | None, repeats: int) -> list[dict]:
    rows = []
    for width, height in sizes:
        data = photo_jpeg(width, height)
        for label, family, options, resample, paired in CASES:
            if labels and label not in labels:
                continue
            spread: dict[str, dict] = {}
            ms = measure(variants(family, options, resample, paired, data), repeats, spread)
            exact = preprocess_bytes(data, family, "exact", **options)
            fast = preprocess_bytes(data, family, "fast", **options)
            scale = 255.0 * float(np.mean(get_preprocessor(family, **options).norm.std))
            row = {
                "size": f"{width}x{height}",
                "family": label,
                "jpeg_bytes": len(data),
                "tokens": exact.grid.tokens,
                "ms": {k: round(v, 1) for k, v in ms.items()},
                "spread": spread,
                "psnr_fast_db": round(
                    psnr(exact.tensors["pixel_values"], fast.tensors["pixel_values"], scale), 1
                ),
                "fast_tokens_equal": fast.grid.tokens == exact.grid.tokens
                and all(fast.tensors[k].shape == v.shape for k, v in exact.tensors.items()),
                "stages_exact_ms": {k: round(v * 1000, 1) for k, v in exact.stages.items()},
                "stages_fast_ms": {k: round(v * 1000, 1) for k, v in fast.stages.items()},
            }
            row["ratios"] = ratios(ms)
            rows.append(row)
            print(f"  done {row['size']} {label}", file=sys.stderr, flush=True)
    return rows


def ratios(ms: dict[str, float]) -> dict[str, float]:
    pairs = {
        "pil/exact": ("hf_pil", "exact"),
        "pil/exact_pil": ("hf_pil", "exact_pil"),
        "tv/exact": ("hf_tv", "exact"),
        "pil/fast": ("hf_pil", "fast"),
        "fast/floor": ("fast", "floor"),
        "proc pil/exact": ("hf_pil_proc", "exact_proc"),
        "proc pil/exact_pil": ("hf_pil_proc", "exact_pil_proc"),
        "proc tv/exact": ("hf_tv_proc", "exact_proc"),
    }
    return {k: round(ms[a] / ms[b], 2) for k, (a, b) in pairs.items() if a in ms and b in ms}


def table(rows: list[dict], columns: list[str], ratio_names: list[str], title: str) -> str:
    # Processor-only columns print without their "_proc" / "proc " prefixes and suffixes.
    heads = [c.removesuffix("_proc") for c in columns] + [
        r.removeprefix("proc ") for r in ratio_names
    ]
    widths = [10] * len(columns) + [14] * len(ratio_names)
    lines = [
        title,
        f"{'size':>9}  {'family':<17}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)),
    ]
    for row in rows:
        cells = "".join(
            f"{row['ms'][c]:>10.1f}" if c in row["ms"] else f"{'-':>10}" for c in columns
        )
        rs = "".join(
            f"{row['ratios'][r]:>14.2f}" if r in row["ratios"] else f"{'-':>14}"
            for r in ratio_names
        )
        extra = f"{row['psnr_fast_db']:>8.1f}" if "fast" in columns else ""
        lines.append(f"{row['size']:>9}  {row['family']:<17}{cells}{rs}{extra}")
    if "fast" in columns:
        lines[1] += f"{'psnr':>8}"
    return "\n".join(lines)


def report(rows: list[dict], repeats: int, threads: int) -> str:
    head = f"median of {repeats} runs, ms; torch/OpenCV threads {threads}"
    from_bytes = table(
        rows,
        ["decode", "hf_pil", "hf_tv", "exact", "exact_pil", "fast", "floor"],
        ["pil/exact", "pil/exact_pil", "tv/exact", "pil/fast", "fast/floor"],
        f"From JPEG bytes (decode included everywhere) - {head}",
    )
    processor = table(
        rows,
        ["hf_pil_proc", "hf_tv_proc", "exact_proc", "exact_pil_proc"],
        ["proc pil/exact", "proc pil/exact_pil", "proc tv/exact"],
        "Processor only (a decoded image in)",
    )
    return from_bytes + "\n\n" + processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sizes", nargs="*", default=None, help="WxH, default 640x480 1920x1080 4032x3024"
    )
    parser.add_argument("--families", nargs="*", default=None, help="labels from the table to run")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch / OpenCV intra-op threads (both sides)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes] if args.sizes else SIZES
    warnings.simplefilter("ignore")
    import cv2
    import torch

    # One intra-op thread by default: what a PreprocessPool worker runs with, and on a shared
    # machine the only setting where a torch thread pool does not stall on a busy core.
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    rows = run(sizes, set(args.families) if args.families else None, args.repeats)
    print(report(rows, args.repeats, args.threads))
    if args.json:
        import PIL
        import transformers

        meta = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": args.threads,
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "repeats": args.repeats,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
