"""Executing graphs: the reference executor, KV cache, generation and multi-rank runs."""
