"""vlmlab nano: the embedded tiny VLM (synthetic tasks, builder, trainer, evaluator, checkpoint).

Importing this package is cheap: torch and transformers are imported only by ``build``,
``train`` and ``evaluate``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


# What a user may type for the packaged model (``--model nano``).
MODEL_NAMES = ("nano", "vlmlab/nano", "vlmlab-nano")


def is_nano(model: str) -> bool:
    """Whether ``model`` names the packaged nano model."""
    return model.lower() in MODEL_NAMES


def checkpoint_path() -> Path:
    """The packaged nano checkpoint directory (``vlmlab/nano/checkpoint``, shipped as package data).

    Outputs: the path; it may lack weights in a source tree where no checkpoint was exported yet
    (``(path / "config.json").exists()`` tells).
    """
    # importlib.resources, not the source tree: the same call finds it in an installed wheel.
    return Path(str(resources.files(__name__) / "checkpoint"))
