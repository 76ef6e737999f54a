"""The lake: storage primitives, typed records, versions and commits, the checked reader, credentials.

Everything that moves bytes to and from a dataset root lives here. It uses `ranges/` (the
range manifest format) and `workers.vocab`, never `workers.ingest`, `workers.search` or
`workers.embedding`.
"""
