"""Which worker of the next stage gets a micro-batch, and when the pipeline pauses.

The rules are pure functions (tested exhaustively without a process):

- :func:`routing_weights`: SWARM's rule.  Each live worker of the next stage
  is chosen with probability proportional to the throughput it measured
  itself (micro-batches per second of its own compute, sent back with every
  answer).  A worker that has not answered yet gets the mean of the known
  rates, so a worker that joins starts receiving work at once rather than
  after someone happens to try it.  Workers this sender saw fail are left out
  until the lighthouse no longer lists them (a restart has a new address).
- :func:`choose`: one draw from those weights with a uniform number in [0, 1).
- :func:`pipeline_pause`: the reason the pipeline cannot move, or None.

:class:`PeerList` is the I/O around them: it keeps a room's live workers
fresh by polling the lighthouse's ``/rooms/<name>/v1/peers`` (a worker that
dies leaves that list the moment its liveness socket closes), plus the
failures this process saw itself, which drop a worker at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from ftwire import guard, protocol

# What a worker adds to its join info so that the previous stage can reach it.
INFO_ADDRESS = "swarm"


@dataclass(frozen=True)
class Peer:
    """A live worker of a stage, as its room's lighthouse lists it."""

    replica_id: str
    address: str


def routing_weights(
    peers: Sequence[Peer], rates: Mapping[str, float], failed: frozenset[str] = frozenset()
) -> dict[str, float]:
    """Each usable peer's share of the next micro-batches (they sum to 1; {} if none).

    ``rates``: measured micro-batches per second by address; an address
    without one (a worker that just joined) gets the mean of the others, or 1.
    ``failed``: addresses this sender saw fail; they get nothing.
    """
    usable = [p.address for p in peers if p.address not in failed]
    known = [rates[a] for a in usable if rates.get(a, 0.0) > 0.0]
    default = sum(known) / len(known) if known else 1.0
    raw = {a: rates[a] if rates.get(a, 0.0) > 0.0 else default for a in usable}
    total = sum(raw.values())
    return {a: r / total for a, r in raw.items()}


def choose(weights: Mapping[str, float], u: float) -> str:
    """The address whose cumulative share first exceeds ``u`` (in [0, 1)), in sorted order.

    Sorting makes the draw depend on the weights alone, not on the order the
    lighthouse listed the workers in.
    """
    if not weights:
        raise ValueError("no worker to choose from")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    ordered = sorted(weights)
    total = 0.0
    for address in ordered:
        total += weights[address]
        if u < total:
            return address
    return ordered[-1]  # rounding left u just above the last cumulative sum


def pipeline_pause(live: Mapping[int, int]) -> str | None:
    """Why the pipeline is paused, given the live workers of each stage; None: it runs.

    The first stage with no live worker is named, since every micro-batch
    must pass it.
    """
    for stage in sorted(live):
        if live[stage] < 1:
            return f"stage {stage} has no live worker: the pipeline is paused until one returns"
    return None


class PeerList:
    """The live workers of one room, refreshed from its lighthouse at most every ``every`` s.

    Runs on the caller's event loop.  ``note_failed`` drops an address at
    once, until the lighthouse stops listing it (a restarted worker listens
    on a new address and is used as soon as it is listed).
    """

    def __init__(
        self,
        room_url: str,
        session: aiohttp.ClientSession,
        token: str | None,
        every: float = 0.2,
    ) -> None:
        self.room_url = room_url.rstrip("/")
        self._session = session
        self._headers = guard.authorization(token) if token else {}
        self._every = every
        self._fetched = float("-inf")
        self.peers: tuple[Peer, ...] = ()  # those that take micro-batches (with an address)
        self.alive = 0  # every live member of the room (the first stage takes none)
        self.failed: set[str] = set()

    async def refresh(self, *, now: bool = False) -> tuple[Peer, ...]:
        """The room's live workers; asks the lighthouse if the last answer is stale."""
        if now or time.monotonic() - self._fetched >= self._every:
            try:
                async with self._session.get(
                    f"{self.room_url}/v1/peers",
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=5.0),
                ) as response:
                    body = await response.read()
                    if response.status != 200:
                        code, message = protocol.decode_error(body)
                        raise RuntimeError(f"{self.room_url}: {response.status} {code}: {message}")
                listing = protocol.unpack(body)
                self.peers = _decode_peers(listing)
                self.alive = len(protocol.read_field(listing, "peers", list))
                listed = {p.address for p in self.peers}
                self.failed &= listed  # forgotten once the lighthouse forgot them
            except (aiohttp.ClientError, TimeoutError, protocol.ProtocolError):
                pass  # keep the last list; the lighthouse client itself reports outages
            self._fetched = time.monotonic()
        return self.peers

    def note_failed(self, address: str) -> None:
        self.failed.add(address)

    async def wait_listed(self, deadline: float) -> None:
        """Sleep one refresh period (bounded by ``deadline``, a monotonic time)."""
        await asyncio.sleep(max(0.0, min(self._every, deadline - time.monotonic())))


def _decode_peers(message: Mapping[str, object]) -> tuple[Peer, ...]:
    peers = []
    for entry in protocol.read_field(message, "peers", list):
        if not isinstance(entry, dict):
            raise protocol.ProtocolError("a peer must be a map")
        info = protocol.read_field(entry, "info", dict, {})
        address = info.get(INFO_ADDRESS)
        if isinstance(address, str) and address:
            peers.append(Peer(protocol.replica_id(entry), address))
    return tuple(peers)
