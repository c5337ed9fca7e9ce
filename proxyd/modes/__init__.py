"""Proxy modes: each realises the shared desired state its own way."""
