"""Tiny copies of every eval benchmark, on disk, in the real schemas.

Each writer makes 3-6 rows with small generated images, in the layout a user would have:
``save_to_disk`` folders, parquet files (one a Hub snapshot with ``<config>/<split>-*.parquet``),
a jsonl + images folder, and DAM-QA's ``data/`` tree (``chartqa/test_human.jsonl`` +
``chartqa/images/`` ...). Column names and types follow the Hub datasets (``datasets.Image()``
where the Hub has images; ChartQAPro's image is raw bytes, MathVista's ``image`` a file name).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image as PILImage


def tiny_image(seed: int, size: tuple[int, int] = (12, 8)) -> PILImage.Image:
    """A small RGB image whose colour and size depend on ``seed`` (so images differ)."""
    colour = ((seed * 67) % 256, (seed * 131 + 40) % 256, (seed * 29 + 90) % 256)
    return PILImage.new("RGB", (size[0] + seed % 5, size[1] + seed % 3), colour)


def png_bytes(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Fixtures:
    """Where each key's fixture lives and how many of its rows belong to the dataset."""

    root: Path
    paths: dict[str, Path] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    damqa_root: Path | None = None
    damqa_rows: dict[str, int] = field(default_factory=dict)
    hub_chartqa: Path | None = None


def _dataset(columns: dict[str, list[Any]], features: dict[str, Any]) -> Any:
    import datasets

    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def write_chartqa(target: Path) -> Path:
    """lmms-lab/ChartQA test schema (3 human + 3 augmented rows) as a save_to_disk folder."""
    import datasets

    ds = _dataset(
        {
            "type": ["human_test", "augmented_test", "human_test", "augmented_test", "human_test",
                     "augmented_test"],
            "question": ["How many bars are there?", "What is the value of Sales in 2019?",
                         "Is the red line above the blue one?", "Which year has the lowest value?",
                         "What's the percentage of 'Agree'?", "What is the sum of A and B?"],
            "answer": ["4", "12.5", "Yes", "2016", "45%", "30"],
            "image": [tiny_image(i) for i in range(6)],
        },
        {"type": datasets.Value("string"), "question": datasets.Value("string"),
         "answer": datasets.Value("string"), "image": datasets.Image()},
    )  # fmt: skip
    ds.save_to_disk(str(target))
    return target


def write_chartqa_hub(target: Path) -> Path:
    """The same rows as a Hub repo snapshot (``data/test-00000-of-00001.parquet``)."""
    import datasets

    ds = datasets.load_from_disk(str(write_chartqa(target.parent / "chartqa_for_hub")))
    (target / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(target / "data" / "test-00000-of-00001.parquet"))
    return target


CHARTQAPRO_ROWS: list[dict[str, Any]] = [
    {"Question": ["What is the highest value in 2020?"], "Answer": ["52"],
     "Question Type": "Factoid", "Year": ["NO"], "Paragraph": ""},
    {"Question": ["Which country leads?", "By how much in 2021?"], "Answer": ["France", "3.2"],
     "Question Type": "Conversational", "Year": ["NO", "NO"], "Paragraph": ""},
    {"Question": ["The share of renewables doubled between 2010 and 2020."], "Answer": ["True"],
     "Question Type": "Fact Checking", "Year": ["NO"], "Paragraph": ""},
    {"Question": ["Which bar is tallest? a) A b) B c) C d) D"], "Answer": ["b"],
     "Question Type": "Multi Choice", "Year": ["NO"], "Paragraph": ""},
    {"Question": ["If sales grew 10% more, what would 2019 be?"], "Answer": ["2019"],
     "Question Type": "Hypothetical", "Year": ["YES"],
     "Paragraph": "Sales figures are in millions of euros."},
]  # fmt: skip


def write_chartqapro(target: Path) -> Path:
    """ahmed-masry/ChartQAPro test schema (image as PNG bytes) as one parquet file."""
    import datasets

    rows = CHARTQAPRO_ROWS
    ds = _dataset(
        {
            "image": [png_bytes(tiny_image(10 + i)) for i in range(len(rows))],
            "Question": [r["Question"] for r in rows],
            "Answer": [r["Answer"] for r in rows],
            "Question Type": [r["Question Type"] for r in rows],
            "Year": [r["Year"] for r in rows],
            "Paragraph": [r["Paragraph"] for r in rows],
        },
        {"image": datasets.Value("binary"), "Question": datasets.Sequence(datasets.Value("string")),
         "Answer": datasets.Sequence(datasets.Value("string")),
         "Question Type": datasets.Value("string"),
         "Year": datasets.Sequence(datasets.Value("string")),
         "Paragraph": datasets.Value("string")},
    )  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    path = target / "test-00000-of-00001.parquet"
    ds.to_parquet(str(path))
    return path


def write_docvqa_snapshot(target: Path) -> Path:
    """lmms-lab/DocVQA as a Hub snapshot: ``DocVQA/`` and ``InfographicVQA/`` parquet shards."""
    import datasets

    s = datasets.Value("string")
    doc = _dataset(
        {
            "questionId": ["49153", "24580", "57349", "10"],
            "question": ["What is the date?", "Who signed the letter?", "What is the total?",
                         "What is the title?"],
            "question_types": [["form"], ["layout"], ["table/list"], ["others"]],
            "image": [tiny_image(20 + i) for i in range(4)],
            "docId": [1, 2, 3, 4],
            "ucsf_document_id": ["a", "b", "c", "d"],
            "ucsf_document_page_no": ["1", "1", "2", "3"],
            "answers": [["1/8/93", "January 8, 1993"], ["J. Smith"], ["$1,250"], ["Annual Report"]],
            "data_split": ["val"] * 4,
        },
        {"questionId": s, "question": s, "question_types": datasets.Sequence(s),
         "image": datasets.Image(), "docId": datasets.Value("int32"), "ucsf_document_id": s,
         "ucsf_document_page_no": s, "answers": datasets.Sequence(s), "data_split": s},
    )  # fmt: skip
    info = _dataset(
        {
            "questionId": ["65718", "65719", "65720"],
            "question": ["Which country has the most users?", "What percent use email?",
                         "Name the top two apps"],
            "answers": [["india"], ["43%", "43"], ["facebook, twitter", "twitter, facebook"]],
            "answer_type": [["single span"], ["single span"], ["multi-span"]],
            "image": [tiny_image(30 + i) for i in range(3)],
            "image_url": ["u1", "u2", "u3"],
            "operation/reasoning": [[], ["counting"], []],
            "ocr": ["", "", ""],
            "data_split": ["val"] * 3,
        },
        {"questionId": s, "question": s, "answers": datasets.Sequence(s),
         "answer_type": datasets.Sequence(s), "image": datasets.Image(), "image_url": s,
         "operation/reasoning": datasets.Sequence(s), "ocr": s, "data_split": s},
    )  # fmt: skip
    (target / "DocVQA").mkdir(parents=True, exist_ok=True)
    (target / "InfographicVQA").mkdir(parents=True, exist_ok=True)
    doc.to_parquet(str(target / "DocVQA" / "validation-00000-of-00001.parquet"))
    doc.select([0]).to_parquet(str(target / "DocVQA" / "test-00000-of-00001.parquet"))
    info.to_parquet(str(target / "InfographicVQA" / "validation-00000-of-00001.parquet"))
    return target


def write_textvqa(target: Path) -> Path:
    """lmms-lab/textvqa schema, a DatasetDict (validation + test) saved to disk."""
    import datasets

    s = datasets.Value("string")
    features = {
        "image_id": s, "question_id": datasets.Value("int32"), "question": s,
        "question_tokens": datasets.Sequence(s), "image": datasets.Image(),
        "image_width": datasets.Value("int32"), "image_height": datasets.Value("int32"),
        "flickr_original_url": s, "flickr_300k_url": s, "answers": datasets.Sequence(s),
        "image_classes": datasets.Sequence(s), "set_name": s, "ocr_tokens": datasets.Sequence(s),
    }  # fmt: skip
    questions = ["what does the sign say about 'NASA'?", "what brand is this?", "what number?"]
    answers = [["nasa"] * 7 + ["NASA"] * 3, ["nokia"] * 10, ["12", "12", "twelve"] + ["12"] * 7]
    val = _dataset(
        {
            "image_id": ["i0", "i1", "i2"], "question_id": [34602, 34603, 34604],
            "question": questions, "question_tokens": [q.split() for q in questions],
            "image": [tiny_image(40 + i) for i in range(3)], "image_width": [12, 13, 14],
            "image_height": [8, 9, 10], "flickr_original_url": ["", "", ""],
            "flickr_300k_url": ["", "", ""], "answers": answers,
            "image_classes": [["sign"], ["phone"], ["clock"]], "set_name": ["val"] * 3,
            "ocr_tokens": [["NASA", "launch"], ["nokia"], ["12"]],
        },
        features,
    )  # fmt: skip
    test = val.select([0])
    datasets.DatasetDict({"validation": val, "test": test}).save_to_disk(str(target))
    return target


def write_mmbench(target: Path) -> Path:
    """lmms-lab/MMBench ``en`` dev schema (index is a string there) with a circular copy."""
    import datasets

    s = datasets.Value("string")
    ds = _dataset(
        {
            "index": ["0", "1", "1000000", "2000000", "5"],
            "question": ["What animal is shown?", "Which colour dominates?",
                         "What animal is shown?", "What animal is shown?", "How many people?"],
            "hint": ["The photo was taken at a farm.", None, "The photo was taken at a farm.",
                     "The photo was taken at a farm.", "nan"],
            "A": ["cat", "red", "dog", "horse", "1"],
            "B": ["dog", "green", "horse", "cat", "2"],
            "C": ["horse", None, "cat", "dog", "3"],
            "D": [None, None, None, None, "nan"],
            "answer": ["A", "B", "C", "B", "C"],
            "category": ["animal_recognition", "color", "animal_recognition",
                         "animal_recognition", "counting"],
            "image": [tiny_image(50 + i) for i in range(5)],
            "source": ["src"] * 5,
            "L2-category": ["coarse_perception", "fine_perception", "coarse_perception",
                            "coarse_perception", "fine_perception"],
            "comment": ["nan"] * 5,
            "split": ["dev"] * 5,
        },
        {"index": s, "question": s, "hint": s, "A": s, "B": s, "C": s, "D": s, "answer": s,
         "category": s, "image": datasets.Image(), "source": s, "L2-category": s, "comment": s,
         "split": s},
    )  # fmt: skip
    ds.save_to_disk(str(target))
    return target


def write_mmmu(target: Path) -> Path:
    """lmms-lab/MMMU validation schema: ``options`` is a string repr, image_1..image_7."""
    import datasets

    s = datasets.Value("string")
    images: dict[str, list[Any]] = {f"image_{k}": [None] * 4 for k in range(1, 8)}
    images["image_1"] = [tiny_image(60 + i) for i in range(4)]
    images["image_2"][1] = tiny_image(70)
    ds = _dataset(
        {
            "id": ["validation_Art_Theory_1", "validation_Math_2", "validation_Physics_3",
                   "validation_Computer_Science_4"],
            "question": ["<image 1> Which artist painted this?",
                         "Compare <image 1> with the options. Which option matches?",
                         "What is the speed in m/s shown in <image 1>?",
                         "What does the diagram describe?"],
            "options": ["['Monet', 'Manet', 'Degas']", "['<image 2>', 'none of them']", "[]",
                        "['a tree', 'a graph']"],
            "explanation": ["", "", "", ""],
            **images,
            "img_type": ["['Paintings']", "['Diagrams']", "['Plots']", "['Diagrams']"],
            "answer": ["B", "A", "['1.5', '1.50']", "B"],
            "topic_difficulty": ["Easy", "Medium", "Hard", "Easy"],
            "question_type": ["multiple-choice", "multiple-choice", "open", "multiple-choice"],
            "subfield": ["Art History", "Geometry", "Mechanics", "Data Structure"],
        },
        {"id": s, "question": s, "options": s, "explanation": s,
         **{f"image_{k}": datasets.Image() for k in range(1, 8)}, "img_type": s, "answer": s,
         "topic_difficulty": s, "question_type": s, "subfield": s},
    )  # fmt: skip
    ds.save_to_disk(str(target))
    return target


def write_mathvista(target: Path) -> Path:
    """AI4Math/MathVista testmini schema as one parquet file."""
    import datasets

    s = datasets.Value("string")
    rows = [
        ("1", "What fraction of the shape is blue?", ["3/11", "8/11", "6/11"], None, None,
         "8/11", "multi_choice", "text"),
        ("2", "How many objects are left?", None, None, None, "7", "free_form", "integer"),
        ("3", "What is the length of the line?", None, "cm", 1.0, "2.5", "free_form", "float"),
        ("4", "What is the slope?", None, None, 2.0, "0.25", "free_form", "float"),
        ("5", "Between which two years is the peak?", None, None, None, "[2007, 2008]",
         "free_form", "list"),
    ]  # fmt: skip
    ds = _dataset(
        {
            "pid": [r[0] for r in rows],
            "question": [r[1] for r in rows],
            "image": [f"images/{r[0]}.jpg" for r in rows],
            "decoded_image": [tiny_image(80 + i) for i in range(len(rows))],
            "choices": [r[2] for r in rows],
            "unit": [r[3] for r in rows],
            "precision": [r[4] for r in rows],
            "answer": [r[5] for r in rows],
            "question_type": [r[6] for r in rows],
            "answer_type": [r[7] for r in rows],
            "metadata": [{"category": "math-targeted-vqa", "task": "figure question answering",
                          "grade": "high school", "skills": ["arithmetic reasoning"],
                          "split": "testmini"}] * len(rows),
            "query": [f"Hint: Please answer the question and provide the final answer at the end."
                      f"\nQuestion: {r[1]}" for r in rows],
        },
        {"pid": s, "question": s, "image": s, "decoded_image": datasets.Image(),
         "choices": datasets.Sequence(s), "unit": s, "precision": datasets.Value("float64"),
         "answer": s, "question_type": s, "answer_type": s,
         "metadata": {"category": s, "task": s, "grade": s, "skills": datasets.Sequence(s),
                      "split": s},
         "query": s},
    )  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    path = target / "testmini-00000-of-00001.parquet"
    ds.to_parquet(str(path))
    return path


def write_ocrbench(target: Path) -> Path:
    """echo840/OCRBench test schema as parquet (answer is a list)."""
    import datasets

    s = datasets.Value("string")
    ds = _dataset(
        {
            "dataset": ["IIIT5K", "HME100k", "textVQA"],
            "question": ["what is written in the image? ", "Please write out the expression.",
                         "what is the brand?"],
            "question_type": ["Regular Text Recognition",
                              "Handwritten Mathematical Expression Recognition",
                              "Scene Text-centric VQA"],
            "answer": [["CITY"], ["x ^ { 2 } + 1"], ["nokia", "Nokia"]],
            "image": [tiny_image(90 + i) for i in range(3)],
        },
        {"dataset": s, "question": s, "question_type": s, "answer": datasets.Sequence(s),
         "image": datasets.Image()},
    )  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(target / "test-00000-of-00001.parquet"))
    return target


_LETTER_ONLY = "Please answer directly with only the letter of the correct option and nothing else."
REALWORLDQA_QUESTIONS = [
    f"Which object is closer to the camera?\nA. The car\nB. The tree\nC. The sign\n{_LETTER_ONLY}",
    "How many lanes does the road have? Please answer directly with a single word or number.",
    f"Is the traffic light green?\nA. Yes\nB. No\n{_LETTER_ONLY}",
]


def write_realworldqa(target: Path) -> Path:
    """lmms-lab/RealWorldQA schema as jsonl + an images/ folder (image column = file name)."""
    (target / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (question, answer) in enumerate(zip(REALWORLDQA_QUESTIONS, ["A", "2", "B"])):
        tiny_image(100 + i).save(target / "images" / f"{i}.png")
        lines.append(json.dumps({"question": question, "answer": answer, "image": f"{i}.png"}))
    path = target / "test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_hallusionbench(target: Path) -> Path:
    """lmms-lab/HallusionBench schema: DatasetDict with ``image`` (4 rows) and ``non_image``."""
    import datasets

    s = datasets.Value("string")
    features = {
        "category": s, "subcategory": s, "visual_input": s, "set_id": s, "figure_id": s,
        "sample_note": s, "question_id": s, "question": s, "gt_answer_details": s,
        "gt_answer": s, "filename": s, "image": datasets.Image(),
    }  # fmt: skip

    def rows(n: int, with_image: bool, offset: int) -> dict[str, list[Any]]:
        return {
            "category": ["VD", "VD", "VS", "VS"][:n], "subcategory": ["illusion"] * n,
            "visual_input": ["1", "2", "1", "2"][:n] if with_image else ["0"] * n,
            "set_id": ["0", "0", "1", "1"][:n], "figure_id": ["0", "1", "0", "1"][:n],
            "sample_note": ["note"] * n, "question_id": ["0", "0", "1", "1"][:n],
            "question": ["Is the left line longer than the right one?"] * n,
            "gt_answer_details": ["The lines are equal."] * n,
            "gt_answer": ["0", "1", "1", "0"][:n], "filename": [f"f{offset + i}" for i in range(n)],
            "image": [tiny_image(offset + i) for i in range(n)] if with_image else [None] * n,
        }  # fmt: skip

    image = _dataset(rows(4, True, 110), features)
    non_image = _dataset(rows(1, False, 120), features)
    datasets.DatasetDict({"image": image, "non_image": non_image}).save_to_disk(str(target))
    return target


# DAM-QA data/ tree: one jsonl per key plus its images/ folder.
DAMQA_ROWS: dict[str, list[dict[str, Any]]] = {
    "chartqa/test_human.jsonl": [
        {"question_id": 0, "question": "How many bars are there?", "answer": "4"},
        {"question_id": 1, "question": "What is the value for 2019?", "answer": "12.5"},
    ],
    "chartqa/test_augmented.jsonl": [
        {"question_id": 0, "question": "Which year has the lowest value?", "answer": "2016"},
    ],
    "chartqapro/test.jsonl": [
        {"question_id": 0, "question": ["Which country leads?", "By how much?"],
         "answer": ["France", "3.2"], "question_type": "Conversational", "year": ["NO", "NO"]},
        {"question_id": 1, "question": ["What is the peak year?"], "answer": ["2019"],
         "question_type": "Factoid", "year": ["YES"]},
    ],
    "docvqa/val.jsonl": [
        {"question_id": 49153, "question": "What is the date?", "answer": ["1/8/93"]},
        {"question_id": 24580, "question": "Who signed?", "answer": ["J. Smith", "Smith"]},
    ],
    "infographicvqa/infographicvqa_val.jsonl": [
        {"question_id": 65718, "question": "Which country has the most users?",
         "answer": ["india"]},
    ],
    "textvqa/textvqa_val_updated.jsonl": [
        {"question_id": 34602, "question": "what brand is this?",
         "answer": [{"answer": "nokia", "answer_id": i} for i in range(10)]},
    ],
    "vqav2/vqav2_restval.jsonl": [
        {"question_id": 262148000, "question": "Where is he looking?",
         "answer": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(["down"] * 6 + ["at table"] * 4)]},
        {"question_id": 262148001, "question": "What is he doing?",
         "answer": [{"answer": "skateboarding", "answer_confidence": "yes", "answer_id": i + 1}
                    for i in range(10)]},
        {"question_id": 393225000, "question": "Is the bowl full?",
         "answer": [{"answer": a, "answer_confidence": "maybe", "answer_id": i + 1}
                    for i, a in enumerate(["no"] * 9 + ["yes"])]},
    ],
}  # fmt: skip
DAMQA_KEYS = {
    "chartqa_test_human": "chartqa/test_human.jsonl",
    "chartqa_test_augmented": "chartqa/test_augmented.jsonl",
    "chartqapro_test": "chartqapro/test.jsonl",
    "docvqa_val": "docvqa/val.jsonl",
    "infographicvqa_val": "infographicvqa/infographicvqa_val.jsonl",
    "textvqa_val": "textvqa/textvqa_val_updated.jsonl",
    "vqav2_restval": "vqav2/vqav2_restval.jsonl",
}


def write_damqa(root: Path) -> Path:
    """DAM-QA's ``data/`` tree: ``<dataset>/<file>.jsonl`` and ``<dataset>/images/<name>``."""
    seed = 200
    for relative, rows in DAMQA_ROWS.items():
        file = root / relative
        (file.parent / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for row in rows:
            seed += 1
            if "vqav2" in relative:
                name = f"COCO_val2014_{seed:012d}.jpg"  # DAM-QA keeps COCO file names
                tiny_image(seed).save(file.parent / "images" / name, format="JPEG")
            else:
                name = f"{file.stem}_{row['question_id']}.png"
                tiny_image(seed).save(file.parent / "images" / name)
            lines.append(json.dumps({**row, "image": name}))
        file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_all(root: Path) -> Fixtures:
    """Every fixture under ``root``; returns where each key's copy is and its row count."""
    fx = Fixtures(root)
    chartqa = write_chartqa(root / "chartqa")
    fx.paths["chartqa_test_human"] = chartqa
    fx.paths["chartqa_test_augmented"] = chartqa
    fx.rows["chartqa_test_human"] = fx.rows["chartqa_test_augmented"] = 3
    fx.paths["chartqapro_test"] = write_chartqapro(root / "chartqapro")
    fx.rows["chartqapro_test"] = len(CHARTQAPRO_ROWS)
    snapshot = write_docvqa_snapshot(root / "lmms-lab-DocVQA")
    fx.paths["docvqa_val"] = fx.paths["infographicvqa_val"] = snapshot
    fx.rows["docvqa_val"], fx.rows["infographicvqa_val"] = 4, 3
    fx.paths["textvqa_val"] = write_textvqa(root / "textvqa")
    fx.rows["textvqa_val"] = 3
    fx.damqa_root = write_damqa(root / "damqa" / "data")
    fx.damqa_rows = {key: len(DAMQA_ROWS[file]) for key, file in DAMQA_KEYS.items()}
    fx.paths["vqav2_restval"] = fx.damqa_root / "vqav2"
    fx.rows["vqav2_restval"] = 3
    fx.paths["mmbench_en_dev"] = write_mmbench(root / "mmbench")
    fx.rows["mmbench_en_dev"] = 5
    fx.paths["mmmu_val"] = write_mmmu(root / "mmmu")
    fx.rows["mmmu_val"] = 4
    fx.paths["mathvista_testmini"] = write_mathvista(root / "mathvista")
    fx.rows["mathvista_testmini"] = 5
    fx.paths["ocrbench"] = write_ocrbench(root / "ocrbench")
    fx.rows["ocrbench"] = 3
    fx.paths["realworldqa"] = write_realworldqa(root / "realworldqa")
    fx.rows["realworldqa"] = 3
    fx.paths["hallusionbench"] = write_hallusionbench(root / "hallusionbench")
    fx.rows["hallusionbench"] = 4
    fx.hub_chartqa = write_chartqa_hub(root / "hub" / "lmms-lab-ChartQA")
    return fx
