"""proxyd: a node-local L4 service proxy that replaces kube-proxy."""

__version__ = "0.1.0"

# Before anything imports pyroute2: its package __init__ imports every module it has (IPDB, NDB and
# sqlite, wireless, plan9: ~20 MiB of RSS); proxyd uses IPRoute, Conntrack and a few message classes.
from proxyd import lazypkg as _lazypkg

_lazypkg.install("pyroute2", ("pyroute2",))
