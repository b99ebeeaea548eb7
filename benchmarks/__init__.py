"""Reproducible benchmarks (``make bench``): the serving table, engine-vs-CBM, deploy latency."""
