"""Live outer learning rate and momentum (``ftdiloco set-outer-lr``).

The lighthouse records a change, decides once from which step it applies (the
step after the next quorum's), and hands it out with every quorum; every group
applies it right before the outer step of that step, so the change lands on
the same outer step everywhere and I1 holds.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from ftwire import protocol
from ftwire.messages import Member, Quorum, SettingsChange
from ftwire.protocol import settings_at
from lighthouse.settings import LiveSettings, quorum_step
from tests.lighthouse_support import join, post, quorum_of

# -- the pure part --------------------------------------------------------------------


def test_a_change_is_decided_once_at_the_next_quorum_and_handed_to_every_later_one():
    live = LiveSettings()
    assert live.for_quorum(3) == ()  # nothing asked: quorums carry nothing
    assert live.request({"outer_lr": 0.5}) == {"outer_lr": 0.5}
    assert live.request({"outer_momentum": 0.8}) == {"outer_lr": 0.5, "outer_momentum": 0.8}
    first = SettingsChange(5, outer_lr=0.5, outer_momentum=0.8)
    assert live.for_quorum(4) == (first,)  # decided here: from step 5
    assert live.for_quorum(4) == (first,)  # the same quorum step again: not re-decided
    assert live.for_quorum(9) == (first,)
    # A second change keeps the first for the steps before it, and only the given field changes.
    live.request({"outer_lr": 0.1})
    second = SettingsChange(11, outer_lr=0.1, outer_momentum=0.8)
    assert live.for_quorum(10) == (first, second)
    assert live.for_quorum(11) == (second,)
    # A job sent back to an earlier step (a discarded history) still gets what applies there.
    assert live.for_quorum(6) == (first, second)
    assert live.status() == {"pending": None, "changes": [first.encode(), second.encode()]}


def test_a_newer_decision_replaces_what_an_older_one_said_about_later_steps():
    live = LiveSettings()
    live.request({"outer_lr": 0.5})
    live.for_quorum(20)
    live.request({"outer_lr": 0.2})
    # The job went back to step 7: the new value applies from 8 on, the old one nowhere.
    assert live.for_quorum(7) == (SettingsChange(8, outer_lr=0.2),)


def test_settings_at_picks_the_change_in_effect():
    changes = (SettingsChange(5, outer_lr=0.5), SettingsChange(9, outer_lr=0.1))
    assert settings_at(changes, 4) is None
    assert settings_at(changes, 5) == changes[0]
    assert settings_at(changes, 8) == changes[0]
    assert settings_at(changes, 12) == changes[1]


def test_the_quorum_step_is_the_state_it_continues_from():
    quorum = Quorum(1, (Member("a", step=3), Member("b", step=7), Member("c", step=0)), 0.0)
    assert quorum_step(quorum) == 7


def test_settings_travel_in_the_quorum_and_old_messages_have_none():
    quorum = Quorum(1, (Member("a", step=3),), 0.0)
    change = SettingsChange(4, outer_lr=0.25)
    info = protocol.decode_quorum(
        protocol.unpack(protocol.pack(protocol.encode_quorum(quorum, 1.0, (change,))))
    )
    assert info.settings == (change,)
    assert protocol.decode_quorum(protocol.encode_quorum(quorum, 1.0)).settings == ()
    with pytest.raises(protocol.ProtocolError, match="increasing"):
        protocol.decode_settings({"changes": [{"from_step": 4}, {"from_step": 4}]})
    with pytest.raises(protocol.ProtocolError, match="below 1"):
        protocol.settings_values({"outer_momentum": 1.0})
    with pytest.raises(protocol.ProtocolError, match=">= 0"):
        protocol.settings_values({"outer_lr": -0.1})


def test_the_plan_carries_the_settings_in_effect_at_its_step():
    from ftdiloco.coordination.plan import plan_quorum

    members = (Member("a", step=6, history="h"), Member("b", step=6, history="h"))
    changes = (SettingsChange(4, outer_lr=0.5), SettingsChange(7, outer_lr=0.1))
    info = Quorum(1, members, 0.0, changes)
    assert plan_quorum(info, "a", 0).outer_settings == changes[0]
    plain = Quorum(1, members, 0.0)
    assert plan_quorum(plain, "a", 0).outer_settings is None


# -- the lighthouse ----------------------------------------------------------------------


async def test_the_lighthouse_records_a_change_and_hands_it_to_every_member(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, token="s3cret")
    body = protocol.pack({"outer_lr": 0.3})
    status, answer = await post(session, server.url, "/v1/settings", body)
    assert (status, answer["error"]) == (401, "unauthorized")
    status, answer = await post(
        session, server.url, "/v1/settings", protocol.pack({"outer_lr": "x"}), "s3cret"
    )
    assert status == 400 and "outer_lr" in answer["message"]
    status, answer = await post(session, server.url, "/v1/settings", protocol.pack({}), "s3cret")
    assert status == 400 and "at least one" in answer["message"]
    status, answer = await post(session, server.url, "/v1/settings", body, "s3cret")
    assert status == 200 and answer["pending"] == {"outer_lr": 0.3}
    # JSON, as the dashboard and curl send it.
    async with session.post(
        server.url + "/v1/settings",
        json={"outer_momentum": 0.5},
        headers={"Authorization": "Bearer s3cret", "Accept": "application/json"},
    ) as response:
        assert response.status == 200
        assert (await response.json())["pending"] == {"outer_lr": 0.3, "outer_momentum": 0.5}

    answers = await asyncio.gather(
        join(session, server.url, "a", token="s3cret", step=4, expected_groups=2),
        join(session, server.url, "b", token="s3cret", step=2, expected_groups=2),
    )
    quorums = [quorum_of(a) for a in answers]
    expected = (SettingsChange(5, outer_lr=0.3, outer_momentum=0.5),)
    assert [q.settings for q in quorums] == [expected, expected]
    async with session.get(server.url + "/status") as response:
        settings = (await response.json())["settings"]
    assert settings == {"pending": None, "changes": [expected[0].encode()]}
    # Later quorums carry the same decision.
    answers = await asyncio.gather(
        join(session, server.url, "a", token="s3cret", step=5),
        join(session, server.url, "b", token="s3cret", step=5),
    )
    assert [quorum_of(a).settings for a in answers] == [expected, expected]


# -- two real groups -------------------------------------------------------------------------


@pytest.mark.integration
def test_the_outer_lr_changes_at_the_same_step_on_every_group(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from tests.chaos_support import assert_one_history, records, start_group
    from tests.procs import process_pool, start_lighthouse

    token = {"FTDILOCO_TOKEN": "s3cret"}
    logs = [tmp_path / f"g{g}.jsonl" for g in range(2)]
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2", env=token)
        common = {"WORKER_STEPS": "7", "WORKER_PAUSE_AT": "2", **token}
        groups = [start_group(procs, url, g, logs[g], **common) for g in range(2)]
        for g in groups:
            g.wait_for("PAUSED", timeout=90)  # both stopped between outer steps
        changed = subprocess.run(
            [
                sys.executable,
                "-m",
                "ftdiloco.operate.cli",
                "set-outer-lr",
                "0.25",
                "--momentum",
                "0.5",
            ],
            env={**_env(), "FTDILOCO_LIGHTHOUSE": url, **token},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert changed.returncode == 0, changed.stderr
        assert "outer_lr 0.25" in changed.stdout and "outer_momentum 0.5" in changed.stdout
        for g in groups:
            g.send("")
        for g in groups:
            g.wait_for("DONE", timeout=90)
            assert g.wait(timeout=30) == 0, g.tail()

    assert_one_history(logs)
    first_changed = {}
    for g, log in enumerate(logs):
        committed = [r for r in records(log) if r["committed"]]
        assert [r["step"] for r in committed][-1] == 7
        settings = [(r["step"], r["outer_lr"], r["outer_momentum"]) for r in committed]
        before = [s for s in settings if s[1] == 0.7]
        after = [s for s in settings if s[1] == 0.25]
        assert len(before) + len(after) == len(settings), settings
        assert all(m == 0.9 for _, _, m in before) and all(m == 0.5 for _, _, m in after)
        # Once changed, it stays changed.
        assert max(s for s, _, _ in before) < min(s for s, _, _ in after), settings
        first_changed[g] = min(s for s, _, _ in after)
    # The same outer step on both groups, and after the pause (not before the request).
    assert first_changed[0] == first_changed[1] > 3


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("FTDILOCO_")}
