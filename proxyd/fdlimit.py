"""The process's descriptor limit: lifted once to the hard limit, for the daemon and userspace mode."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one, as Go programs (kube-proxy) get by default.

    Userspace mode needs it most: every connection costs two sockets and two
    pipes. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # a number to budget with (Linux caps descriptors at fs.nr_open anyway)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as err:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, err)
    return soft
