from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmlab.families import FAMILIES
from vlmlab.recommend import PUBLISHED, Requirements, parse_requirements, ranked, read_results, recommend
from vlmlab.protocol.errors import ConfigError


def eligible(picks):
    return [p for p in picks if not p.excluded]


def test_every_published_score_belongs_to_a_known_checkpoint_and_has_a_source() -> None:
    from vlmlab.recommend import SOURCES

    known = {c.hub_id for name in FAMILIES for c in FAMILIES.get(name).checkpoints}
    assert set(PUBLISHED) <= known and set(PUBLISHED) == set(SOURCES)


def test_requirements_filter_and_order() -> None:
    everything = recommend(Requirements())
    assert all(not p.excluded for p in everything)
    scores = [p.score for p in eligible(everything) if p.score is not None]
    assert scores == sorted(scores, reverse=True)
    small = recommend(Requirements(max_params_b=5))
    assert all(p.params_b <= 5 for p in eligible(small))
    assert {p.checkpoint for p in small if p.excluded} >= {"mistralai/Pixtral-12B-2409", "Qwen/Qwen2-VL-72B-Instruct"}
    multi = recommend(Requirements(multi_image=True, images_per_request=2))
    assert "llava-hf/llava-v1.6-mistral-7b-hf" not in {p.checkpoint for p in eligible(multi)}
    tight = recommend(Requirements(gpu_mem=8 * 2**30))
    assert all(p.params_b * 2 < 8 * 0.9 * 1.074 for p in eligible(tight))  # bf16 weights must fit
    ocr = eligible(recommend(Requirements(ocr=True)))
    assert ocr[0].checkpoint == max(PUBLISHED, key=lambda k: sum(PUBLISHED[k].get(b, 0) for b in ("docvqa", "textvqa", "ocrbench", "chartqa")) / max(1, sum(b in PUBLISHED[k] for b in ("docvqa", "textvqa", "ocrbench", "chartqa"))))


def test_measured_results_override_published_scores(tmp_path: Path) -> None:
    (tmp_path / "nano").mkdir()
    (tmp_path / "nano" / "docvqa_val.summary.json").write_text(json.dumps({"dataset": "docvqa_val", "model": "HuggingFaceM4/idefics2-8b", "score": 0.99}))
    measured = read_results(tmp_path)
    assert measured == {"HuggingFaceM4/idefics2-8b": {"accuracy": {"docvqa_val": 0.99}}}
    first = eligible(recommend(Requirements(ocr=True), measured))[0]
    assert first.checkpoint == "HuggingFaceM4/idefics2-8b" and "your eval: docvqa_val 99.0" in first.line()


def test_parse_requirements_and_rows() -> None:
    req = parse_requirements(8, "24GiB", True, True, "1920x1080", "bf16")
    assert req.gpu_mem == 24 * 2**30 and req.images_per_request == 2 and req.image == (1920, 1080)
    with pytest.raises(ConfigError, match="--max-params must be positive"):
        parse_requirements(0, None, False, False, "10x10", "bf16")
    rows = ranked(recommend(req))
    assert rows[0]["rank"] == 1 and rows[-1]["rank"] is None and rows[0]["why"]
