"""Procedural VLM tasks in miniature: shapes, OCR, charts, forms and two-image comparisons.

Every sample is drawn with Pillow from a private ``random.Random`` seeded by ``(seed, index)``
only, so sample ``i`` is the same whatever ``n`` is asked for (``--limit`` gives a prefix) and on
every machine. Tasks are dealt round-robin over the requested mix, which keeps any prefix
balanced across task types. Answers are short canonical strings (a lowercase word or a number)
so exact match is a meaningful metric.

The font is Pillow's bundled one (``ImageFont.load_default(size=...)``, Pillow >= 10.1 with
FreeType), so nothing is downloaded and rendering is reproducible.

This generator is the training data of the nano checkpoint, the ``synth`` eval dataset and a
benchmark workload.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlmlab.protocol.errors import ConfigError

# Order is the round-robin order; one name per task type reported by the evaluator.
TASKS: tuple[str, ...] = (
    "color",
    "shape",
    "position",
    "count",
    "ocr",
    "chart_value",
    "chart_extreme",
    "document",
    "compare_count",
    "compare_color",
)

# Saturated, well separated colours so a 16 px patch is unambiguous; names are the answers.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "box", "map", "key", "red", "tree", "fish", "bird", "moon", "ship",
)  # fmt: skip
DOC_KEYS: tuple[str, ...] = ("Total", "Tax", "Qty", "Room", "Table", "Code")
CHART_LABELS = "ABCDE"


@dataclass
class Sample:
    """One generated question about one or more images.

    Attributes:
        id: ``"{seed}-{index}"``, stable across runs.
        task: one of :data:`TASKS`.
        images: RGB ``PIL.Image.Image`` objects, in the order the question refers to them.
        question: the user's question (images come before it in the prompt).
        answer: the canonical short answer, compared by exact match.
        extra: further (question, answer) pairs about the same images; training packs them as
            later turns of one chat.
        meta: what was drawn (colours, counts, values, ...), so tests can check the answer.
    """

    id: str
    task: str
    images: list[Image.Image]
    question: str
    answer: str
    extra: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _canvas(rng: random.Random, w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    shade = rng.randint(225, 255)
    tint = tuple(min(255, shade + rng.randint(-8, 0)) for _ in range(3))
    img = Image.new("RGB", (w, h), tint)
    return img, ImageDraw.Draw(img)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _size(rng: random.Random, lo: int = 48, hi: int = 128) -> tuple[int, int]:
    """A random canvas size with aspect ratios from about 1:3 to 3:1."""
    long = rng.randint(max(lo, 64), hi)
    short = rng.randint(lo, long)
    return (long, short) if rng.random() < 0.5 else (short, long)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...]
) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # star: 5 outer points, inner radius 0.45 r
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)


def _place(
    rng: random.Random, w: int, h: int, sizes: Sequence[int], tries: int = 200
) -> list[tuple[int, int, int, int]] | None:
    """Non-overlapping square boxes (with a 3 px gap) of the given sizes, or None."""
    boxes: list[tuple[int, int, int, int]] = []
    for s in sizes:
        for _ in range(tries):
            x, y = rng.randint(2, w - s - 2), rng.randint(2, h - s - 2)
            box = (x, y, x + s, y + s)
            if all(
                box[2] + 3 <= b[0] or b[2] + 3 <= box[0] or box[3] + 3 <= b[1] or b[3] + 3 <= box[1]
                for b in boxes
            ):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _pick(rng: random.Random, templates: Sequence[str], **kw: str) -> str:
    return rng.choice(templates).format(**kw)


# -- tasks ----------------------------------------------------------------------------------------

# No template names the attribute another question about the same image asks for, so packed
# multi-turn training chats cannot leak answers between turns.
Q_COLOR = ("What colour is the shape?", "What color is the shape?", "Which colour is shown?",
           "Name the colour of the object.", "What is the colour of the object?")  # fmt: skip
Q_SHAPE = ("What shape is this?", "What shape is shown?", "Which shape is in the image?",
           "Name the shape.", "What is the shape?")  # fmt: skip
Q_POS_H = ("Is the shape on the left or the right?", "Is the shape left or right?",
           "Which side is the object on, left or right?")  # fmt: skip
Q_POS_V = ("Is the shape at the top or the bottom?", "Is the shape top or bottom?",
           "Is the object at the top or bottom?")  # fmt: skip
Q_COUNT = ("How many {plural} are there?", "How many {plural} are in the image?",
           "Count the {plural}.", "How many shapes are there?", "What is the number of {plural}?")  # fmt: skip


def _single_shape(rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    """One shape placed clearly on one side of the canvas (the side along the long axis)."""
    w, h = _size(rng, 48, 144)
    img, draw = _canvas(rng, w, h)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    axis = "h" if w > h or (w == h and rng.random() < 0.5) else "v"
    s = rng.randint(max(16, min(w, h) // 4), max(18, min(w, h) * 2 // 3))
    s = min(s, min(w, h) - 6, (w if axis == "h" else h) // 2 - 6)
    side = rng.choice(("left", "right") if axis == "h" else ("top", "bottom"))
    # the shape lies entirely in its half, with a margin from the centre line
    if axis == "h":
        lo, hi = (2, w // 2 - s - 4) if side == "left" else (w // 2 + 4, w - s - 2)
        x, y = rng.randint(lo, max(lo, hi)), rng.randint(2, h - s - 2)
    else:
        lo, hi = (2, h // 2 - s - 4) if side == "top" else (h // 2 + 4, h - s - 2)
        x, y = rng.randint(2, w - s - 2), rng.randint(lo, max(lo, hi))
    _draw_shape(draw, shape, (x, y, x + s, y + s), _jitter(COLORS[color], rng))
    return img, {"color": color, "shape": shape, "position": side, "axis": axis, "box": (x, y, s)}


def _shape_qas(rng: random.Random, meta: dict[str, Any]) -> dict[str, tuple[str, str]]:
    kw = {"shape": meta["shape"], "color": meta["color"]}
    pos = Q_POS_H if meta["axis"] == "h" else Q_POS_V
    return {
        "color": (_pick(rng, Q_COLOR, **kw), meta["color"]),
        "shape": (_pick(rng, Q_SHAPE, **kw), meta["shape"]),
        "position": (_pick(rng, pos, **kw), meta["position"]),
    }


def _task_single(task: str) -> Callable[[random.Random], tuple[list[Image.Image], str, str, list, dict]]:
    def make(rng: random.Random):
        img, meta = _single_shape(rng)
        qas = _shape_qas(rng, meta)
        q, a = qas.pop(task)
        return [img], q, a, list(qas.values()), meta

    return make


def _count_image(rng: random.Random, n: int, shape: str) -> tuple[Image.Image, dict[str, Any]]:
    for _ in range(50):
        w, h = _size(rng, 80, 144)
        s = rng.randint(14, 24)
        boxes = _place(rng, w, h, [s] * n)
        if boxes is not None:
            break
    else:  # pragma: no cover - 50 canvases of >= 80 px: one fits six 24 px shapes
        raise RuntimeError("could not place shapes")
    img, draw = _canvas(rng, w, h)
    colors = [rng.choice(list(COLORS)) for _ in range(n)]
    for box, c in zip(boxes, colors):
        _draw_shape(draw, shape, box, _jitter(COLORS[c], rng))
    return img, {"count": n, "shape": shape, "colors": colors, "boxes": boxes}


def _task_count(rng: random.Random):
    shape = rng.choice(SHAPES)
    img, meta = _count_image(rng, rng.randint(1, 6), shape)
    q = _pick(rng, Q_COUNT, plural=PLURAL[shape])
    return [img], q, str(meta["count"]), [], meta


def _task_ocr(rng: random.Random):
    w, h = _size(rng, 48, 144)
    img, draw = _canvas(rng, w, h)
    if rng.random() < 0.8:
        text = str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
        q = _pick(rng, ("What number is written?", "What number is shown?", "Read the number.",
                        "Which number is in the image?"))  # fmt: skip
    else:
        text = rng.choice(WORDS)
        q = _pick(rng, ("What word is written?", "Read the word.", "What does the text say?"))
    # dark inks only: yellow / orange text on a near-white page is hard to read even for people
    ink = _jitter(rng.choice([(20, 20, 20), COLORS["red"], COLORS["blue"], COLORS["purple"],
                              COLORS["green"]]), rng, 10)  # fmt: skip
    size = rng.randint(18, 36)
    while size > 14:
        l, t, r, b = draw.textbbox((0, 0), text, font=_font(size))
        if r - l <= w - 8 and b - t <= h - 8:
            break
        size -= 2
    l, t, r, b = draw.textbbox((0, 0), text, font=_font(size))
    x = rng.randint(4, max(4, w - (r - l) - 4)) - l
    y = rng.randint(4, max(4, h - (b - t) - 4)) - t
    draw.text((x, y), text, fill=ink, font=_font(size))
    return [img], q, text, [], {"text": text, "font_size": size}


def _chart(rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    k = rng.randint(3, 5)
    labels = list(CHART_LABELS[:k])
    values = rng.sample(range(1, 10), k)  # distinct, so highest / lowest are unique
    w = rng.randint(max(96, 30 * k), 160)
    h = rng.randint(96, 144)
    img, draw = _canvas(rng, w, h)
    font = _font(13)
    base, top = h - 17, 19  # room for labels below and value text above
    slot = (w - 8) // k
    bar_w = max(10, slot * 2 // 3)
    fill = _jitter(rng.choice(list(COLORS.values())), rng)
    draw.line((2, base, w - 2, base), fill=(60, 60, 60))
    bars = []
    for j, (lab, v) in enumerate(zip(labels, values)):
        x0 = 4 + j * slot + (slot - bar_w) // 2
        y0 = base - round((base - top) * v / 9)
        draw.rectangle((x0, y0, x0 + bar_w, base), fill=fill)
        bars.append((x0, y0, x0 + bar_w, base))
        cx = x0 + bar_w // 2
        draw.text((cx, y0 - 2), str(v), fill=(20, 20, 20), font=font, anchor="ms")
        draw.text((cx, base + 3), lab, fill=(20, 20, 20), font=font, anchor="mt")
    return img, {"labels": labels, "values": values, "bars": bars}


def _task_chart(kind: str):
    def make(rng: random.Random):
        img, meta = _chart(rng)
        labels, values = meta["labels"], meta["values"]
        hi = labels[values.index(max(values))]
        lo = labels[values.index(min(values))]
        qas = []
        for lab, v in zip(labels, values):
            q = _pick(rng, ("What is the value of {l}?", "What value does bar {l} show?",
                            "How high is bar {l}?"), l=lab)  # fmt: skip
            qas.append(("value", q, str(v)))
        qas.append(("extreme", _pick(rng, ("Which bar is highest?", "Which bar is the tallest?",
                                           "Which label has the largest value?")), hi))  # fmt: skip
        qas.append(("extreme", _pick(rng, ("Which bar is lowest?", "Which bar is the shortest?",
                                           "Which label has the smallest value?")), lo))  # fmt: skip
        mine = [qa for qa in qas if qa[0] == kind]
        first = rng.choice(mine)
        rest = [(q, a) for _, q, a in qas if (q, a) != first[1:]]
        rng.shuffle(rest)
        return [img], first[1], first[2], rest, meta

    return make


def _task_document(rng: random.Random):
    keys = rng.sample(DOC_KEYS, rng.randint(2, 4))
    fields = {k: str(rng.randint(1, 99)) for k in keys}
    size = rng.randint(12, 15)
    font = _font(size)
    line_h = size + rng.randint(4, 8)
    w = rng.randint(100, 160)
    h = min(160, 10 + line_h * (len(keys) + 1) + rng.randint(0, 40))
    img, draw = _canvas(rng, w, h)
    title = rng.choice(("RECEIPT", "FORM", "ORDER", "INVOICE"))
    x, y = rng.randint(3, 12), rng.randint(3, max(3, h - line_h * (len(keys) + 1) - 4))
    draw.text((x, y), title, fill=(20, 20, 20), font=font)
    draw.line((x, y + line_h - 3, w - 6, y + line_h - 3), fill=(120, 120, 120))
    for i, k in enumerate(keys):
        draw.text((x, y + line_h * (i + 1)), f"{k}: {fields[k]}", fill=(20, 20, 20), font=font)
    qs = ("What is the {k}?", "What is the value of {k}?", "Read the {k} field.", "{k}?")
    qas = [(_pick(rng, qs, k=k), fields[k]) for k in keys]
    q, a = qas.pop(rng.randrange(len(qas)))
    return [img], q, a, qas, {"fields": fields, "title": title}


def _task_compare_count(rng: random.Random):
    shape = rng.choice(SHAPES)
    a, b = rng.sample(range(1, 7), 2)
    img_a, _ = _count_image(rng, a, shape)
    img_b, _ = _count_image(rng, b, shape)
    q = _pick(rng, ("Which image has more {p}?", "Which picture shows more {p}, first or second?",
                    "More {p}: first or second image?"), p=PLURAL[shape])  # fmt: skip
    ans = "first" if a > b else "second"
    q2 = _pick(rng, ("Which image has fewer {p}?", "Which picture shows fewer {p}?"), p=PLURAL[shape])
    extra = [(q2, "second" if a > b else "first"), ("How many {p} are in the first image?"
             .format(p=PLURAL[shape]), str(a))]  # fmt: skip
    return [img_a, img_b], q, ans, extra, {"counts": (a, b), "shape": shape}


def _task_compare_color(rng: random.Random):
    first, m1 = _single_shape(rng)
    second, m2 = _single_shape(rng)
    if rng.random() < 0.5:  # force a balanced yes / no answer distribution
        # same colour but a fresh drawing, so the model cannot match pixels
        while True:
            second, m2 = _single_shape(rng)
            if m2["color"] == m1["color"]:
                break
    same = m1["color"] == m2["color"]
    q = _pick(rng, ("Are the two shapes the same colour?", "Do both images show the same color?",
                    "Same colour in both images?"))  # fmt: skip
    extra = [("What colour is the shape in the first image?", m1["color"]),
             ("What colour is the shape in the second image?", m2["color"])]  # fmt: skip
    return [first, second], q, "yes" if same else "no", extra, {"colors": (m1["color"], m2["color"])}


_MAKERS: dict[str, Callable[[random.Random], tuple]] = {
    "color": _task_single("color"),
    "shape": _task_single("shape"),
    "position": _task_single("position"),
    "count": _task_count,
    "ocr": _task_ocr,
    "chart_value": _task_chart("value"),
    "chart_extreme": _task_chart("extreme"),
    "document": _task_document,
    "compare_count": _task_compare_count,
    "compare_color": _task_compare_color,
}


def _check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
    if tasks is None:
        return TASKS
    chosen = tuple(tasks)
    unknown = [t for t in chosen if t not in _MAKERS]
    if unknown or not chosen:
        raise ConfigError(
            f"unknown nano task(s) {unknown or chosen!r}; available: {', '.join(TASKS)}"
        )
    return chosen


def make_sample(index: int, seed: int = 0, tasks: Sequence[str] | None = None) -> Sample:
    """Sample ``index`` of the stream ``(seed, tasks)``; depends on nothing else.

    Raises:
        ConfigError: an unknown task name (the message lists the valid ones).
    """
    chosen = _check_tasks(tasks)
    task = chosen[index % len(chosen)]
    # str seeds are hashed with SHA-512 by random.Random: stable across processes and platforms
    rng = random.Random(f"vlmlab-nano:{seed}:{index}:{task}")
    images, q, a, extra, meta = _MAKERS[task](rng)
    return Sample(f"{seed}-{index}", task, images, q, a, extra, meta)


def iter_samples(
    n: int | None = None, seed: int = 0, tasks: Sequence[str] | None = None, start: int = 0
) -> Iterator[Sample]:
    """Samples ``start, start+1, ...`` (``n`` of them, or forever when ``n`` is None)."""
    chosen = _check_tasks(tasks)
    i = start
    while n is None or i < start + n:
        yield make_sample(i, seed, chosen)
        i += 1


def generate(n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[Sample]:
    """The first ``n`` samples for ``seed`` over ``tasks`` (default: all of :data:`TASKS`).

    Raises:
        ConfigError: an unknown task name, or a negative ``n``.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    return list(iter_samples(n, seed, tasks))


@functools.lru_cache(maxsize=1)
def known_questions() -> frozenset[str]:
    """Every question nano was trained on, lower-cased (114 of them: the templates of all tasks
    with their placeholders filled in). 3,000 samples cover them all; any seed gives the same
    set. About 0.4 s, once."""
    found = set()
    for sample in generate(3000):
        found.add(sample.question.strip().lower())
        found.update(question.strip().lower() for question, _ in sample.extra)
    return frozenset(found)
