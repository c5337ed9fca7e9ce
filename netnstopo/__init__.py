"""Throw-away networks of namespaces for proxyd's tests and benchmarks (``netnstopo.topology``).

Free of proxyd and of pytest, so that ``tests/`` and ``bench/`` both import
it without either importing the other.
"""
