"""Data: shard writing and streaming, synthetic shapes, transforms, tokenization."""
