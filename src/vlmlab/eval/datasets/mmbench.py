"""MMBench English dev (key ``mmbench_en_dev``), with CircularEval's shifted copies.

Hub: ``lmms-lab/MMBench`` config ``en`` split ``dev``: ``index``, ``question``, ``hint``,
``A``-``D``, ``answer`` (a letter), ``category``, ``image``, ``source``, ``L2-category``, ``comment``,
``split``. 4,377 rows (``lmms-lab/MMBench_EN`` card: ``dev num_examples: 4377``; the viewer shows
4.38k) = 1,164 questions plus their option rotations; ``index >= 1e6`` marks a rotation and
``index % 1e6`` is the question it belongs to (lmms-eval ``mmbench_evals.py::eval_result``).

Prompts:
- ``default``: lmms-eval ``en_utils.py::mmbench_doc_to_text`` -- ``{hint} {question} {options}``
  (hint left out when missing or ``"nan"``), options ``There are several options:\\nA. ...``
  (metadata ``sys_prompt`` of ``mmbench.yaml``, empty options skipped), then ``"\\n" +
  post_prompt`` where post_prompt is ``\\nAnswer with the option's letter from the given choices
  directly.`` (so a blank line precedes it). 1,024 tokens (``_default_template_mmbench_en_yaml``).
- ``vlmevalkit``: ``ImageMCQDataset.build_prompt`` (``Hint:`` / ``Question:`` / ``Options:`` /
  ``Please select the correct answer from the options above. \\n``).
Metric: CircularEval over the rotations (dataset-level aggregate), per category / L2-category.
"""

from __future__ import annotations

import math

from vlmlab.eval.datasets.base import Benchmark, Row, as_rgb, is_missing, text
from vlmlab.eval.datasets.prompts import image_then, profiles, vlmevalkit_mcq
from vlmlab.eval.types import EvalSample

OPTION_KEYS = ("A", "B", "C", "D", "E")  # lmms-eval option_candidate
SYS_PROMPT = "There are several options:"  # lmms-eval mmbench.yaml metadata.sys_prompt
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
CIRCULAR_BASE = 1_000_000  # rotated copies have index >= 1e6 (mmbench_evals.py)


def _lmms_eval_text(sample: EvalSample) -> str:
    options = "\n".join(f"{k}. {v}" for k, v in sample.fields["options"].items())
    options_prompt = f"{SYS_PROMPT}\n{options}".rstrip("\n")
    hint = sample.fields.get("hint")
    if hint is not None:
        query = f"{hint} {sample.question} {options_prompt}"
    else:
        query = f"{sample.question} {options_prompt}"
    return f"{query}\n{POST_PROMPT}"


def _vlmevalkit_text(sample: EvalSample) -> str:
    return vlmevalkit_mcq(sample.question, sample.fields["options"], sample.fields.get("hint"))


def from_row(row: Row, index: int) -> EvalSample:
    official = int(row["index"])
    options = {k: str(row[k]) for k in OPTION_KEYS if k in row and not is_missing(row[k])}
    l2 = row.get("L2-category", row.get("l2-category"))
    # lmms-eval keeps any hint that is not NaN/"nan" (an empty one too); so does VLMEvalKit.
    raw_hint = row.get("hint")
    nan = (
        raw_hint is None
        or raw_hint == "nan"
        or (isinstance(raw_hint, float) and math.isnan(raw_hint))
    )
    hint = None if nan else str(raw_hint)
    return EvalSample(
        id=str(official),
        images=[as_rgb(row["image"], f"mmbench {official} image")],
        question=text(row["question"]),
        answers=[text(row["answer"])],
        fields={
            "index": official,
            "circular_group": official % CIRCULAR_BASE,
            "options": options,
            "choices": list(options.values()),
            "hint": hint,
            "category": text(row.get("category")),
            "l2_category": text(l2),
            "source": text(row.get("source")),
        },
    )


SPEC = Benchmark(
    key="mmbench_en_dev",
    hf_id="lmms-lab/MMBench",
    hf_config="en",
    split="dev",
    expected_rows=4377,
    metric="mmbench_circular",
    default_mode="official",
    max_tokens=1024,  # lmms-eval _default_template_mmbench_en_yaml max_new_tokens
    from_row=from_row,
    prompts=profiles(default=image_then(_lmms_eval_text), vlmevalkit=image_then(_vlmevalkit_text)),
    source=(
        "lmms-lab/MMBench en dev (size from the lmms-lab/MMBench_EN card); prompts: lmms-eval "
        "mmbench en_utils.py + mmbench_evals.py, VLMEvalKit image_mcq.py"
    ),
)
