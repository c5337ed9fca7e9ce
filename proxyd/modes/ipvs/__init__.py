"""ipvs proxy mode: services realised by the kernel's IP Virtual Server, as kube-proxy's ipvs mode.

``planner`` (pure: state → virtual servers, real servers, ipset entries,
iptables rules), ``applier`` (pyroute2 IPVS/IPSet/IPRoute and
iptables-restore, on a worker thread), ``graceful`` (drain removed real
servers before deleting them), ``mode`` (``IpvsMode``: diff-based sync,
adoption on restart, cleanup). See docs/ipvs.md.
"""

from proxyd.modes.ipvs.mode import IpvsMode

__all__ = ["IpvsMode"]
