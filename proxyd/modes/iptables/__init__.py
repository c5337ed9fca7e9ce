"""iptables mode: kube-proxy's iptables proxier (``mode``), its pure ``planner`` and its ``applier``.

Each sync turns the desired state into one iptables-restore transaction
(``planner``), applies it through the shared netfilter layer (``applier``,
``proxyd.netfilter``) and then deletes stale UDP conntrack entries
(``conntrack``). ``mode`` describes the sync cycle.
"""

from proxyd.modes.iptables.mode import IptablesMode

__all__ = ["IptablesMode"]
