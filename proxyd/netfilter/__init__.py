"""The netfilter layer every iptables-driven mode shares (kube-proxy's pkg/util/iptables).

``backend``: which iptables back end (legacy or nft) and running its tools
asynchronously; ``jumps``: the base-chain jump rules a mode needs;
``tables``: restores, jumps, canaries and their verification, cleanup;
``render`` and ``planning``: checked rule text (addresses, protocols) and the planner base shared by
the iptables and nftables planners.
"""

from proxyd.netfilter.backend import BACKENDS, Backend, IptablesError, chains_of, detect, run
from proxyd.netfilter.jumps import Jump, restore_lines, saved_jumps
from proxyd.netfilter.tables import CANARY, CANARY_TABLES, Netfilter, cleanup_everywhere, cleanup_inputs

__all__ = ["BACKENDS", "CANARY", "CANARY_TABLES", "Backend", "IptablesError", "Jump", "Netfilter",
           "chains_of", "cleanup_everywhere", "cleanup_inputs", "detect", "restore_lines", "run",
           "saved_jumps"]
