"""The benchmark registry: one module per dataset, looked up by its key.

``DATASETS`` maps each key (DAM-QA's text-rich keys, the general benchmarks, and the offline
``synth``) to its :class:`~vlmlab.eval.types.DatasetSpec`; modules are imported on first lookup.
:func:`load_samples` reads a spec from the Hub or a local copy and reports what it read.

==========================  ===========================================  =======  ==============
key                         Hub id (config) / split                       rows     metric
==========================  ===========================================  =======  ==============
chartqapro_test             ahmed-masry/ChartQAPro / test                 1,948    chartqapro
chartqa_test_human          lmms-lab/ChartQA / test, type=human_test      1,250    relaxed_accuracy
chartqa_test_augmented      lmms-lab/ChartQA / test, type=augmented_test  1,250    relaxed_accuracy
docvqa_val                  lmms-lab/DocVQA (DocVQA) / validation         5,349    anls
infographicvqa_val          lmms-lab/DocVQA (InfographicVQA) / validation 2,801    anls
textvqa_val                 lmms-lab/textvqa / validation                 5,000    vqa_accuracy
vqav2_restval               DAM-QA vqav2_restval.jsonl (local only)       5,077    vqa_accuracy
mmbench_en_dev              lmms-lab/MMBench (en) / dev                   4,377    mmbench_circular
mmmu_val                    lmms-lab/MMMU / validation                    900      mmmu
mathvista_testmini          AI4Math/MathVista / testmini                  1,000    mathvista
ocrbench                    echo840/OCRBench / test                       1,000    ocrbench
realworldqa                 lmms-lab/RealWorldQA / test                   765      mcq
hallusionbench              lmms-lab/HallusionBench / image               951      hallusion
synth                       vlmlab.nano.tasks (generated)                 500      exact_match
==========================  ===========================================  =======  ==============
"""

from __future__ import annotations

from vlmlab.eval.datasets.loading import DatasetInfo, load_samples, size_warning
from vlmlab.eval.types import DatasetSpec
from vlmlab.registry import Registry

__all__ = ["DATASETS", "DatasetInfo", "get_dataset", "load_samples", "size_warning"]

DATASETS: Registry[DatasetSpec] = Registry("dataset")

_PKG = "vlmlab.eval.datasets"
for _key, _target, _aliases in (
    ("chartqapro_test", "chartqapro:SPEC", ("chartqapro", "ahmed-masry/ChartQAPro")),
    ("chartqa_test_human", "chartqa:HUMAN", ("chartqa_human",)),
    ("chartqa_test_augmented", "chartqa:AUGMENTED", ("chartqa_augmented",)),
    ("docvqa_val", "docvqa:SPEC", ("docvqa",)),
    ("infographicvqa_val", "infographicvqa:SPEC", ("infographicvqa", "infovqa", "infovqa_val")),
    ("textvqa_val", "textvqa:SPEC", ("textvqa",)),
    ("vqav2_restval", "vqav2:SPEC", ()),
    ("mmbench_en_dev", "mmbench:SPEC", ("mmbench", "mmbench_en", "mmbench_dev_en")),
    ("mmmu_val", "mmmu:SPEC", ("mmmu", "mmmu_validation")),
    ("mathvista_testmini", "mathvista:SPEC", ("mathvista", "mathvista_mini")),
    ("ocrbench", "ocrbench:SPEC", ("ocrbench_v1", "echo840/OCRBench")),
    ("realworldqa", "realworldqa:SPEC", ("realworld_qa", "rwqa")),
    ("hallusionbench", "hallusionbench:SPEC", ("hallusion_bench", "hallusionbench_image")),
    ("synth", "synth:SPEC", ("nano", "nano_synth")),
):
    DATASETS.register(_key, f"{_PKG}.{_target}", aliases=_aliases)


def get_dataset(key: str) -> DatasetSpec:
    """The spec registered under ``key`` (or one of its aliases).

    Raises:
        NotFoundError: unknown key; the message lists every registered key.
    """
    return DATASETS.get(key)
