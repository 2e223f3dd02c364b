from __future__ import annotations

import pytest

from vlmlab.families import FAMILIES, get_family
from vlmlab.plan import PlanInput, format_bytes, parse_bytes, parse_size, plan, plan_family
from vlmlab.protocol.errors import ConfigError, NotFoundError, UnknownOptionError


def test_parse_bytes_and_sizes() -> None:
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("16G") == 16 * 2**30
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    with pytest.raises(ConfigError, match="cannot read memory size '24 parsecs'"):
        parse_bytes("24 parsecs")
    assert parse_size("1920x1080") == (1920, 1080)
    assert parse_size("640 × 480") == (640, 480)
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
        parse_size("1920-1080")
    with pytest.raises(ConfigError, match="at least 1x1"):
        parse_size("0x10")
    assert format_bytes(1536) == "1.5 KiB"


def test_pixtral_row_matches_hand_arithmetic() -> None:
    spec = PlanInput(images=[(1920, 1080)], prompt_tokens=64, max_tokens=256, gpu_mem=80 * 2**30)
    (row,) = plan(["pixtral"], spec)
    tokens = 36 * (64 + 1)  # 1920x1080 -> 1024x576 -> 36 rows of 64 patches + a break/end each
    assert row.image_tokens == (tokens,) and row.grids == ("36x64",)
    assert row.prompt_tokens == 64 + tokens and row.request_tokens == 64 + tokens + 256
    kv_per_token = 2 * 40 * 8 * 128 * 2
    assert row.kv_bytes_per_token == kv_per_token == 163_840
    assert row.kv_bytes_per_request == row.request_tokens * kv_per_token
    ckpt = get_family("pixtral").checkpoint()
    assert row.weight_bytes == ckpt.params * 2
    free = 80 * 2**30 * 0.9 - row.weight_bytes
    assert row.concurrent_requests == int(free // row.kv_bytes_per_request) and row.fits_gpu
    assert row.fits_context and row.max_model_len == 131_072


def test_context_and_gpu_fit_flip_at_their_limits() -> None:
    fam = get_family("pixtral")
    tokens = fam.image_tokens(1024, 1024)  # 4160
    fits = plan_family(fam, PlanInput(images=[(1024, 1024)], prompt_tokens=0, max_tokens=0, max_model_len=tokens))
    over = plan_family(fam, PlanInput(images=[(1024, 1024)], prompt_tokens=1, max_tokens=0, max_model_len=tokens))
    assert fits.fits_context and not over.fits_context
    small_gpu = plan_family(fam, PlanInput(images=[(64, 64)], gpu_mem=24 * 2**30))
    assert small_gpu.fits_gpu is False and small_gpu.concurrent_requests == 0  # 25 GB of bf16 weights
    int4 = plan_family(fam, PlanInput(images=[(64, 64)], gpu_mem=24 * 2**30, dtype="int4"))
    assert int4.weight_bytes == fam.checkpoint().params // 2 and int4.fits_gpu


def test_all_models_and_option_scoping() -> None:
    rows = plan(["all"], PlanInput(images=[(1920, 1080)], options={"variant": "hf"}))
    assert [r.family for r in rows] == FAMILIES.names()
    nano = next(r for r in rows if r.family == "nano")
    assert "option variant not used by nano" in nano.notes
    with pytest.raises(UnknownOptionError, match="unknown option 'num_crop' for model family 'pixtral'"):
        plan(["pixtral"], PlanInput(images=[(10, 10)], options={"num_crop": 4}))
    with pytest.raises(NotFoundError, match="unknown model family 'gpt5'"):
        plan(["gpt5"], PlanInput(images=[(10, 10)]))
    with pytest.raises(ConfigError, match="unknown dtype 'bf17'"):
        plan(["pixtral"], PlanInput(images=[(10, 10)], dtype="bf17"))


def test_hub_id_selects_its_checkpoint() -> None:
    (row,) = plan(["mistral-community/pixtral-12b"], PlanInput(images=[(3000, 1502)]))
    assert row.checkpoint == "mistral-community/pixtral-12b"
    assert row.image_tokens == (2080,)  # the HF port's checkpoint default variant is "hf"


def test_too_many_images_is_noted() -> None:
    fam = get_family("nano")
    row = plan_family(fam, PlanInput(images=[(64, 64)] * (fam.max_images + 1)))
    assert any("exceed" in n for n in row.notes)
