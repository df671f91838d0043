"""Harnesses for tests and benchmarks that need real processes (not used by the product)."""
