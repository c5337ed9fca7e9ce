"""proxyd: a node-local L4 service proxy that replaces kube-proxy."""

__version__ = "0.1.0"
