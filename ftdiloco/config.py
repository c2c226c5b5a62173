"""Environment variables (torchrun's and ours) -> one frozen, validated :class:`Config`.

A training process reads its settings once, at start, so that a typo fails
there with a message naming the variable -- not an hour later inside a
collective.  torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` default to a one-rank group so a plain ``python train.py``
works.  Of ours only the lighthouse address is required; ``TORCHFT_LIGHTHOUSE``
is accepted as well so existing launch scripts keep working.  The value
``none`` (said explicitly; an unset variable is still an error) means
*standalone*: one group that trains without a lighthouse, for debugging a
script before a real job (:attr:`Config.standalone`).

Every :class:`ConfigError` is one line that names the variable, so an entry
point can print it instead of a traceback (:func:`exit_on_config_error`).

An empty (or all-blank) variable counts as unset: launch scripts often export
``VAR=`` to mean "no value", and treating that as a parse error helps nobody.

``FTDILOCO_TIMEOUT`` is the one knob: the quorum, collective and heal
deadlines default to it and the heartbeat interval is derived from it, so
the defaults are always mutually consistent.  Explicit values that contradict
each other are allowed (an operator may know better) but reported by
:meth:`Config.warnings` and logged once by :meth:`Config.from_env`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from ftwire import guard
from ftwire.protocol import MAX_ID_LEN, ROOM_NAME, ROOMS_PATH
from lighthouse.client import DEFAULT_HEARTBEAT_INTERVAL

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 60.0
# Heartbeats must be much more frequent than the deadlines they feed (a
# twentieth of the timeout), but a dead process closes its liveness socket and
# is evicted at once: the beat only has to catch a frozen host within the
# lighthouse's heartbeat timeout (5 s by default), so once a second is enough.
MAX_DEFAULT_HEARTBEAT_INTERVAL = DEFAULT_HEARTBEAT_INTERVAL

# The variable behind each field, so every error names what the user set.
ENV_VARS: dict[str, str] = {
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
    "replica_group_id": "REPLICA_GROUP_ID",
    "num_replica_groups": "NUM_REPLICA_GROUPS",
    "lighthouse": "FTDILOCO_LIGHTHOUSE",
    "replica_id": "FTDILOCO_REPLICA_ID",
    "manager_port": "FTDILOCO_MANAGER_PORT",
    "host": "FTDILOCO_HOST",
    "token": "FTDILOCO_TOKEN",
    "min_replicas": "FTDILOCO_MIN_REPLICAS",
    "timeout": "FTDILOCO_TIMEOUT",
    "quorum_timeout": "FTDILOCO_QUORUM_TIMEOUT",
    "collective_timeout": "FTDILOCO_COLLECTIVE_TIMEOUT",
    "heal_timeout": "FTDILOCO_HEAL_TIMEOUT",
    "heartbeat_interval": "FTDILOCO_HEARTBEAT_INTERVAL",
    "init_sync": "FTDILOCO_INIT_SYNC",
    "checkpoint_dir": "FTDILOCO_CHECKPOINT_DIR",
    "checkpoint_every": "FTDILOCO_CHECKPOINT_EVERY",
    "dylu": "FTDILOCO_DYLU",
    "mode": "FTDILOCO_MODE",
    "async_grace": "FTDILOCO_ASYNC_GRACE",
    "momentum_every": "FTDILOCO_MOMENTUM_EVERY",
    "topology": "FTDILOCO_TOPOLOGY",
    "hub": "FTDILOCO_HUB",
}
# FTDILOCO_MODE: every group waits for the others (sync) or only for a grace window (async).
MODES = ("sync", "async")
# FTDILOCO_TOPOLOGY: groups reach each other (direct, with a lighthouse), or
# talk only to a hub that holds the global weights (ftdiloco.hub).
TOPOLOGIES = ("direct", "hub")
LIGHTHOUSE_ALIAS = "TORCHFT_LIGHTHOUSE"
TOKEN_FILE = "FTDILOCO_TOKEN_FILE"
# FTDILOCO_LIGHTHOUSE=none: train as one group, without a lighthouse.
NO_LIGHTHOUSE = "none"

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


class ConfigError(ValueError):
    """A missing or invalid setting; the message (one line) names the variable and its value."""

    def __init__(self, message: str) -> None:
        # One line even when an OS error's text brings its own line breaks.
        super().__init__(" ".join(message.split()))


@contextmanager
def exit_on_config_error(program: str) -> Iterator[None]:
    """In an entry point: a :class:`ConfigError` becomes one line on stderr and exit 2."""
    try:
        yield
    except ConfigError as e:
        print(f"{program}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _read(env: Mapping[str, str], variable: str) -> str | None:
    return env.get(variable, "").strip() or None


def _parse_int(variable: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{variable}={raw!r} is not an integer") from None


def _parse_float(variable: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{variable}={raw!r} is not a number of seconds") from None


def _parse_bool(variable: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{variable}={raw!r} is not a boolean (use 1/0, true/false or yes/no)")


def _parse_str(variable: str, raw: str) -> str:
    return raw


def _parse_path(variable: str, raw: str) -> Path:
    return Path(raw)


# How each plainly-read field is parsed; the lighthouse (alias, list) and the
# token (file) are read by their own functions below.
_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "rank": _parse_int,
    "world_size": _parse_int,
    "local_rank": _parse_int,
    "master_addr": _parse_str,
    "master_port": _parse_int,
    "replica_group_id": _parse_str,
    "num_replica_groups": _parse_int,
    "replica_id": _parse_str,
    "manager_port": _parse_int,
    "host": _parse_str,
    "min_replicas": _parse_int,
    "timeout": _parse_float,
    "quorum_timeout": _parse_float,
    "collective_timeout": _parse_float,
    "heal_timeout": _parse_float,
    "heartbeat_interval": _parse_float,
    "init_sync": _parse_bool,
    "checkpoint_dir": _parse_path,
    "checkpoint_every": _parse_int,
    "dylu": _parse_bool,
    "mode": _parse_str,
    "async_grace": _parse_float,
    "momentum_every": _parse_int,
    "topology": _parse_str,
    "hub": _parse_str,
}


def _is_host(text: str) -> bool:
    """A DNS name or an IP address (IPv6 without brackets), nothing else."""
    if _HOSTNAME.fullmatch(text):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _normalise_lighthouse(variable: str, address: str) -> str:
    """``host:port`` or ``http(s)://host:port[/rooms/NAME][/]`` -> ``scheme://host:port[/rooms/NAME]``.

    A path may only name a room of the lighthouse (a pipeline stage's quorum,
    see lighthouse.rooms).
    """
    text = address.strip()
    url = text if "://" in text else f"http://{text}"
    problem = (
        f"{variable}: lighthouse address {address!r} is not host:port, http://host:port"
        " or http://host:port/rooms/NAME"
    )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{problem} ({e})") from None
    host = parts.hostname
    if (
        parts.scheme not in ("http", "https")
        or host is None
        or not _is_host(host)
        or not port
        or not _lighthouse_path(parts.path)
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ConfigError(problem)
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def _normalise_hub(variable: str, address: str) -> str:
    """``host:port`` or ``http://host:port[/]`` -> ``http://host:port``: one port, no path."""
    url = address.strip() if "://" in address else f"http://{address.strip()}"
    problem = f"{variable}: hub address {address!r} is not host:port or http://host:port"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{problem} ({e})") from None
    host = parts.hostname
    if parts.scheme != "http" or host is None or not _is_host(host) or not port:
        raise ConfigError(problem)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(problem)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _lighthouse_path(path: str) -> bool:
    """Nothing, ``/``, or a room: ``/rooms/NAME`` (a trailing ``/`` allowed)."""
    room = path.rstrip("/")
    if not room:
        return True
    return room.startswith(ROOMS_PATH) and bool(ROOM_NAME.fullmatch(room[len(ROOMS_PATH) :]))


def _is_none(addresses: Iterable[str]) -> bool:
    """Is this the explicit ``none`` (standalone), and nothing else?"""
    given = [a.strip().lower() for a in addresses if a.strip()]
    return given == [NO_LIGHTHOUSE]


def _lighthouses(variable: str, addresses: Iterable[str]) -> tuple[str, ...]:
    """Normalise and de-duplicate, keeping the order: it is the failover order."""
    given = tuple(addresses)
    if any(a.strip().lower() == NO_LIGHTHOUSE for a in given):
        raise ConfigError(
            f"{variable}={','.join(given)!r}: '{NO_LIGHTHOUSE}' (standalone, no lighthouse) "
            "cannot be combined with addresses"
        )
    normalised = tuple(
        dict.fromkeys(_normalise_lighthouse(variable, a) for a in given if a.strip())
    )
    if not normalised:
        raise ConfigError(f"{variable}={','.join(given)!r} names no lighthouse address")
    return normalised


def _parse_lighthouse(variable: str, raw: str) -> tuple[str, ...]:
    """Addresses, or () for the explicit ``none``."""
    parts = raw.split(",")
    return () if _is_none(parts) else _lighthouses(variable, parts)


def _lighthouse_from_env(env: Mapping[str, str]) -> tuple[str, ...] | None:
    ours_var = ENV_VARS["lighthouse"]
    ours, alias = _read(env, ours_var), _read(env, LIGHTHOUSE_ALIAS)
    parsed_ours = None if ours is None else _parse_lighthouse(ours_var, ours)
    parsed_alias = None if alias is None else _parse_lighthouse(LIGHTHOUSE_ALIAS, alias)
    if parsed_ours is not None and parsed_alias is not None and parsed_ours != parsed_alias:
        raise ConfigError(
            f"{ours_var}={ours!r} and {LIGHTHOUSE_ALIAS}={alias!r} disagree; set only one"
        )
    return parsed_ours if parsed_ours is not None else parsed_alias


def _token_from_env(env: Mapping[str, str]) -> str | None:
    token_var = ENV_VARS["token"]
    token, path = _read(env, token_var), _read(env, TOKEN_FILE)
    if path is None:
        return token
    if token is not None:
        # The token's value is never echoed: error messages end up in logs.
        raise ConfigError(f"{token_var} and {TOKEN_FILE}={path!r} are both set; set only one")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{TOKEN_FILE}={path!r} cannot be read: {e}") from None
    if not text:
        raise ConfigError(f"{TOKEN_FILE}={path!r} is empty")
    return text


def _default_host(master_addr: str) -> str:
    """The address other groups reach this process at, when FTDILOCO_HOST is unset.

    A loopback (or unset) MASTER_ADDR means a single-machine job, where
    127.0.0.1 always works and needs no DNS.  Otherwise the job may span
    machines, and MASTER_ADDR is rank 0's address, not necessarily ours; the
    fully qualified host name is what a peer on another machine can resolve.
    """
    return "127.0.0.1" if guard.is_loopback(master_addr) else socket.getfqdn()


def _check(name: str, value: Any, ok: bool, must: str) -> None:
    if not ok:
        raise ConfigError(f"{ENV_VARS[name]}={value!r} {must}")


@dataclass(frozen=True)
class Config:
    """Everything a training process needs to know about itself and its job."""

    # torchrun's view of this process within its replica group.
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    replica_group_id: str
    num_replica_groups: int | None
    # Lighthouse URLs in failover order, each normalised to scheme://host:port.
    lighthouse: tuple[str, ...]
    # The name this group joins quorums under.
    replica_id: str
    # Group rank 0's manager server; 0 lets the OS pick a free port.
    manager_port: int
    # The address other groups use to reach this process's servers.
    host: str
    # Shared secret for the lighthouse and peers; kept out of repr (logs).
    token: str | None = field(repr=False)
    # Commit only if at least this many groups took part in the step.
    min_replicas: int
    timeout: float
    quorum_timeout: float
    collective_timeout: float
    heal_timeout: float
    heartbeat_interval: float
    # Heal every group from one primary before step 0 (see ftdiloco.coordination.plan).
    init_sync: bool
    # Where this process's checkpoints go (ftdiloco.state.checkpoint); None: nowhere.
    checkpoint_dir: Path | None = None
    # Save every this many committed outer steps; None: only when asked.
    checkpoint_every: int | None = None
    # FTDILOCO_LIGHTHOUSE=none: one group, no lighthouse (``lighthouse`` is then empty).
    standalone: bool = False
    # Groups of unequal speed (ftdiloco.training.hetero): dynamic local updates;
    # sync or async outer steps; how long an async quorum waits for a
    # straggler (s); delayed Nesterov's momentum every N contributions (None:
    # NUM_REPLICA_GROUPS, else 1).
    dylu: bool = False
    mode: str = "sync"
    async_grace: float = 1.0
    momentum_every: int | None = None
    # FTDILOCO_TOPOLOGY: "direct" (a lighthouse, groups reach each other) or
    # "hub" (every group talks only to the hub at ``hub``, http://host:port).
    topology: str = "direct"
    hub: str | None = None

    def __post_init__(self) -> None:
        _check("rank", self.rank, self.rank >= 0, "must be >= 0")
        _check("world_size", self.world_size, self.world_size >= 1, "must be >= 1")
        _check(
            "rank",
            self.rank,
            self.rank < self.world_size,
            f"must be < WORLD_SIZE={self.world_size}",
        )
        _check("local_rank", self.local_rank, self.local_rank >= 0, "must be >= 0")
        _check("master_addr", self.master_addr, _is_host(self.master_addr), "is not a host")
        # Peers connect to MASTER_PORT, so unlike a port we listen on, 0 is invalid.
        _check("master_port", self.master_port, 1 <= self.master_port <= 65535, "is not a port")
        _check("replica_group_id", self.replica_group_id, bool(self.replica_group_id), "is empty")
        if self.num_replica_groups is not None:
            _check(
                "num_replica_groups",
                self.num_replica_groups,
                self.num_replica_groups >= 1,
                "must be >= 1",
            )
        if self.standalone:
            if self.lighthouse:
                raise ConfigError(
                    f"{ENV_VARS['lighthouse']}={','.join(self.lighthouse)!r}: a standalone "
                    "job has no lighthouse"
                )
            if self.num_replica_groups not in (None, 1):
                raise ConfigError(
                    f"NUM_REPLICA_GROUPS={self.num_replica_groups} but "
                    f"{ENV_VARS['lighthouse']}={NO_LIGHTHOUSE}: a standalone job is one group"
                )
        elif self.topology != "hub":
            # Validates values given as overrides; idempotent for those from the environment.
            object.__setattr__(
                self, "lighthouse", _lighthouses(ENV_VARS["lighthouse"], self.lighthouse)
            )
        self._check_topology()
        _check(
            "replica_id",
            self.replica_id,
            0 < len(self.replica_id) <= MAX_ID_LEN,
            f"must be 1 to {MAX_ID_LEN} characters",
        )
        _check("manager_port", self.manager_port, 0 <= self.manager_port <= 65535, "is not a port")
        _check("host", self.host, _is_host(self.host), "is not a host name or IP address")
        if self.token is not None and not self.token:
            raise ConfigError(f"{ENV_VARS['token']} is empty")
        _check("min_replicas", self.min_replicas, self.min_replicas >= 1, "must be >= 1")
        for name in (
            "timeout",
            "quorum_timeout",
            "collective_timeout",
            "heal_timeout",
            "heartbeat_interval",
        ):
            seconds = getattr(self, name)
            # Every deadline must be finite: an infinite one is a hang (I3).
            _check(name, seconds, math.isfinite(seconds) and seconds > 0, "must be > 0 seconds")
        _check("mode", self.mode, self.mode in MODES, f"must be one of {', '.join(MODES)}")
        _check(
            "async_grace",
            self.async_grace,
            math.isfinite(self.async_grace) and self.async_grace >= 0,
            "must be >= 0 seconds",
        )
        # A grace past the collective deadline would let a straggler hold the
        # others longer than any wait the job allows (I3).
        _check(
            "async_grace",
            self.async_grace,
            self.mode == "sync" or self.async_grace < self.collective_timeout,
            f"must be shorter than the collective timeout ({self.collective_timeout:g}s)",
        )
        if self.momentum_every is not None:
            _check("momentum_every", self.momentum_every, self.momentum_every >= 1, "must be >= 1")
        if self.checkpoint_dir is not None:
            _check(
                "checkpoint_dir", self.checkpoint_dir, str(self.checkpoint_dir) != "", "is empty"
            )
            # Overrides may give a str; the environment gives a Path.
            object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))
        if self.checkpoint_every is not None:
            _check(
                "checkpoint_every",
                self.checkpoint_every,
                self.checkpoint_every >= 1,
                "must be >= 1",
            )
            # Periodic saves with nowhere to put them would silently save nothing.
            _check(
                "checkpoint_every",
                self.checkpoint_every,
                self.checkpoint_dir is not None,
                f"needs {ENV_VARS['checkpoint_dir']} (where to save)",
            )

    def _check_topology(self) -> None:
        """A hub job names its hub and no lighthouse; a direct job names no hub."""
        t = ENV_VARS["topology"]
        _check(
            "topology",
            self.topology,
            self.topology in TOPOLOGIES,
            f"must be one of {', '.join(TOPOLOGIES)}",
        )
        if self.topology == "direct":
            if self.hub is not None:
                raise ConfigError(
                    f"{ENV_VARS['hub']}={self.hub!r} but {t}=direct: set {t}=hub to use the hub"
                )
            return
        if self.hub is None:
            raise ConfigError(f"{t}=hub needs {ENV_VARS['hub']} (the hub's URL, host:port)")
        if self.lighthouse or self.standalone:
            raise ConfigError(
                f"{ENV_VARS['lighthouse']} is set but {t}=hub: groups talk only to the hub;"
                f" unset {ENV_VARS['lighthouse']}"
            )
        object.__setattr__(self, "hub", _normalise_hub(ENV_VARS["hub"], self.hub))
        # What the hub does not carry yet (ftdiloco.hub.client).
        if self.world_size > 1:
            raise ConfigError(f"WORLD_SIZE={self.world_size}: {t}=hub runs one rank per group")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Read ``env`` (default ``os.environ``), apply ``overrides``, validate, warn.

        ``overrides`` are field values (``lighthouse`` may also be a
        comma-separated string) that take the place of the environment's;
        defaults derived from another field (the timeouts from ``timeout``,
        ``replica_id`` from ``replica_group_id``, ``host`` from
        ``master_addr``) follow the overridden value.
        """
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown Config field(s): {', '.join(unknown)}")
        env = os.environ if env is None else env

        given: dict[str, Any] = {}
        for name, parse in _PARSERS.items():
            raw = _read(env, ENV_VARS[name])
            if raw is not None and name not in overrides:
                given[name] = parse(ENV_VARS[name], raw)
        if "lighthouse" not in overrides:
            lighthouse = _lighthouse_from_env(env)
            if lighthouse is not None:
                given["lighthouse"] = lighthouse
        if "token" not in overrides:
            token = _token_from_env(env)
            if token is not None:
                given["token"] = token
        given.update(overrides)
        if given.get("hub") is not None:
            given.setdefault("topology", "hub")  # the hub's URL alone says it
        if given.get("topology") == "hub":
            # No lighthouse to find: the hub is the only server a group talks to
            # (one given anyway is refused by the validation, naming it).
            given.setdefault("standalone", given.get("lighthouse") == ())  # "none"
            given.setdefault("lighthouse", ())
        if isinstance(given.get("lighthouse"), str):
            given["lighthouse"] = given["lighthouse"].split(",")
        # () from the environment is its explicit "none"; an empty override is an
        # omission, which the validation below refuses.
        from_env_none = "lighthouse" not in overrides and given.get("lighthouse") == ()
        if given.get("topology") == "hub":
            pass  # the lighthouse's absence is no "none"
        elif from_env_none or _is_none(given.get("lighthouse", ())):
            given["lighthouse"] = ()
            given.setdefault("standalone", True)
        if "lighthouse" not in given:
            raise ConfigError(
                f"{ENV_VARS['lighthouse']} (or {LIGHTHOUSE_ALIAS}) is not set: give the "
                "lighthouse address(es), comma-separated, e.g. host:port"
            )

        timeout = given.get("timeout", DEFAULT_TIMEOUT)
        master_addr = given.get("master_addr", "127.0.0.1")
        replica_group_id = given.get("replica_group_id", "0")
        values: dict[str, Any] = {
            "rank": 0,
            "world_size": 1,
            "local_rank": 0,
            "master_addr": master_addr,
            "master_port": 29500,
            "replica_group_id": replica_group_id,
            "num_replica_groups": None,
            "replica_id": f"group{replica_group_id}",
            "manager_port": 0,
            "token": None,
            "min_replicas": 1,
            "timeout": timeout,
            "quorum_timeout": timeout,
            "collective_timeout": timeout,
            "heal_timeout": timeout,
            "init_sync": True,
            **given,
        }
        if "host" not in values:
            values["host"] = _default_host(master_addr)
        if "heartbeat_interval" not in values:
            # A bad timeout yields a bad interval here, but validation checks
            # the timeout first, so the error names FTDILOCO_TIMEOUT.
            values["heartbeat_interval"] = min(MAX_DEFAULT_HEARTBEAT_INTERVAL, timeout / 20)
        config = cls(**values)
        for problem in config.warnings():
            log.warning("inconsistent configuration", problem=problem)
        return config

    def warnings(self) -> list[str]:
        """Settings that are valid one by one but work against each other.

        Derived defaults never trigger these; explicit values can.
        """
        problems: list[str] = []
        # Up-to-date groups go straight to the allreduce while recovering
        # groups heal first (DESIGN.md, steps 4-5), so the healthy groups wait
        # inside the collective for as long as a heal takes.  A collective
        # deadline shorter than the heal deadline aborts steps where nothing
        # failed.
        if self.collective_timeout < self.heal_timeout:
            problems.append(
                f"FTDILOCO_COLLECTIVE_TIMEOUT={self.collective_timeout:g}s is shorter than "
                f"FTDILOCO_HEAL_TIMEOUT={self.heal_timeout:g}s: peers wait in the allreduce "
                "while a group heals, so a slow but successful heal fails the whole step"
            )
        # A group whose collective fails fast (its connection reset) joins the
        # next quorum while its peers are still blocked in theirs; they are
        # alive and in the last quorum, so the lighthouse waits for them, up
        # to the collective deadline.  A shorter quorum deadline turns that
        # wait into a spurious quorum failure.  Together with the rule above
        # this also keeps the quorum deadline at least as long as a heal.
        if self.quorum_timeout < self.collective_timeout:
            problems.append(
                f"FTDILOCO_QUORUM_TIMEOUT={self.quorum_timeout:g}s is shorter than "
                f"FTDILOCO_COLLECTIVE_TIMEOUT={self.collective_timeout:g}s: a group can wait "
                "that long for peers still in a collective, and its quorum request would fail"
            )
        # Heartbeats are the liveness signal in both directions (the group to
        # the lighthouse, the lighthouse to the group, which fails over to the
        # next address when it stops).  Detecting a loss takes at least one
        # missed beat; with fewer than two beats per quorum deadline that alone
        # uses it up, leaving no time to fail over or re-form the quorum.
        if self.heartbeat_interval >= self.quorum_timeout / 2:
            problems.append(
                f"FTDILOCO_HEARTBEAT_INTERVAL={self.heartbeat_interval:g}s is at least half of "
                f"FTDILOCO_QUORUM_TIMEOUT={self.quorum_timeout:g}s: a lost lighthouse or group "
                "is noticed only after the quorum deadline has passed"
            )
        if self.num_replica_groups is not None:
            if self.min_replicas > self.num_replica_groups:
                problems.append(
                    f"FTDILOCO_MIN_REPLICAS={self.min_replicas} is more than "
                    f"NUM_REPLICA_GROUPS={self.num_replica_groups}: no outer step can commit"
                )
            if (
                self.replica_group_id.isdigit()
                and int(self.replica_group_id) >= self.num_replica_groups
            ):
                problems.append(
                    f"REPLICA_GROUP_ID={self.replica_group_id} is not below "
                    f"NUM_REPLICA_GROUPS={self.num_replica_groups}"
                )
        remote = [
            url for url in self.lighthouse if not guard.is_loopback(urlsplit(url).hostname or "")
        ]
        if guard.is_loopback(self.host) and remote:
            problems.append(
                f"FTDILOCO_HOST={self.host} is a loopback address but the lighthouse "
                f"{remote[0]} is on another machine: groups on other machines cannot "
                "reach this one; set FTDILOCO_HOST to an address they can reach"
            )
        return problems
