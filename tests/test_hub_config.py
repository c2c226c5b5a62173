"""FTDILOCO_TOPOLOGY and FTDILOCO_HUB: the topology is configuration, each mistake one line."""

from __future__ import annotations

import pytest

from ftdiloco.config import Config, ConfigError


def test_the_hub_url_alone_means_the_hub_topology() -> None:
    config = Config.from_env({"FTDILOCO_HUB": "hub.example:29520"})
    assert (config.topology, config.hub, config.lighthouse) == (
        "hub",
        "http://hub.example:29520",
        (),
    )
    assert not config.standalone
    same = Config.from_env({"FTDILOCO_TOPOLOGY": "hub", "FTDILOCO_HUB": "http://[::1]:5/"})
    assert same.hub == "http://[::1]:5"


def test_a_direct_job_is_unchanged() -> None:
    config = Config.from_env({"FTDILOCO_LIGHTHOUSE": "127.0.0.1:29510"})
    assert (config.topology, config.hub) == ("direct", None)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FTDILOCO_TOPOLOGY": "hub"}, "FTDILOCO_TOPOLOGY=hub needs FTDILOCO_HUB"),
        (
            {"FTDILOCO_TOPOLOGY": "star", "FTDILOCO_LIGHTHOUSE": "a:1"},
            "FTDILOCO_TOPOLOGY='star' must be one of direct, hub",
        ),
        (
            {"FTDILOCO_HUB": "h:1", "FTDILOCO_LIGHTHOUSE": "a:1"},
            "FTDILOCO_LIGHTHOUSE is set but FTDILOCO_TOPOLOGY=hub",
        ),
        (
            {"FTDILOCO_HUB": "h:1", "FTDILOCO_LIGHTHOUSE": "none"},
            "FTDILOCO_LIGHTHOUSE is set but FTDILOCO_TOPOLOGY=hub",
        ),
        (
            {"FTDILOCO_HUB": "h:1", "FTDILOCO_TOPOLOGY": "direct", "FTDILOCO_LIGHTHOUSE": "a:1"},
            "but FTDILOCO_TOPOLOGY=direct",
        ),
        ({"FTDILOCO_HUB": "ftp://h:1"}, "FTDILOCO_HUB: hub address 'ftp://h:1' is not"),
        ({"FTDILOCO_HUB": "h:1/rooms/x"}, "FTDILOCO_HUB: hub address"),
        ({"FTDILOCO_HUB": "h"}, "FTDILOCO_HUB: hub address 'h' is not"),
        ({"FTDILOCO_HUB": "h:1", "WORLD_SIZE": "2"}, "runs one rank per group"),
    ],
)
def test_each_mistake_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
