"""A bounded, thread-safe LRU cache with hit/miss counters.

Used for the preprocessing and encoder caches (tensors, bounded by bytes) and the response cache
(deterministic answers, bounded by bytes and by entries). ``budget == 0`` turns a cache off.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

V = TypeVar("V")


def content_key(*parts: Any) -> str:
    """A stable sha256 of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CacheStats:
    queries: int = 0
    hits: int = 0
    entries: int = 0
    size: int = 0
    budget: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "hit_rate": round(self.hit_rate, 4)}


class LRUCache(Generic[V]):
    """LRU over ``budget`` units; ``sizeof(value)`` gives a value's units (1 = count entries).

    An entry larger than the whole budget is not stored.
    """

    def __init__(
        self,
        budget: int,
        sizeof: Callable[[V], int] = lambda _: 1,
        name: str = "cache",
        max_entries: int | None = None,
    ):
        self.name = name
        self.budget = max(0, budget)
        self.max_entries = max_entries
        self.sizeof = sizeof
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats(budget=self.budget)

    @property
    def enabled(self) -> bool:
        return self.budget > 0 and self.max_entries != 0

    def get(self, key: str) -> V | None:
        """The value for ``key`` (marking it most recently used), counting a query and a hit."""
        if not self.enabled:
            return None
        with self._lock:
            self.stats.queries += 1
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, value: V) -> None:
        if not self.enabled:
            return
        size = self.sizeof(value)
        if size > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.stats.size -= old[1]
            self._items[key] = (value, size)
            self.stats.size += size
            while self.stats.size > self.budget or (
                self.max_entries is not None and len(self._items) > self.max_entries
            ):
                _, (_, evicted) = self._items.popitem(last=False)
                self.stats.size -= evicted
                self.stats.evictions += 1
            self.stats.entries = len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.stats.size = self.stats.entries = 0
