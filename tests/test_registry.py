from __future__ import annotations

import pytest

from vlmlab.protocol.errors import ConfigError, NotFoundError
from vlmlab.registry import Registry, normalize_name


def test_aliases_and_separators_resolve_to_the_canonical_name() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("phi3_5_vision", 35, aliases=("microsoft/Phi-3.5-vision-instruct",))
    assert reg.get("Phi-3.5-Vision") == 35
    assert reg.get("microsoft/phi-3.5-vision-instruct") == 35
    assert reg.canonical("PHI3.5 vision") == "phi3_5_vision"
    assert "phi3-5-vision" in reg and "phi4" not in reg
    assert normalize_name(" A-b.c d_e ") == "abcde"


def test_unknown_name_lists_the_valid_ones_and_suggests_the_closest() -> None:
    reg: Registry[int] = Registry("dataset")
    reg.register("chartqa_test_human", 1)
    reg.register("docvqa_val", 2)
    with pytest.raises(NotFoundError) as info:
        reg.get("chartqa")
    message = str(info.value)
    assert "unknown dataset 'chartqa'" in message
    assert "chartqa_test_human, docvqa_val" in message
    assert "Did you mean 'chartqa_test_human'?" in message
    reg.register("chartqa_test_augmented", 3)
    with pytest.raises(NotFoundError, match="Did you mean 'chartqa_test_human' or 'chartqa_test_augmented'[?]"):
        reg.get("chartqa")  # a prefix of both: both, not just the first registered


def test_duplicates_fail() -> None:
    reg: Registry[int] = Registry("engine")
    reg.register("hf", 1, aliases=("transformers",))
    with pytest.raises(ConfigError, match="duplicate engine name 'hf'"):
        reg.register("hf", 2)
    with pytest.raises(ConfigError, match="alias 'transformers' of 'other' is already used by 'hf'"):
        reg.register("other", 3, aliases=("Transformers",))


def test_lazy_targets_import_on_first_lookup() -> None:
    reg: Registry[object] = Registry("function")
    reg.register("dumps", "json:dumps")
    import json

    assert reg.get("dumps") is json.dumps
    assert reg.names() == ["dumps"] and len(reg) == 1
