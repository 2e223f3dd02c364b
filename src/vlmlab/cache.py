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
        self._making: dict[str, threading.Event] = {}  # keys a thread is computing (claimed)
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
            found = self._hit(key)
        return found[0] if found is not None else None

    def get_or_claim(self, key: str, wait_s: float = 120.0) -> tuple[V | None, bool]:
        """The value for ``key``, waiting for it while another thread computes it (a hit either
        way): ``(value, False)``. Otherwise ``(None, True)``: the caller computes it, ``put``s it,
        and must call :meth:`release` whatever happens. ``(None, False)``: compute it without a
        claim (the cache is off, or the thread computing it failed or took over ``wait_s``).

        Concurrent requests for one image then cost one preprocessing, not one each."""
        if not self.enabled:
            return None, False
        with self._lock:
            self.stats.queries += 1
            found = self._hit(key)
            if found is not None:
                return found[0], False
            making = self._making.get(key)
            if making is None:
                self._making[key] = threading.Event()
                return None, True
        making.wait(wait_s)
        with self._lock:
            found = self._hit(key)
        return (found[0], False) if found is not None else (None, False)

    def release(self, key: str) -> None:
        """End a claim of :meth:`get_or_claim` (after ``put``, or after a failure)."""
        with self._lock:
            making = self._making.pop(key, None)
        if making is not None:
            making.set()

    def _hit(self, key: str) -> tuple[V] | None:
        """Under the lock: the value as a 1-tuple (a value may be falsy), counted as a hit."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return (item[0],)

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
