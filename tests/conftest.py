"""Hermetic tests: no VLMLAB_* / HF_* settings leak in, and Hugging Face stays offline."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("VLMLAB_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
