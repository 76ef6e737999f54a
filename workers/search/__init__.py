"""Search: open a committed version, hold its shards in groups (threads or Ray actors), score, merge.

Uses `workers.lake` (the checked reader) and `workers.embedding` (query encoder and
quantizer); never `workers.ingest`.
"""
