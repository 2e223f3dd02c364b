"""Image-affinity routing for ``vlmlab serve --ray``: a Ray Serve request router.

Each replica keeps its own preprocessing and vision-encoder caches, so an image's second request
is cheap only on the replica that answered its first. The front (``vlmlab.server.ray_serve``)
passes each request's image keys (hashes of its image URLs or data URLs) as the ``images``
keyword; this router sends a request to the replica that last answered one of its images, unless
that replica has more than ``imbalance`` requests in flight above the least busy one. Requests
with no known image (and ``mode="default"``) take Ray Serve's own procedure: two random
replicas, the one with the shorter queue (the base class probes the queues).

The ``replica`` keyword sends a request to one named replica (the front's fan-out for ``/stats``
and ``/metrics``). Routers run in the process holding the deployment handle, so that process's
front finds the live replicas and the routing figures here, in :data:`ROUTERS`.

The idea is Ray Serve LLM's ``PrefixCacheAffinityRouter`` (text prefixes); this one keys images.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

# application name -> the router of its replicas' deployment handle in this process.
ROUTERS: dict[str, ImageAffinityRouter] = {}
# Image keys remembered (each maps to the replica that last saw it); the oldest go first.
MAX_KEYS = 65536


class ImageAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """See the module docstring. ``request_router_kwargs``: ``mode`` (``affinity`` or
    ``default``) and ``imbalance`` (requests in flight)."""

    def initialize_state(self, mode: str = "affinity", imbalance: int = 4, **kwargs: Any) -> None:
        self.mode = mode
        self.imbalance = imbalance
        self.owners: OrderedDict[str, ReplicaID] = OrderedDict()
        self.in_flight: dict[ReplicaID, int] = {}
        # affinity: routed to the replica holding an image; moved: the holder was too busy;
        # spread: no image seen before (or none at all, or the default mode).
        self.counts = {"affinity": 0, "moved": 0, "spread": 0}
        # Through the imported module, not this function's globals: Ray ships the class to the
        # handle by value (cloudpickle), with a copy of the module's globals.
        import vlmlab.server.ray_router as module

        module.ROUTERS[self.app_name] = self

    # -- what the front asks ------------------------------------------------------------------

    def replica_ids(self) -> list[str]:
        """The live replicas' ids, for the front's fan-out."""
        return sorted(r.unique_id for r in self.curr_replicas)

    def figures(self) -> dict[str, Any]:
        routed = sum(self.counts.values())
        return {
            "router": self.mode,
            "replicas": len(self.curr_replicas),
            "imbalance": self.imbalance,
            "images_known": len(self.owners),
            "routed": dict(self.counts),
            "affinity_rate": round(self.counts["affinity"] / routed, 4) if routed else None,
            "in_flight": {r.unique_id: n for r, n in self.in_flight.items() if r in self.curr_replicas},
        }

    # -- Ray Serve's router interface ---------------------------------------------------------

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        target = kwargs.get("replica")
        if target:  # fan-out: that replica or none (a dead one's request fails, not moves)
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        keys = kwargs.get("images") or ()
        if self.mode == "affinity" and keys:
            owner = self._owner(keys, candidate_replicas)
            if owner is not None:
                least = min(self.in_flight.get(r.replica_id, 0) for r in candidate_replicas)
                if self.in_flight.get(owner.replica_id, 0) - least <= self.imbalance:
                    pending_request.routing_context.vlmlab_route = "affinity"  # type: ignore[union-attr]
                    return [[owner], self._two(candidate_replicas)]
                pending_request.routing_context.vlmlab_route = "moved"  # type: ignore[union-attr]
        return [self._two(candidate_replicas)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        if pending_request.kwargs.get("replica"):
            return  # a fan-out call is not a routing decision
        route = getattr(pending_request.routing_context, "vlmlab_route", "spread")
        if route == "affinity" and self._owner(pending_request.kwargs.get("images") or (), None) != replica_id:
            route = "moved"  # the holder was full, a second choice took it
        self.counts[route] += 1
        for key in pending_request.kwargs.get("images") or ():
            self.owners[key] = replica_id
            self.owners.move_to_end(key)
        while len(self.owners) > MAX_KEYS:
            self.owners.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.in_flight.get(replica_id, 0) > 0:
            self.in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id, None)
        for key in [k for k, owner in self.owners.items() if owner == replica_id]:
            del self.owners[key]  # its caches died with it

    # -- helpers ------------------------------------------------------------------------------

    def _owner(self, keys: Any, candidates: list[RunningReplica] | None) -> Any:
        """The replica that saw most of ``keys`` (among ``candidates``, when given)."""
        votes: dict[ReplicaID, int] = {}
        for key in keys:
            owner = self.owners.get(key)
            if owner is not None:
                votes[owner] = votes.get(owner, 0) + 1
        if not votes:
            return None
        best = max(votes, key=votes.__getitem__)
        if candidates is None:
            return best
        return next((r for r in candidates if r.replica_id == best), None)

    @staticmethod
    def _two(candidates: list[RunningReplica]) -> list[RunningReplica]:
        """Power of two choices: two random replicas; the base class takes the shorter queue."""
        return random.sample(candidates, min(2, len(candidates)))
