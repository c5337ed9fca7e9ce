"""Integration tests in network namespaces: real kernel, real sockets, the real daemon."""
