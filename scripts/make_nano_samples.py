"""Write the sample images shipped in src/vlmlab/nano/samples/ (made by the task generator).

    .venv/bin/python scripts/make_nano_samples.py
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from vlmlab.nano.tasks import TASKS, make_sample

OUT = Path(__file__).resolve().parents[1] / "src" / "vlmlab" / "nano" / "samples"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index: list[dict] = []
    for task in TASKS:
        sample = make_sample(0, seed=2024, tasks=[task])
        names = []
        for k, image in enumerate(sample.images):
            name = f"{task}.png" if len(sample.images) == 1 else f"{task}_{k + 1}.png"
            image.save(OUT / name)
            names.append(name)
        index.append({"task": task, "images": names, "question": sample.question, "answer": sample.answer})
    square = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(square).rectangle((35, 20, 85, 70), fill=(220, 30, 30))
    square.save(OUT / "red_square.png")
    index.append({"task": "color", "images": ["red_square.png"], "question": "What colour is the shape?", "answer": "red"})
    (OUT / "samples.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(index)} samples to {OUT}")


if __name__ == "__main__":
    main()
