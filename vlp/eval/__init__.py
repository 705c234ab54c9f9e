"""Evaluation: zero-shot classification and retrieval metrics (CLIP_benchmark definitions)."""
