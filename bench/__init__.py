"""Benchmarks for repage: synthetic FLTR-shaped stores and measurements against them."""
