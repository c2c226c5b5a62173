"""Table tests for ftdiloco.config: environment -> Config, errors, warnings."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import structlog

from ftdiloco.config import ENV_VARS, Config, ConfigError, exit_on_config_error

LH = {"FTDILOCO_LIGHTHOUSE": "localhost:29510"}
FQDN = "node7.cluster.example"


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    """getfqdn may hit DNS; the host default must be testable without it."""
    monkeypatch.setattr(socket, "getfqdn", lambda name="": FQDN)


DEFAULTS: dict[str, Any] = {
    "rank": 0,
    "world_size": 1,
    "local_rank": 0,
    "master_addr": "127.0.0.1",
    "master_port": 29500,
    "replica_group_id": "0",
    "num_replica_groups": None,
    "lighthouse": ("http://localhost:29510",),
    "replica_id": "group0",
    "manager_port": 0,
    "host": "127.0.0.1",
    "token": None,
    "min_replicas": 1,
    "timeout": 60.0,
    "quorum_timeout": 60.0,
    "collective_timeout": 60.0,
    "heal_timeout": 60.0,
    "heartbeat_interval": 1.0,
    "init_sync": True,
}


def test_defaults() -> None:
    config = Config.from_env(LH)
    assert {name: getattr(config, name) for name in DEFAULTS} == DEFAULTS
    assert config.warnings() == []


@pytest.mark.parametrize(
    ("env", "overrides", "expected"),
    [
        pytest.param(
            {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_PORT": "1234"},
            {},
            {"rank": 3, "world_size": 8, "local_rank": 1, "master_port": 1234},
            id="torchrun",
        ),
        pytest.param(
            {"MASTER_ADDR": "10.0.0.5"},
            {},
            {"master_addr": "10.0.0.5", "host": FQDN},
            id="remote master: host is fqdn",
        ),
        pytest.param({"MASTER_ADDR": "localhost"}, {}, {"host": "127.0.0.1"}, id="loopback master"),
        pytest.param(
            {"MASTER_ADDR": "10.0.0.5", "FTDILOCO_HOST": "10.0.0.9"},
            {},
            {"host": "10.0.0.9"},
            id="explicit host",
        ),
        pytest.param(
            {"REPLICA_GROUP_ID": "4", "NUM_REPLICA_GROUPS": "6"},
            {},
            {"replica_group_id": "4", "num_replica_groups": 6, "replica_id": "group4"},
            id="replica group",
        ),
        pytest.param(
            {"REPLICA_GROUP_ID": "4", "FTDILOCO_REPLICA_ID": "east-1"},
            {},
            {"replica_id": "east-1"},
            id="explicit replica id",
        ),
        pytest.param(
            {"FTDILOCO_LIGHTHOUSE": "", "TORCHFT_LIGHTHOUSE": "http://old:29510"},
            {},
            {"lighthouse": ("http://old:29510",)},
            id="TORCHFT_LIGHTHOUSE alias",
        ),
        pytest.param(
            {"TORCHFT_LIGHTHOUSE": "localhost:29510"},
            {},
            {"lighthouse": ("http://localhost:29510",)},
            id="both set, same",
        ),
        pytest.param(
            {"FTDILOCO_LIGHTHOUSE": " a:1, http://B:2/ ,https://c:3,a:1,[::1]:4,"},
            {},
            {"lighthouse": ("http://a:1", "http://b:2", "https://c:3", "http://[::1]:4")},
            id="comma-separated lighthouses",
        ),
        pytest.param(
            {"FTDILOCO_TIMEOUT": "4"},
            {},
            {
                "timeout": 4.0,
                "quorum_timeout": 4.0,
                "collective_timeout": 4.0,
                "heal_timeout": 4.0,
                "heartbeat_interval": 0.2,
            },
            id="one knob",
        ),
        pytest.param(
            {"FTDILOCO_TIMEOUT": "4", "FTDILOCO_HEAL_TIMEOUT": "2.5"},
            {},
            {"quorum_timeout": 4.0, "heal_timeout": 2.5},
            id="explicit beats derived",
        ),
        pytest.param(
            {
                "FTDILOCO_QUORUM_TIMEOUT": "90",
                "FTDILOCO_COLLECTIVE_TIMEOUT": "80",
                "FTDILOCO_HEARTBEAT_INTERVAL": "0.1",
                "FTDILOCO_MANAGER_PORT": "29600",
                "FTDILOCO_MIN_REPLICAS": "2",
                "FTDILOCO_TOKEN": "s3cret",
            },
            {},
            {
                "quorum_timeout": 90.0,
                "collective_timeout": 80.0,
                "heal_timeout": 60.0,
                "heartbeat_interval": 0.1,
                "manager_port": 29600,
                "min_replicas": 2,
                "token": "s3cret",
            },
            id="explicit values",
        ),
        pytest.param({"FTDILOCO_INIT_SYNC": "No"}, {}, {"init_sync": False}, id="init_sync no"),
        pytest.param({"FTDILOCO_INIT_SYNC": "0"}, {}, {"init_sync": False}, id="init_sync 0"),
        pytest.param({"FTDILOCO_INIT_SYNC": "TRUE"}, {}, {"init_sync": True}, id="init_sync true"),
        pytest.param({"RANK": "  ", "FTDILOCO_TOKEN": ""}, {}, {"rank": 0}, id="blank is unset"),
        pytest.param(
            {"FTDILOCO_TIMEOUT": "4", "RANK": "junk"},
            {"timeout": 10.0, "rank": 0, "replica_group_id": "9"},
            {"timeout": 10.0, "heal_timeout": 10.0, "rank": 0, "replica_id": "group9"},
            id="overrides win and drive derived defaults",
        ),
        pytest.param(
            {},
            {"lighthouse": "x:1,y:2"},
            {"lighthouse": ("http://x:1", "http://y:2")},
            id="lighthouse override as string",
        ),
        pytest.param(
            {}, {"lighthouse": ["y:2"]}, {"lighthouse": ("http://y:2",)}, id="lighthouse list"
        ),
    ],
)
def test_from_env(env: dict[str, str], overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    config = Config.from_env({**LH, **env}, **overrides)
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("env", "overrides", "match"),
    [
        ({"RANK": "x"}, {}, "RANK='x' is not an integer"),
        ({"RANK": "-1"}, {}, "RANK=-1 must be >= 0"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, {}, "RANK=2 must be < WORLD_SIZE=2"),
        ({"WORLD_SIZE": "0"}, {}, "WORLD_SIZE=0 must be >= 1"),
        ({"WORLD_SIZE": "1.5"}, {}, "WORLD_SIZE='1.5' is not an integer"),
        ({"LOCAL_RANK": "-2"}, {}, "LOCAL_RANK=-2 must be >= 0"),
        ({"MASTER_ADDR": "http://x"}, {}, "MASTER_ADDR='http://x' is not a host"),
        ({"MASTER_PORT": "0"}, {}, "MASTER_PORT=0 is not a port"),
        ({"MASTER_PORT": "70000"}, {}, "MASTER_PORT=70000 is not a port"),
        ({"NUM_REPLICA_GROUPS": "0"}, {}, "NUM_REPLICA_GROUPS=0 must be >= 1"),
        ({"NUM_REPLICA_GROUPS": "two"}, {}, "NUM_REPLICA_GROUPS='two' is not an integer"),
        ({"FTDILOCO_REPLICA_ID": "x" * 300}, {}, "FTDILOCO_REPLICA_ID='x+' must be 1 to 256"),
        ({"FTDILOCO_MANAGER_PORT": "-1"}, {}, "FTDILOCO_MANAGER_PORT=-1 is not a port"),
        ({"FTDILOCO_MANAGER_PORT": "p"}, {}, "FTDILOCO_MANAGER_PORT='p' is not an integer"),
        ({"FTDILOCO_HOST": "a b"}, {}, "FTDILOCO_HOST='a b' is not a host"),
        ({"FTDILOCO_MIN_REPLICAS": "0"}, {}, "FTDILOCO_MIN_REPLICAS=0 must be >= 1"),
        ({"FTDILOCO_TIMEOUT": "soon"}, {}, "FTDILOCO_TIMEOUT='soon' is not a number"),
        ({"FTDILOCO_TIMEOUT": "0"}, {}, "FTDILOCO_TIMEOUT=0.0 must be > 0"),
        ({"FTDILOCO_TIMEOUT": "-5"}, {}, "FTDILOCO_TIMEOUT=-5.0 must be > 0"),
        ({"FTDILOCO_TIMEOUT": "inf"}, {}, "FTDILOCO_TIMEOUT=inf must be > 0"),
        ({"FTDILOCO_TIMEOUT": "nan"}, {}, "FTDILOCO_TIMEOUT=nan must be > 0"),
        ({"FTDILOCO_QUORUM_TIMEOUT": "0"}, {}, "FTDILOCO_QUORUM_TIMEOUT=0.0 must be > 0"),
        ({"FTDILOCO_COLLECTIVE_TIMEOUT": "-1"}, {}, "FTDILOCO_COLLECTIVE_TIMEOUT=-1.0"),
        ({"FTDILOCO_HEAL_TIMEOUT": "x"}, {}, "FTDILOCO_HEAL_TIMEOUT='x' is not a number"),
        ({"FTDILOCO_HEARTBEAT_INTERVAL": "0"}, {}, "FTDILOCO_HEARTBEAT_INTERVAL=0.0"),
        ({"FTDILOCO_INIT_SYNC": "maybe"}, {}, "FTDILOCO_INIT_SYNC='maybe' is not a boolean"),
        ({"FTDILOCO_LIGHTHOUSE": "lh"}, {}, "FTDILOCO_LIGHTHOUSE: lighthouse address 'lh'"),
        ({"FTDILOCO_LIGHTHOUSE": "lh:0"}, {}, "address 'lh:0' is not host:port"),
        ({"FTDILOCO_LIGHTHOUSE": "lh:99999"}, {}, "address 'lh:99999' is not host:port"),
        ({"FTDILOCO_LIGHTHOUSE": "lh:port"}, {}, "address 'lh:port' is not host:port"),
        ({"FTDILOCO_LIGHTHOUSE": "ftp://lh:1"}, {}, "address 'ftp://lh:1' is not host:port"),
        ({"FTDILOCO_LIGHTHOUSE": "http://lh:1/x"}, {}, "address 'http://lh:1/x'"),
        ({"FTDILOCO_LIGHTHOUSE": "http://u@lh:1"}, {}, "address 'http://u@lh:1'"),
        ({"FTDILOCO_LIGHTHOUSE": "http://l h:1"}, {}, "address 'http://l h:1'"),
        ({"FTDILOCO_LIGHTHOUSE": ",,"}, {}, "FTDILOCO_LIGHTHOUSE=',,' names no lighthouse"),
        ({"TORCHFT_LIGHTHOUSE": "lh"}, {}, "TORCHFT_LIGHTHOUSE: lighthouse address 'lh'"),
        ({"TORCHFT_LIGHTHOUSE": "other:1"}, {}, "FTDILOCO_LIGHTHOUSE=.* and TORCHFT_LIGHTHOUSE="),
        ({"FTDILOCO_LIGHTHOUSE": ""}, {}, "FTDILOCO_LIGHTHOUSE \\(or TORCHFT_LIGHTHOUSE\\) is not"),
        ({}, {"lighthouse": ()}, "FTDILOCO_LIGHTHOUSE='' names no lighthouse"),
        ({}, {"rank": 5}, "RANK=5 must be < WORLD_SIZE=1"),
        ({}, {"token": ""}, "FTDILOCO_TOKEN is empty"),
    ],
)
def test_invalid_variable_is_named(
    env: dict[str, str], overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Config.from_env({**LH, **env}, **overrides)


def test_unknown_override_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown Config field\\(s\\): bogus"):
        Config.from_env(LH, bogus=1)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [*ENV_VARS.values(), "TORCHFT_LIGHTHOUSE", "FTDILOCO_TOKEN_FILE"]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "envhost:7")
    monkeypatch.setenv("REPLICA_GROUP_ID", "2")
    config = Config.from_env()
    assert (config.lighthouse, config.replica_id) == (("http://envhost:7",), "group2")


@pytest.mark.parametrize(
    ("content", "token", "match"),
    [
        ("  tok-123\n", "tok-123", ""),
        ("\n  \n", None, "FTDILOCO_TOKEN_FILE='.*' is empty"),
        (b"\xff\xfe", None, "FTDILOCO_TOKEN_FILE='.*' cannot be read"),
        (None, None, "FTDILOCO_TOKEN_FILE='.*' cannot be read"),
    ],
)
def test_token_file(
    tmp_path: Path, content: str | bytes | None, token: str | None, match: str
) -> None:
    path = tmp_path / "token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    env = {**LH, "FTDILOCO_TOKEN_FILE": str(path)}
    if token is not None:
        config = Config.from_env(env)
        assert config.token == token
        assert token not in repr(config)
    else:
        with pytest.raises(ConfigError, match=match):
            Config.from_env(env)


def test_token_and_token_file_together_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file")
    env = {**LH, "FTDILOCO_TOKEN": "inline", "FTDILOCO_TOKEN_FILE": str(path)}
    with pytest.raises(ConfigError, match="FTDILOCO_TOKEN and FTDILOCO_TOKEN_FILE") as info:
        Config.from_env(env)
    assert "inline" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"FTDILOCO_TIMEOUT": "2"}, [], id="derived: consistent"),
        pytest.param(
            {"FTDILOCO_COLLECTIVE_TIMEOUT": "30", "FTDILOCO_HEAL_TIMEOUT": "45"},
            ["FTDILOCO_COLLECTIVE_TIMEOUT=30s is shorter than FTDILOCO_HEAL_TIMEOUT=45s"],
            id="collective shorter than heal",
        ),
        pytest.param(
            {"FTDILOCO_QUORUM_TIMEOUT": "20"},
            ["FTDILOCO_QUORUM_TIMEOUT=20s is shorter than FTDILOCO_COLLECTIVE_TIMEOUT=60s"],
            id="quorum shorter than collective",
        ),
        pytest.param(
            {"FTDILOCO_HEARTBEAT_INTERVAL": "30"},
            ["FTDILOCO_HEARTBEAT_INTERVAL=30s is at least half of FTDILOCO_QUORUM_TIMEOUT=60s"],
            id="heartbeat too slow",
        ),
        pytest.param(
            {"FTDILOCO_MIN_REPLICAS": "3", "NUM_REPLICA_GROUPS": "2"},
            ["FTDILOCO_MIN_REPLICAS=3 is more than NUM_REPLICA_GROUPS=2"],
            id="min replicas unreachable",
        ),
        pytest.param(
            {"REPLICA_GROUP_ID": "2", "NUM_REPLICA_GROUPS": "2"},
            ["REPLICA_GROUP_ID=2 is not below NUM_REPLICA_GROUPS=2"],
            id="group id out of range",
        ),
        pytest.param(
            {"REPLICA_GROUP_ID": "east", "NUM_REPLICA_GROUPS": "2"}, [], id="named group id"
        ),
        pytest.param(
            {"FTDILOCO_LIGHTHOUSE": "localhost:1,lh.example:29510"},
            [
                "FTDILOCO_HOST=127.0.0.1 is a loopback address but the lighthouse "
                "http://lh.example:29510 is on another machine"
            ],
            id="loopback host, remote lighthouse",
        ),
        pytest.param({"FTDILOCO_LIGHTHOUSE": "localhost:1,[::1]:2"}, [], id="all on loopback"),
        pytest.param(
            {"FTDILOCO_LIGHTHOUSE": "lh.example:29510", "MASTER_ADDR": "10.1.1.1"},
            [],
            id="remote host, remote lighthouse",
        ),
        pytest.param(
            {
                "FTDILOCO_QUORUM_TIMEOUT": "10",
                "FTDILOCO_COLLECTIVE_TIMEOUT": "20",
                "FTDILOCO_HEAL_TIMEOUT": "30",
                "FTDILOCO_HEARTBEAT_INTERVAL": "5",
            },
            ["COLLECTIVE_TIMEOUT=20s is shorter", "QUORUM_TIMEOUT=10s is shorter", "HEARTBEAT"],
            id="several",
        ),
    ],
)
def test_warnings(env: dict[str, str], expected: list[str]) -> None:
    with structlog.testing.capture_logs() as logs:
        config = Config.from_env({**LH, **env})
    problems = config.warnings()
    assert len(problems) == len(expected)
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem
    assert [(e["log_level"], e["problem"]) for e in logs] == [("warning", p) for p in problems]


@pytest.mark.parametrize(
    ("env", "overrides", "expected"),
    [
        pytest.param({}, {}, (None, None), id="off by default"),
        pytest.param(
            {"FTDILOCO_CHECKPOINT_DIR": "/ck", "FTDILOCO_CHECKPOINT_EVERY": "5"},
            {},
            (Path("/ck"), 5),
            id="from the environment",
        ),
        pytest.param(
            {"FTDILOCO_CHECKPOINT_DIR": "/ck"}, {}, (Path("/ck"), None), id="only on request"
        ),
        pytest.param(
            {"FTDILOCO_CHECKPOINT_DIR": "/ck", "FTDILOCO_CHECKPOINT_EVERY": "5"},
            {"checkpoint_dir": "/other", "checkpoint_every": 2},
            (Path("/other"), 2),
            id="overrides (a str path) win",
        ),
    ],
)
def test_checkpoint_settings(
    env: dict[str, str], overrides: dict[str, Any], expected: tuple[Path | None, int | None]
) -> None:
    config = Config.from_env({**LH, **env}, **overrides)
    assert (config.checkpoint_dir, config.checkpoint_every) == expected


@pytest.mark.parametrize(
    ("env", "overrides", "match"),
    [
        ({"FTDILOCO_CHECKPOINT_EVERY": "x"}, {}, "FTDILOCO_CHECKPOINT_EVERY='x' is not an integer"),
        (
            {"FTDILOCO_CHECKPOINT_DIR": "/ck", "FTDILOCO_CHECKPOINT_EVERY": "0"},
            {},
            "FTDILOCO_CHECKPOINT_EVERY=0 must be >= 1",
        ),
        (
            {"FTDILOCO_CHECKPOINT_EVERY": "10"},
            {},
            "FTDILOCO_CHECKPOINT_EVERY=10 needs FTDILOCO_CHECKPOINT_DIR",
        ),
        ({}, {"checkpoint_dir": ""}, "FTDILOCO_CHECKPOINT_DIR='' is empty"),
    ],
)
def test_invalid_checkpoint_settings_are_named(
    env: dict[str, str], overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Config.from_env({**LH, **env}, **overrides)


# -- groups of unequal speed: DyLU and async --------------------------------------------


def test_unequal_speed_settings() -> None:
    config = Config.from_env({**LH})
    assert (config.dylu, config.mode, config.async_grace, config.momentum_every) == (
        False,
        "sync",
        1.0,
        None,
    )
    env = {
        "FTDILOCO_DYLU": "1",
        "FTDILOCO_MODE": "async",
        "FTDILOCO_ASYNC_GRACE": "2.5",
        "FTDILOCO_MOMENTUM_EVERY": "3",
    }
    config = Config.from_env({**LH, **env})
    assert (config.dylu, config.mode, config.async_grace, config.momentum_every) == (
        True,
        "async",
        2.5,
        3,
    )


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"FTDILOCO_MODE": "eventual"}, "FTDILOCO_MODE='eventual' must be one of sync, async"),
        ({"FTDILOCO_DYLU": "maybe"}, "FTDILOCO_DYLU='maybe' is not a boolean"),
        ({"FTDILOCO_ASYNC_GRACE": "-1"}, "FTDILOCO_ASYNC_GRACE=-1.0 must be >= 0 seconds"),
        ({"FTDILOCO_MOMENTUM_EVERY": "0"}, "FTDILOCO_MOMENTUM_EVERY=0 must be >= 1"),
        (
            {"FTDILOCO_MODE": "async", "FTDILOCO_ASYNC_GRACE": "30", "FTDILOCO_TIMEOUT": "20"},
            "FTDILOCO_ASYNC_GRACE=30.0 must be shorter than the collective timeout \\(20s\\)",
        ),
    ],
)
def test_bad_unequal_speed_settings_are_named(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Config.from_env({**LH, **env})


# -- standalone: FTDILOCO_LIGHTHOUSE=none ------------------------------------------------


@pytest.mark.parametrize("value", ["none", "NONE", " none "])
def test_none_means_standalone(value: str) -> None:
    config = Config.from_env({"FTDILOCO_LIGHTHOUSE": value})
    assert config.standalone and config.lighthouse == ()
    assert Config.from_env({"TORCHFT_LIGHTHOUSE": value}).standalone
    assert Config.from_env({}, lighthouse="none").standalone
    assert not Config.from_env(LH).standalone


@pytest.mark.parametrize(
    ("env", "overrides", "match"),
    [
        # Never by omission: unset or empty is still an error.
        ({}, {}, "FTDILOCO_LIGHTHOUSE \\(or TORCHFT_LIGHTHOUSE\\) is not set"),
        ({"FTDILOCO_LIGHTHOUSE": " "}, {}, "is not set"),
        ({}, {"lighthouse": ()}, "names no lighthouse"),
        ({"FTDILOCO_LIGHTHOUSE": "none,lh:1"}, {}, "'none' .* cannot be combined"),
        (
            {"FTDILOCO_LIGHTHOUSE": "none", "NUM_REPLICA_GROUPS": "3"},
            {},
            "NUM_REPLICA_GROUPS=3 but FTDILOCO_LIGHTHOUSE=none",
        ),
    ],
)
def test_standalone_must_be_said_and_be_one_group(
    env: dict[str, str], overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Config.from_env(env, **overrides)


def test_errors_are_one_line(tmp_path: Path) -> None:
    assert str(ConfigError("FTDILOCO_X='a'\nis\n  bad")) == "FTDILOCO_X='a' is bad"
    with pytest.raises(ConfigError) as info:
        Config.from_env({**LH, "FTDILOCO_TOKEN_FILE": str(tmp_path)})  # a directory
    assert "\n" not in str(info.value) and "FTDILOCO_TOKEN_FILE" in str(info.value)


def test_an_entry_point_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info, exit_on_config_error("train.py"):
        Config.from_env({"FTDILOCO_LIGHTHOUSE": "lh:1", "RANK": "x"})
    assert info.value.code == 2
    assert capsys.readouterr().err == "train.py: RANK='x' is not an integer\n"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("lh:29510/rooms/stage0", "http://lh:29510/rooms/stage0"),
        ("http://lh:29510/rooms/stage-1.a/", "http://lh:29510/rooms/stage-1.a"),
        ("https://[::1]:7/rooms/s_0", "https://[::1]:7/rooms/s_0"),
    ],
)
def test_a_room_of_a_lighthouse_is_an_address(address: str, expected: str) -> None:
    """A pipeline stage joins its room: the lighthouse URL with /rooms/NAME."""
    assert Config.from_env({"FTDILOCO_LIGHTHOUSE": address}).lighthouse == (expected,)


@pytest.mark.parametrize(
    "address",
    [
        "lh:1/rooms/",
        "lh:1/rooms",
        "lh:1/rooms/-x",
        "lh:1/rooms/a/b",
        "lh:1/room/a",
        "lh:1/rooms/a%20b",
    ],
)
def test_a_path_other_than_a_room_is_refused(address: str) -> None:
    with pytest.raises(
        ConfigError, match=r"is not host:port, http://host:port or http://host:port/rooms/NAME"
    ):
        Config.from_env({"FTDILOCO_LIGHTHOUSE": address})
