"""Image-affinity routing for ``vlmlab serve --ray``: a Ray Serve request router.

Each replica keeps its own preprocessing and vision-encoder caches, so an image's second request
is cheap only on the replica that answered its first. The front (``vlmlab.server.ray_serve``)
passes each request's image keys (hashes of its image URLs or data URLs) as the ``images``
keyword. This router remembers which replicas answered each image (its holders) and sends a
request to the least busy holder of its image, unless that one has more than ``imbalance``
requests in flight above the least busy replica: then the least busy replica takes it and
becomes a holder too (a hot image ends up on several replicas instead of bouncing between them).
A new image goes to the less busy of two random replicas, decided at once so that its next
requests follow it even while this one is being sent. In-flight counts are this router's own.
Requests without images (and every request with ``mode="default"``) take Ray Serve's own
procedure: two random replicas, the one with the shorter queue (the base class probes them).

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
# Image keys remembered (each maps to the replicas that answered it); the oldest go first.
MAX_KEYS = 65536


class ImageAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """See the module docstring. ``request_router_kwargs``: ``mode`` (``affinity`` or
    ``default``) and ``imbalance`` (requests in flight)."""

    def initialize_state(self, mode: str = "affinity", imbalance: int = 4, **kwargs: Any) -> None:
        self.mode = mode
        self.imbalance = imbalance
        self.owners: OrderedDict[str, list[ReplicaID]] = OrderedDict()  # image key -> replicas holding it
        self.in_flight: dict[ReplicaID, int] = {}
        self.fan_outs: set[str] = set()  # internal ids of /stats, /metrics, /health calls in flight
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
        if self.mode != "affinity" or not keys:
            return [self._two(candidate_replicas)]  # Ray Serve's own procedure
        load = {r.replica_id: self.in_flight.get(r.replica_id, 0) for r in candidate_replicas}
        least = min(load.values())
        holders = [r for r in candidate_replicas if r.replica_id in self._holders(keys)]
        if holders:
            best = min(holders, key=lambda r: load[r.replica_id])
            if load[best.replica_id] - least <= self.imbalance:
                route, chosen = "affinity", best
            else:  # the holders are too busy: the least busy replica takes it (and holds it next)
                route, chosen = "moved", min(candidate_replicas, key=lambda r: load[r.replica_id])
        else:  # a new image: power of two choices on the requests in flight, decided here so
            # that its next requests, even those routed before this one is sent, follow it
            route, chosen = "spread", min(self._two(candidate_replicas), key=lambda r: load[r.replica_id])
            for key in keys:
                self._hold(key, chosen.replica_id)
        pending_request.routing_context.vlmlab_route = (route, chosen.replica_id)  # type: ignore[union-attr]
        others = sorted((r for r in candidate_replicas if r is not chosen), key=lambda r: load[r.replica_id])
        return [[chosen], others] if others else [[chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        if pending_request.kwargs.get("replica"):  # a fan-out call is neither load nor a decision
            self.fan_outs.add(pending_request.metadata.internal_request_id)
            return
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        route, chosen = getattr(pending_request.routing_context, "vlmlab_route", ("spread", replica_id))
        self.counts["moved" if route == "affinity" and chosen != replica_id else route] += 1
        for key in pending_request.kwargs.get("images") or ():
            self._hold(key, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if internal_request_id in self.fan_outs:
            self.fan_outs.discard(internal_request_id)
            return
        if self.in_flight.get(replica_id, 0) > 0:
            self.in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id, None)
        for key, holders in list(self.owners.items()):  # its caches died with it
            if replica_id in holders:
                holders.remove(replica_id)
                if not holders:
                    del self.owners[key]

    # -- helpers ------------------------------------------------------------------------------

    def _holders(self, keys: Any) -> set[ReplicaID]:
        """The replicas holding the first of ``keys`` that any replica holds."""
        for key in keys:
            found = self.owners.get(key)
            if found:
                return set(found)
        return set()

    def _hold(self, key: str, replica_id: ReplicaID) -> None:
        holders = self.owners.setdefault(key, [])
        if replica_id not in holders:
            holders.append(replica_id)
        self.owners.move_to_end(key)
        while len(self.owners) > MAX_KEYS:
            self.owners.popitem(last=False)

    @staticmethod
    def _two(candidates: list[RunningReplica]) -> list[RunningReplica]:
        """Power of two choices: two random replicas; the base class takes the shorter queue."""
        return random.sample(candidates, min(2, len(candidates)))
