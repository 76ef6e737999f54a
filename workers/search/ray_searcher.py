"""Search with Ray: actors each hold a group of shards, and every query fans out to all of them."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from workers.vocab import SearchIndex
from workers.lake.credentials import StorageAccess
from workers.lake.dataset import open_version
from workers.ray_session import init_ray
from workers.search.searcher import Searcher, open_checked
from workers.search.shard_group import ShardGroup


class RaySearcher(Searcher):
    """The same search, with shard groups held by Ray actors: a query fans out to every actor."""

    @classmethod
    def open(cls, url: str, version: int | None = None, storage_options: Mapping[str, Any] | None = None,
             model: str | None = None, *, index: SearchIndex = "binary",
             actors: int | None = None, actor_cpus: float = 1.0, ray_address: str | None = None) -> "RaySearcher":
        """Open a version with its shards split over `actors` Ray actors (default: one per CPU).

        Uses the running instance, else joins `ray_address` (or RAY_ADDRESS), else starts a
        local one (`workers/ray_session.py` has the rule); `close()` stops what it started.
        Other arguments as `Searcher.open`.
        """
        import ray

        started = init_ray(ray_address)
        try:
            ds, ranges, name = open_checked(url, version, storage_options, model)
            doc, shards = ds.manifest, ds.shards
            n = max(1, min(len(shards), actors or int(ray.cluster_resources().get("CPU", 1))))
            bounds = _balanced_bounds([s.rows for s in shards], n)
            actor_cls = ray.remote(num_cpus=actor_cpus)(ShardGroupActor)
            # Actors get the storage options the way ingest tasks do, through the object store
            # (workers/lake/credentials.py says why): actor arguments are kept in Ray's task specs.
            access = StorageAccess.put(storage_options)
            groups, owner = [], np.zeros(len(shards), np.int64)
            for g, (a, b) in enumerate(zip(bounds, bounds[1:])):
                owner[a:b] = g
                groups.append(actor_cls.remote(url, access, ds.version, list(range(a, b)), ranges.ranges, index))
            searcher = cls(url, storage_options, doc, ranges, name, groups, owner, 1, index)
            searcher._started = started
            searcher._access = access  # the options object lives as long as the actors may need it
            try:
                searcher.resident_bytes()  # surfaces an actor's failure to open its shards now
            except ray.exceptions.RayActorError as exc:
                searcher.close()
                raise RuntimeError(f"a search actor could not open its shards: {exc}") from None
            return searcher
        except BaseException:
            if started and ray.is_initialized():
                ray.shutdown()
            raise

    def _map(self, calls):
        import ray

        return ray.get([getattr(g, m).remote(*a) for g, m, a in calls])

    def close(self) -> None:
        import ray

        try:
            ray.get([g.close.remote() for g in self._groups])  # each actor removes its local spill
        except ray.exceptions.RayError:
            pass  # a dead actor cannot clean up: its spill folder stays in the temporary folder
        for g in self._groups:
            ray.kill(g)
        self._groups = []
        if getattr(self, "_started", False) and ray.is_initialized():
            ray.shutdown()


class ShardGroupActor(ShardGroup):
    """A shard group opened inside its actor from the URL: no filesystem (or credentials) is pickled.

    Args:
        url, version: the dataset and the version the driver opened.
        access: `StorageAccess` through which the actor fetches the storage options.
        ordinals, ranges, index: as `ShardGroup`.
    """

    def __init__(self, url: str, access: StorageAccess, version: int, ordinals: list[int], ranges: np.ndarray,
                 index: str):
        super().__init__(open_version(url, version, access.options()), ordinals, ranges, index)


def _balanced_bounds(rows: list[int], n: int) -> list[int]:
    """Split shards, kept in order, into `n` contiguous runs of about equal row counts."""
    cum = np.cumsum([0] + list(rows))
    cuts = [int(np.searchsorted(cum, cum[-1] * i / n, side="left")) for i in range(1, n)]
    bounds = sorted(set([0] + [min(max(c, 1), len(rows) - 1) for c in cuts] + [len(rows)]))
    return bounds
