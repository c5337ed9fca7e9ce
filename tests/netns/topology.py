"""The tests' name for ``netnstopo.topology`` (the namespace topology shared with ``bench/``)."""

from netnstopo.topology import *  # noqa: F403
