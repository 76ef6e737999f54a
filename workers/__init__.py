"""quantlake's workers: three subsystems and the core they share, each a package.

- `workers.embedding`: the encoder and the quantizer (documents and queries alike); no storage.
- `workers.lake`: storage primitives, the typed records (work unit, shard record, version
  manifest), versions and commits, the checked reader, credentials and redaction.
- `workers.ingest`: source, scan, planning, the Ray pipeline and its per-unit steps, shard building.
- `workers.search`: the searcher, its shard groups (threads or Ray actors) and the scoring math.

Dependency rule (tests/test_layout.py holds the code to it): ingest and search use lake and
embedding, never each other; lake and embedding use neither ingest nor search, nor each
other; `ranges/` uses nothing of workers. `workers.vocab` (names) and `workers.ray_session`
(joining or starting Ray) are shared by all.
"""
