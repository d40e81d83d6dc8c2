"""Metrics only: perplexity, latency, tensor bytes, significance tests (no method is imported here)."""
