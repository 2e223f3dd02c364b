"""Backends behind one small interface (:mod:`vlmlab.engines.base`), looked up by name.

Targets are lazy ``"module:Class"`` strings so that listing engines imports neither torch nor
vLLM; each backend imports its heavy library only when it loads.
"""

from __future__ import annotations

import dataclasses

from vlmlab.config import EngineSpec
from vlmlab.engines.base import (
    Capabilities,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptCount,
    complete,
)
from vlmlab.protocol.errors import ConfigError
from vlmlab.registry import Registry

ENGINES: Registry[type[Engine]] = Registry("engine")
ENGINES.register("hf", "vlmlab.engines.hf.engine:HFEngine", aliases=("transformers",))
ENGINES.register("remote", "vlmlab.engines.remote.engine:RemoteEngine", aliases=("openai", "openai-compatible"))
ENGINES.register("vllm", "vlmlab.engines.vllm.engine:VLLMEngine")
ENGINES.register("mlx", "vlmlab.engines.mlx.engine:MLXEngine", aliases=("mlx-vlm",))
ENGINES.register("llamacpp", "vlmlab.engines.llamacpp.engine:LlamaCppEngine", aliases=("llama.cpp", "llama-cpp", "gguf"))
ENGINES.register("mistral", "vlmlab.engines.mistral.engine:MistralEngine", aliases=("mistral-inference",))


def load_engine(spec: EngineSpec) -> Engine:
    """Load ``spec.model`` with the backend named by ``spec.engine``."""
    engine = ENGINES.get(spec.engine)
    if spec.data_parallel_size == "auto" and engine.name not in ("hf", "llamacpp"):
        spec = dataclasses.replace(spec, data_parallel_size=1)  # the others parallelise inside
    if spec.data_parallel_size != 1 and engine.name not in ("hf", "llamacpp"):
        raise ConfigError(
            f"data_parallel_size {spec.data_parallel_size}: only the hf and llamacpp engines run model copies themselves; "
            f"for {engine.name} use its own option (vLLM: --data-parallel-size of vllm serve) or set 1"
        )
    return engine.load(spec)


def check_model(spec: EngineSpec) -> None:
    """Loads nothing; raises :class:`~vlmlab.protocol.errors.NotFoundError` now (in seconds) when
    ``spec.model`` cannot load: a path that does not exist, or a Hub id neither in the cache nor
    downloadable. Commands that load several models check them all before loading the first.
    A remote engine's model is its server's business: not checked."""
    from vlmlab.engines.sources import hub_load_plan, resolve_model

    name = ENGINES.canonical(spec.engine)
    if name == "remote":
        return
    source, _ = resolve_model(spec.model, variant="hf" if name == "hf" else None)
    if name == "llamacpp":  # a GGUF repository has no config.json; its files are fetched by name at load
        return
    # A native Mistral checkpoint (the mistral engine's) has params.json instead of config.json.
    hub_load_plan(spec.model, source, spec.revision, probe="params.json" if name == "mistral" else "config.json")


__all__ = [
    "ENGINES",
    "Capabilities",
    "Engine",
    "EngineInfo",
    "EngineSpec",
    "GenerationRequest",
    "PromptCount",
    "check_model",
    "complete",
    "load_engine",
]
