"""The ftdiloco lighthouse: decides, for every outer step, which replica groups take part.

It imports no torch, so the daemon starts in well under a second.
"""

from ftwire.messages import Member, Quorum
from lighthouse.quorum import QuorumConfig, QuorumCore

__all__ = ["Member", "Quorum", "QuorumConfig", "QuorumCore"]
