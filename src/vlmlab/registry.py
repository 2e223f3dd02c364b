"""One generic registry for families, engines, datasets and metrics.

Entries are registered under a canonical name plus aliases. A target may be the object itself or
a lazy ``"module:attr"`` string that is imported on first lookup, so that registering the vLLM
engine does not import vLLM. Duplicate names fail at registration; unknown names fail with the
list of valid ones.
"""

from __future__ import annotations

import difflib
import re
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from vlmlab.protocol.errors import ConfigError, NotFoundError

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """Lower-case and drop separators so ``Phi-3.5-Vision`` and ``phi3_5_vision`` compare."""
    return re.sub(r"[-_. ]", "", name.strip().lower())


class Registry(Generic[T]):
    """A named collection of ``T`` (or lazy ``"module:attr"`` strings that resolve to ``T``).

    Args:
        kind: what the entries are, used in error messages ("model family", "dataset").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, T | str] = {}
        self._aliases: dict[str, str] = {}  # normalized alias -> canonical name

    def register(self, name: str, target: T | str, aliases: tuple[str, ...] = ()) -> None:
        """Add ``target`` under ``name`` and ``aliases``.

        Raises:
            ConfigError: if the name or an alias is already taken by another entry.
        """
        if name in self._targets:
            raise ConfigError(f"duplicate {self.kind} name {name!r}")
        keys = {normalize_name(name)} | {normalize_name(a) for a in aliases}
        for key in keys:
            owner = self._aliases.get(key)
            if owner is not None and owner != name:
                raise ConfigError(
                    f"{self.kind} alias {key!r} of {name!r} is already used by {owner!r}"
                )
        self._targets[name] = target
        for key in keys:
            self._aliases[key] = name

    def canonical(self, name: str) -> str:
        """The canonical name for ``name`` or one of its aliases.

        Raises:
            NotFoundError: naming the unknown value and listing the valid names.
        """
        key = normalize_name(name)
        canonical = self._aliases.get(key)
        if canonical is None:
            valid = ", ".join(self.names())
            # Every entry a prefix names ("chartqa": both ChartQA splits and ChartQAPro), else the
            # closest spelling; at most three.
            close = [a for a in self._aliases if key and a.startswith(key)]
            close = close or difflib.get_close_matches(key, list(self._aliases), n=1)
            names = list(dict.fromkeys(self._aliases[a] for a in close))[:3]
            hint = f" Did you mean {' or '.join(repr(n) for n in names)}?" if names else ""
            raise NotFoundError(f"unknown {self.kind} {name!r}.{hint} Available: {valid}")
        return canonical

    def get(self, name: str) -> T:
        """The entry for ``name`` (or an alias), importing a lazy target on first use."""
        canonical = self.canonical(name)
        target = self._targets[canonical]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            resolved = getattr(importlib.import_module(module_name), attr)
            self._targets[canonical] = resolved
            return resolved
        return target

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_name(name) in self._aliases

    def names(self) -> list[str]:
        """Canonical names, in registration order."""
        return list(self._targets)

    def aliases_of(self, name: str) -> list[str]:
        canonical = self.canonical(name)
        return sorted(k for k, v in self._aliases.items() if v == canonical)

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)
