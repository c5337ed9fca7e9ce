"""Benchmarks for proxyd: ``python -m bench`` compares every proxy mode with HAProxy and the direct path.

``harness`` runs the whole thing; the other modules each do one job (see
their docstrings). Run them from the repository root as modules
(``python -m bench``, ``python -m bench.sync_scale``, ``python -m
bench.conntable``) so that ``bench``, ``netnstopo`` (the namespace topology
shared with the tests) and ``proxyd`` import without any path patching.
"""
