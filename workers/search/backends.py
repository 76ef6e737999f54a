"""Where a version's shard groups live: one protocol, held in this process on threads or by Ray actors.

A `Searcher` (`workers/search/searcher.py`) asks all groups for candidates and the groups that
own some rows for their ids and scores; only these classes know where the groups are. Both give
the same arrays for the same version: a group's answers do not depend on which other shards it
holds (`ShardGroup.candidates` keeps its own best `n`, and the search merges them globally).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from workers.lake.credentials import StorageAccess
from workers.lake.dataset import DatasetVersion, open_version
from workers.ray_session import ctrl_c_held, init_ray
from workers.search.shard_group import ShardGroup
from workers.vocab import SearchIndex


# (keys, shard ordinals, rows, bit scores), each (queries, m): see `ShardGroup.candidates`.
Candidates = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class ShardGroups(Protocol):
    """Every shard of one version, held in groups; each shard (by ordinal) belongs to one group."""

    def candidates(self, q: np.ndarray, qbin: np.ndarray, n: int, asymmetric: bool,
                   ef_search: int | None, nprobe: int | None) -> Candidates:
        """Every group's best `n` candidates per query (`ShardGroup.candidates`), groups side by side."""

    def rescore(self, q: np.ndarray, mode: str, qidx: np.ndarray, shards: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(scores, ids, source rows) of candidates `(qidx, shard, row)`, aligned 1-D arrays in any
        order of shards; `mode` as `ShardGroup.rescore`."""

    def fetch(self, shards: np.ndarray, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(ids, source rows) of the rows `(shards[i], rows[i])`."""

    def resident_bytes(self) -> int:
        """Bytes of the indexes held in memory, over all groups."""

    def close(self) -> None:
        """Drop the groups and their local spills."""


def owned(owner: np.ndarray, shards: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(group, positions in `shards`) for each group owning some of `shards`; positions in order."""
    held = owner[shards] if len(shards) else np.zeros(0, np.int64)
    return [(int(g), np.nonzero(held == g)[0]) for g in np.unique(held)]


def side_by_side(parts: Sequence[Candidates], queries: int) -> Candidates:
    """The groups' candidate arrays concatenated along the candidates axis (no group: width 0)."""
    if not parts:
        return (np.zeros((queries, 0)), np.zeros((queries, 0), np.int64), np.zeros((queries, 0), np.int64),
                np.zeros((queries, 0), np.float32))
    return tuple(np.concatenate(x, axis=1) for x in zip(*parts))  # type: ignore[return-value]


def gathered(n: int, positions: Sequence[np.ndarray], answers: Sequence[tuple], scored: bool):
    """The groups' answers for their `positions` put back in one request's order of `n` entries:
    (scores, ids, source rows) when `scored`, else (ids, source rows)."""
    scores, ids, source_rows = np.zeros(n, np.float32), np.empty(n, object), np.zeros(n, np.int64)
    for at, answer in zip(positions, answers):
        if scored:
            scores[at], answer = answer[0], answer[1:]
        ids[at], source_rows[at] = answer
    return (scores, ids.tolist(), source_rows) if scored else (ids.tolist(), source_rows)


class ThreadShardGroups:
    """`ShardGroup`s in this process, one per thread: contiguous runs of shards of about equal
    rows (`balanced_bounds`); a request fans out over a thread pool.

    One group per thread rather than per shard: a group searches its flat-index shards as one
    FAISS index (`ShardGroup`), and each group a request visits costs a call on the pool, so a
    version of many small shards (a lake of many small files) is searched in a few calls per
    query, not one per shard.

    Args:
        groups: the groups, in shard order.
        owner: the group of each shard ordinal.
        threads: groups searched at once (1: one after another, no pool).
        cache_dir: the groups' spill folder, removed on close when not None (one this class made).
    """

    def __init__(self, groups: list[ShardGroup], owner: np.ndarray, threads: int, cache_dir: str | None = None):
        self.groups = groups
        self.owner = owner
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        # Removed by `close`, or when these groups are collected without it.
        self._remove_dir = weakref.finalize(self, shutil.rmtree, cache_dir, True) if cache_dir else None

    @classmethod
    def open(cls, ds: DatasetVersion, ranges: np.ndarray, index: SearchIndex, *, threads: int | None = None,
             cache_dir: str | None = None) -> "ThreadShardGroups":
        """Load every shard of `ds` (indexes checked against their sha256), `threads` at a time.

        Args:
            ds, ranges, index: as `ShardGroup`.
            threads: groups (searched at once) and shards loaded at once, at least
                SHARD_LOADS_AT_ONCE over a network (default: the CPUs this process may use).
            cache_dir: local folder for decoded shard columns (default: a temporary one, removed
                on close).
        """
        threads = threads or len(os.sched_getaffinity(0))
        own = cache_dir is None
        if not own:  # said now, naming the option, rather than at the first query's spill
            try:
                os.makedirs(cache_dir, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"cache_dir {cache_dir!r} is no folder this process can write in "
                                 f"({type(exc).__name__}: {exc})") from None
            if not os.access(cache_dir, os.W_OK):
                raise ValueError(f"cache_dir {cache_dir!r} is no folder this process can write in (not writable)")
        cache_dir = tempfile.mkdtemp(prefix="quantlake-search-") if own else cache_dir
        bounds = balanced_bounds([s.rows for s in ds.shards], threads) if ds.shards else [0]
        owner = np.zeros(len(ds.shards), np.int64)
        groups: list[ShardGroup] = []
        try:
            for g, (a, b) in enumerate(zip(bounds, bounds[1:])):
                owner[a:b] = g
                # The group's shards load `threads` at a time (over a network, at least
                # SHARD_LOADS_AT_ONCE: their round trips overlap).
                groups.append(ShardGroup(ds, range(a, b), ranges, index, cache_dir, threads=threads))
        except BaseException:
            for group in groups:
                group.close()
            if own:
                shutil.rmtree(cache_dir, ignore_errors=True)
            raise
        return cls(groups, owner, threads, cache_dir if own else None)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> ShardGroup:
        return self.groups[g]

    def __iter__(self):
        return iter(self.groups)

    def _each(self, calls: list[Callable[[], Any]]) -> list:
        """Results of the calls, in order; run on the pool when there is more than one."""
        if self._pool is None or len(calls) < 2:
            return [c() for c in calls]
        return list(self._pool.map(lambda c: c(), calls))

    def candidates(self, q, qbin, n, asymmetric, ef_search, nprobe) -> Candidates:
        return side_by_side(self._each([lambda g=g: g.candidates(q, qbin, n, asymmetric, ef_search, nprobe)
                                        for g in self.groups]), len(q))

    def rescore(self, q, mode, qidx, shards, rows):
        split = owned(self.owner, shards)
        answers = self._each([lambda g=g, at=at: self.groups[g].rescore(q, mode, qidx[at], shards[at], rows[at])
                              for g, at in split])
        return gathered(len(rows), [at for _, at in split], answers, scored=True)

    def fetch(self, shards, rows):
        split = owned(self.owner, shards)
        answers = self._each([lambda g=g, at=at: self.groups[g].fetch(shards[at], rows[at]) for g, at in split])
        return gathered(len(rows), [at for _, at in split], answers, scored=False)

    def resident_bytes(self) -> int:
        return sum(g.resident_bytes() for g in self.groups)

    def close(self) -> None:
        for g in self.groups:
            g.close()
        if self._pool is not None:
            self._pool.shutdown()
        if self._remove_dir is not None:
            self._remove_dir()


class RayShardGroups:
    """Shard groups held by Ray actors, contiguous runs of shards of about equal rows; a request
    goes to every actor (candidates) or to those owning its rows, all at once.

    Args:
        actors: handles of `ShardGroupActor` actors, by group.
        owner: the group of each shard ordinal.
        access: the `StorageAccess` the actors read their options through (kept alive with them).
        started: whether opening started Ray (then `close` stops it).
    """

    def __init__(self, actors: list, owner: np.ndarray, access: StorageAccess | None, started: bool):
        self.actors, self.owner = actors, owner
        self._access, self._started = access, started

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None, version: int, shard_rows: Sequence[int],
             ranges: np.ndarray, index: SearchIndex, *, actors: int | None = None, actor_cpus: float = 1.0,
             ray_address: str | None = None) -> "RayShardGroups":
        """Split the shards of version `version` of `url` over `actors` actors (default: one per CPU).

        Uses the running Ray instance, else joins `ray_address` (or RAY_ADDRESS), else starts a
        local one (`workers/ray_session.py` has the rule); `close()` stops what it started. An actor
        that cannot open its shards fails this call, not the first query.

        Args:
            url, storage_options: the dataset (the actors open it again: no filesystem is pickled).
            version: the version the driver opened and checked.
            shard_rows: rows of each shard, in the version's order (balances the groups).
            ranges, index: as `ShardGroup`.
            actor_cpus: CPUs each actor reserves.
        """
        import ray

        started = init_ray(ray_address)
        groups = None
        try:
            n = max(1, min(len(shard_rows), actors or int(ray.cluster_resources().get("CPU", 1))))
            bounds = balanced_bounds(list(shard_rows), n)
            actor_cls = ray.remote(num_cpus=actor_cpus)(ShardGroupActor)
            # Actors get the storage options the way ingest tasks do, through the object store
            # (workers/lake/credentials.py says why): actor arguments are kept in Ray's task specs.
            access = StorageAccess.put(storage_options)
            handles, owner = [], np.zeros(len(shard_rows), np.int64)
            for g, (a, b) in enumerate(zip(bounds, bounds[1:])):
                owner[a:b] = g
                handles.append(actor_cls.remote(url, access, version, list(range(a, b)), ranges, index))
            groups = cls(handles, owner, access, started)
            try:
                groups.resident_bytes()  # surfaces an actor's failure to open its shards now
            except ray.exceptions.RayActorError as exc:
                raise RuntimeError(f"a search actor could not open its shards: {exc}") from None
            return groups
        except BaseException:
            if groups is not None:
                groups._started = False  # stopped below, once
                groups.close()
            if started and ray.is_initialized():
                ray.shutdown()
            raise

    def candidates(self, q, qbin, n, asymmetric, ef_search, nprobe) -> Candidates:
        import ray

        return side_by_side(ray.get([a.candidates.remote(q, qbin, n, asymmetric, ef_search, nprobe)
                                     for a in self.actors]), len(q))

    def rescore(self, q, mode, qidx, shards, rows):
        import ray

        split = owned(self.owner, shards)
        answers = ray.get([self.actors[g].rescore.remote(q, mode, qidx[at], shards[at], rows[at])
                           for g, at in split])
        return gathered(len(rows), [at for _, at in split], answers, scored=True)

    def fetch(self, shards, rows):
        import ray

        split = owned(self.owner, shards)
        answers = ray.get([self.actors[g].fetch.remote(shards[at], rows[at]) for g, at in split])
        return gathered(len(rows), [at for _, at in split], answers, scored=False)

    def resident_bytes(self) -> int:
        import ray

        return sum(ray.get([a.resident_bytes.remote() for a in self.actors]))

    def close(self) -> None:
        import ray

        try:
            ray.get([a.close.remote() for a in self.actors])  # each actor removes its local spill
        except ray.exceptions.RayError:
            pass  # a dead actor cannot clean up: its spill folder stays in the temporary folder
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._started and ray.is_initialized():
            with ctrl_c_held():  # whole, or a Ctrl-C leaves Ray half stopped (`ctrl_c_held`)
                ray.shutdown()
        self._started = False


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


def balanced_bounds(rows: list[int], n: int) -> list[int]:
    """Split shards, kept in order, into `n` contiguous runs of about equal row counts: the runs'
    first ordinals, then the shard count."""
    cum = np.cumsum([0] + list(rows))
    cuts = [int(np.searchsorted(cum, cum[-1] * i / n, side="left")) for i in range(1, n)]
    return sorted(set([0] + [min(max(c, 1), len(rows) - 1) for c in cuts] + [len(rows)]))
