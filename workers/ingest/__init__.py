"""Ingest: list and scan the source, plan work units, run the Ray pipeline, build shards.

Uses `workers.lake` (storage, records, commits) and `workers.embedding` (encoder, quantizer);
never `workers.search`.
"""
