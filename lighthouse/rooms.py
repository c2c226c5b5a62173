"""Several independent quorums ("rooms") served by one lighthouse daemon.

A DiLoCo-SWARM job needs one quorum per pipeline stage, and operators often
want several small jobs on one lighthouse.  A room is a whole
:class:`LighthouseServer` core -- its own members, quorum ids, history rules,
status page, dashboard and metrics -- mounted under ``/rooms/<name>/`` of the
daemon's one aiohttp application.  A replica group joins a room by using that
prefix as its lighthouse URL (``http://host:29510/rooms/stage0``), so the
client and the Manager need no change; a plain job keeps using the root, which
stays the default room exactly as before.

Rooms are declared when the daemon starts (``lighthouse --rooms
stage0,stage1``), not created by a first join: a mistyped room name then gets
a 404 naming the rooms that exist, instead of a lonely quorum that never
meets its peers.  Every room shares the daemon's settings (min replicas,
timeouts, token).

Each room also answers ``GET /rooms/<name>/v1/peers`` (token required): its
live replicas and what each told its peers with its join
(``Manager.set_join_info``).  Pipeline stages route work to the workers of
the next stage through it, and a worker whose process dies disappears from it
at once (its liveness socket closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from ftwire import guard
from ftwire.messages import DATA_INFO, Member
from ftwire.protocol import ROOM_NAME, ROOMS_PATH
from lighthouse.quorum import QuorumCore
from lighthouse.server import LighthouseServer, ServerConfig


def parse_rooms(text: str) -> tuple[str, ...]:
    """``"stage0,stage1"`` -> the room names, checked (URL-safe, unique, at most 64 chars)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("give at least one room name")
    for name in names:
        if not ROOM_NAME.fullmatch(name):
            raise ValueError(
                f"room name {name!r} must be 1-64 letters, digits, '_', '.' or '-',"
                " starting with a letter or digit"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"room names repeat: {text!r}")
    return names


def room_url(lighthouse: str, room: str) -> str:
    """The lighthouse URL a replica of ``room`` uses (its join, liveness, status)."""
    return f"{lighthouse.rstrip('/')}{ROOMS_PATH}{room}"


def live_members(core: QuorumCore) -> list[Member]:
    """The replicas of a core that are alive now, as they last joined, by replica id.

    A member of the last quorum or a waiting joiner counts while the core
    still sees it alive; the newest join wins over the quorum's copy.
    """
    alive = core.last_seen()
    latest: dict[str, Member] = {}
    if core.previous is not None:
        latest.update((m.replica_id, m) for m in core.previous.members)
    latest.update((rid, member) for rid, (member, _) in core.joiners().items())
    return [latest[rid] for rid in sorted(latest) if rid in alive]


class _Room(LighthouseServer):
    """One room: a full lighthouse core whose shutdown request stops the whole daemon."""

    def __init__(self, name: str, config: ServerConfig, daemon: RoomsLighthouse) -> None:
        super().__init__(config)
        self.name = name
        self._daemon = daemon

    def request_stop(self) -> None:
        # POST /rooms/<name>/v1/shutdown: the operator means the daemon, not one room.
        self._daemon.request_stop()

    async def peers(self, request: web.Request) -> web.Response:
        guard.authorize(request, self.config.token)
        return guard.reply(
            request,
            {
                "room": self.name,
                "peers": [
                    {"replica_id": m.replica_id, "step": m.step, "info": m.data.get(DATA_INFO, {})}
                    for m in live_members(self.core)
                ],
            },
        )


class _LabelledByRoom:
    """A Prometheus collector: the daemon's own series unchanged, every room's with ``room``.

    Families of the same name merge, so each metric has one HELP and TYPE.
    """

    def __init__(self, root: CollectorRegistry, rooms: dict[str, _Room]) -> None:
        self._parts: list[tuple[str | None, CollectorRegistry]] = [(None, root)]
        self._parts += [(name, room.registry) for name, room in rooms.items()]

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for room, registry in self._parts:
            for family in registry.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    labels = sample.labels if room is None else {**sample.labels, "room": room}
                    into.samples.append(sample._replace(labels=labels))
        return merged.values()


class RoomsLighthouse(LighthouseServer):
    """The daemon with named rooms besides its default (root) quorum."""

    def __init__(self, config: ServerConfig, rooms: Sequence[str]) -> None:
        if config.lease is not None:
            raise ValueError("rooms and --lease cannot be combined yet: give one or the other")
        super().__init__(config)
        self.rooms = {name: _Room(name, config, self) for name in parse_rooms(",".join(rooms))}
        self._all = CollectorRegistry(auto_describe=False)
        self._all.register(_LabelledByRoom(self.registry, self.rooms))

    def serve_on(self, app: web.Application) -> None:
        super().serve_on(app)
        for name, room in self.rooms.items():
            sub = web.Application(client_max_size=self.config.max_body_bytes)
            room.serve_on(sub)
            sub.router.add_get("/v1/peers", room.peers)
            app.add_subapp(f"{ROOMS_PATH}{name}", sub)
        app.router.add_route("*", ROOMS_PATH + "{name}/{tail:.*}", self._no_such_room)
        app.router.add_route("*", ROOMS_PATH + "{name}", self._no_such_room)

    async def _no_such_room(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in self.rooms:  # the room exists: the path under it does not
            raise guard.Refused(404, "not_found", f"room {name} has no {request.path}")
        raise guard.Refused(
            404, "no_such_room", f"no room {name!r}; this lighthouse has {', '.join(self.rooms)}"
        )

    async def stop(self) -> None:
        # The rooms first: their waiting joins are answered while the daemon still listens.
        await asyncio.gather(*(LighthouseServer.stop(room) for room in self.rooms.values()))
        await super().stop()

    def status(self) -> dict[str, Any]:
        """The default room's /status, plus ``rooms``: a summary of each named one."""
        return {**super().status(), "rooms": dict(self._room_summaries())}

    def _room_summaries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, room in self.rooms.items():
            prev = room.core.previous
            yield (
                name,
                {
                    "path": f"{ROOMS_PATH}{name}",
                    "quorum_id": room.core.quorum_id,
                    "reason": room.core.reason,
                    "members": list(prev.replica_ids) if prev is not None else [],
                    "alive": [m.replica_id for m in live_members(room.core)],
                    "max_step": max((m.step for m in prev.members), default=0)
                    if prev is not None
                    else 0,
                },
            )

    def metrics_text(self) -> bytes:
        return generate_latest(self._all)
