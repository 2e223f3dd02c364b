"""Where a ``--model`` comes from: the packaged nano, a family name, a folder, or a Hub id; and
whether a Hub id can be loaded now (:func:`hub_load_plan`), decided before any engine waits on
an unreachable Hub."""

from __future__ import annotations

from pathlib import Path

from vlmlab.hub import hub_access, missing_message, model_in_cache
from vlmlab.protocol.errors import ConfigError, NotFoundError

LOCAL_FIX = "Pass a checkpoint folder, or set HF_HUB_CACHE to a cache that holds it."


def resolve_model(model: str, variant: str | None = None) -> tuple[str, str | None]:
    """``(path or hub id, family hint)`` for ``nano``, a family name, a local path or a hub id.

    A family name picks the family's reference checkpoint, or with ``variant`` (``"hf"``: the
    transformers port of a native checkpoint, e.g. Pixtral's) the first checkpoint of that variant.

    Raises:
        NotFoundError: the packaged nano checkpoint is missing, or a path does not exist.
    """
    from vlmlab.families import FAMILIES
    from vlmlab.nano import checkpoint_path, is_nano

    if is_nano(model):
        path = checkpoint_path()
        if not (path / "config.json").exists():
            raise NotFoundError(
                f"the packaged nano checkpoint is missing at {path}; reinstall vlmlab or run "
                "`vlmlab nano train --export` to build one"
            )
        return str(path), "nano"
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve()), None
    if model.startswith((".", "/", "~")):
        raise NotFoundError(f"model path {model!r} does not exist")
    if "/" not in model and model in FAMILIES:
        family = FAMILIES.get(model)
        chosen = [c.hub_id for c in family.checkpoints if variant and c.options.get("variant") == variant]
        return (chosen or [family.checkpoint().hub_id])[0], family.name
    return model, None


def known_model_names() -> list[str]:
    """What ``--model`` accepts by name: nano's names, the families and their known checkpoints."""
    from vlmlab.families import FAMILIES
    from vlmlab.nano import MODEL_NAMES

    names = list(MODEL_NAMES)
    for name in FAMILIES.names():
        names.append(name)
        names += [c.hub_id for c in FAMILIES.get(name).checkpoints]
    return list(dict.fromkeys(names))


def hub_load_plan(model: str, source: str, revision: str | None = None, probe: str = "config.json") -> bool:
    """For a ``source`` that is a Hub id: whether the load must read the local cache only
    (``local_files_only``): the Hub does not answer, or offline mode is on. Asks the Hub at most
    once per process (:func:`vlmlab.hub.hub_access`). A local folder: False, nothing asked.
    ``probe``: the file whose presence in the cache means the checkpoint is there (a native
    Mistral checkpoint has params.json, not config.json).

    Raises:
        NotFoundError: the cache does not hold it and it cannot be downloaded now (one line: why,
            a close known name, the fix), in seconds rather than after the Hub's retries.
    """
    if Path(source).exists():
        return False
    access = hub_access()
    if not access.cache_only:
        return False
    if not model_in_cache(source, revision, probe):
        raise NotFoundError(missing_message("model", model, access, known_model_names(), LOCAL_FIX))
    return True


# The oldest transformers under which the nano checkpoint answers as trained: on 5.17 the same
# weights load but score 0.0 on `vlmlab eval --dataset synth --limit 40`, against 97.5 on every
# release from 5.18 to 5.25 (measured; the lower bound of the hf extra says the same).
NANO_MIN_TRANSFORMERS = "5.18"


def check_nano_transformers(installed: str | None = None) -> None:
    """Raises ConfigError when transformers (``installed``, default: the imported release) is too
    old to run nano correctly."""
    from packaging.version import Version

    if installed is None:
        import transformers

        installed = transformers.__version__
    if Version(installed) < Version(NANO_MIN_TRANSFORMERS):
        raise ConfigError(
            f"the nano model needs transformers>={NANO_MIN_TRANSFORMERS} (installed: {installed}, "
            f"on which it answers wrongly): pip install -U 'transformers>={NANO_MIN_TRANSFORMERS}', "
            "or install vlmlab from requirements/lock.txt"
        )
