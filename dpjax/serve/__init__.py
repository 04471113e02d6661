"""Serving pruned variants: the KV-cache server and the throughput measurement."""
