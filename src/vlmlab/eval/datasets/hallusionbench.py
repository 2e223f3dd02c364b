"""HallusionBench, image part (key ``hallusionbench``).

Hub: ``lmms-lab/HallusionBench`` split ``image``, 951 rows (``non_image`` has 178 more; VLMEvalKit's
TSV is the same 951): ``category`` (VD / VS), ``subcategory``, ``visual_input``, ``set_id``,
``figure_id``, ``sample_note``, ``question_id``, ``question``, ``gt_answer_details``,
``gt_answer`` (``"1"`` yes / ``"0"`` no), ``filename``, ``image``.

Prompt: the question as is (lmms-eval ``evaluate_hb.py::hb_doc_to_text`` with empty pre/post
prompts, 128 tokens from ``hallusion_bench_image.yaml``; VLMEvalKit's default Y/N prompt is the
same text -- its " Please answer yes or no." is a per-model override for Qwen-style models).
Metric: aAcc per question, fAcc per figure (category, subcategory, set_id, figure_id), qAcc per
question across figures (category, subcategory, set_id, question_id): a dataset-level aggregate.
"""

from __future__ import annotations

from vlmlab.eval.datasets.base import Benchmark, Row, as_rgb, text
from vlmlab.eval.datasets.prompts import image_then, profiles
from vlmlab.eval.types import EvalSample

YES_NO = {"1": "yes", "0": "no"}  # HallusionBench gt_answer encoding


def from_row(row: Row, index: int) -> EvalSample:
    category, sub = text(row["category"]), text(row["subcategory"])
    set_id, figure_id, question_id = (str(row[k]) for k in ("set_id", "figure_id", "question_id"))
    sample_id = f"{category}_{sub}_{set_id}_{figure_id}_{question_id}"  # unique (get_eval_all)
    gt = text(row["gt_answer"])
    return EvalSample(
        id=sample_id,
        images=[as_rgb(row["image"], f"hallusionbench {sample_id} image")],
        question=text(row["question"]),
        answers=[YES_NO.get(gt, gt)],
        fields={
            "category": category,
            "subcategory": sub,
            "set_id": set_id,
            "figure_id": figure_id,
            "question_id": question_id,
            "visual_input": text(row.get("visual_input")),
            "gt_answer": gt,
            "gt_answer_details": text(row.get("gt_answer_details")),
            "figure_key": f"{category}_{sub}_{set_id}_{figure_id}",
            "question_key": f"{category}_{sub}_{set_id}_{question_id}",
        },
    )


SPEC = Benchmark(
    key="hallusionbench",
    hf_id="lmms-lab/HallusionBench",
    split="image",
    expected_rows=951,
    metric="hallusion",
    default_mode="official",
    max_tokens=128,  # lmms-eval hallusion_bench_image.yaml max_new_tokens
    from_row=from_row,
    prompts=profiles(
        default=image_then(lambda s: s.question), vlmevalkit=image_then(lambda s: s.question)
    ),
    source="lmms-lab/HallusionBench image split; prompt: lmms-eval hallusion_bench evaluate_hb.py",
)
