"""The embedding core: texts to float32 embeddings (encoder) and embeddings to codes (quantizer).

Queries are encoded and quantized exactly like documents, so both subsystems use this one
package. It knows nothing of storage: it imports neither `workers.lake`, `workers.ingest`
nor `workers.search`.
"""
