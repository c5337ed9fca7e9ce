"""nftables mode (``--proxy-mode nftables``): see ``mode`` for the life cycle, ``layout`` for the ruleset."""

from proxyd.modes.nftables.mode import NftablesMode

__all__ = ["NftablesMode"]
