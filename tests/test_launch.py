"""`ftdiloco launch`, `ftdiloco status` and `ftdiloco lighthouse`, as a user runs them.

The launcher tests start the real thing (lighthouse, torchrun, the example
script with the tiny model) and read what it prints.  Each launcher is ended
in its fixture by PID: SIGTERM first, which makes it stop its own children,
then SIGKILL.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftdiloco.operate import cli
from ftdiloco.operate.launch import (
    EXIT_OUTPUT_CLOSED,
    Group,
    Kill,
    LaunchOptions,
    _Output,
    alive,
    compact_log,
    free_port,
    printable,
    process_tree,
)
from ftdiloco.training import events
from ftwire.messages import Member
from lighthouse.cli import LISTENING, listening_url
from lighthouse.client import LighthouseClient
from tests.procs import Proc, process_pool, start_lighthouse

TINY = ["--", "--model-size", "tiny", "--sync-every", "10"]
HAS_PROC = Path("/proc/self/stat").exists()


def ftdiloco(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftdiloco.operate.cli", *args]


@pytest.fixture
def launcher() -> Iterator[list[Proc]]:
    """Launchers started by a test; each is stopped the way a user would, then killed."""
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # it stops every child it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_launcher(started: list[Proc], *args: str) -> Proc:
    proc = Proc("launcher", ftdiloco("launch", "--timeout", "10", *args))
    started.append(proc)
    return proc


def finish(proc: Proc, timeout: float) -> tuple[int, str]:
    """The exit code and the whole output, once the reader has seen its end."""
    code = proc.wait(timeout=timeout)
    with contextlib.suppress(EOFError):  # raised once the output has ended: all lines are in
        proc.wait_line(lambda line: False, timeout=10, what="the end of the output")
    return code, "".join(proc.output)


# -- the pieces, without processes ----------------------------------------------------


def test_step_and_done_events_round_trip_and_other_lines_are_not_events() -> None:
    stream = io.StringIO()
    step = events.StepEvent(7, True, False, 3, 2.314)
    healed = events.StepEvent(8, True, True, 3, 2.2, eval_loss=2.4)
    back = events.StepEvent(9, False, False, 1, math.nan)
    done = events.DoneEvent(5, 0, 2.815, 2.9)
    for event in (step, healed, back, done):
        events.emit(event, stream)
    lines = stream.getvalue().splitlines()
    assert [events.parse(line) for line in lines] == [
        step,
        healed,
        events.StepEvent(9, False, False, 1, None),  # a NaN loss travels as null
        done,
    ]
    # What people read is not an event, however much it looks like one.
    assert events.parse("outer step 7 | loss 2.314 | participants 3 | committed") is None
    assert events.parse(events.PREFIX + '{"kind": "outer_step", "step": "7"}') is None
    assert events.parse(events.PREFIX + "not json") is None


def test_library_logs_are_compact_and_info_is_hidden_unless_verbose() -> None:
    warning = json.dumps(
        {"event": "quorum member lost", "level": "warning", "timestamp": "t", "member": "group0"}
    )
    assert compact_log(warning, verbose=False) == "warning: quorum member lost | member=group0"
    info = json.dumps({"event": "quorum", "level": "info", "step": 3})
    assert compact_log(info, verbose=False) is None
    assert compact_log(info, verbose=True) == "info: quorum | step=3"
    assert (
        compact_log("outer step 1 | loss 4.5 | ...\n", verbose=False)
        == "outer step 1 | loss 4.5 | ..."
    )
    assert compact_log("{not json", verbose=False) == "{not json"


def test_options_are_checked_and_the_target_is_found_in_script_args() -> None:
    with pytest.raises(ValueError, match="no outer step could commit"):
        LaunchOptions(groups=2, min_replicas=3)
    with pytest.raises(ValueError, match="kill_every"):
        LaunchOptions(kill_every=0)
    assert LaunchOptions(outer_steps=7).target_steps() == 7
    assert LaunchOptions(script_args=("--outer-steps", "9")).target_steps() == 9
    assert LaunchOptions(script_args=("--outer-steps=4",)).target_steps() == 4
    assert LaunchOptions().target_steps() is None


def test_the_default_script_is_the_packaged_example_and_a_script_must_exist(
    tmp_path: Path,
) -> None:
    assert LaunchOptions().script_command() == ["-m", "ftdiloco.examples.train_diloco"]
    script = tmp_path / "train.py"
    script.write_text("")
    assert LaunchOptions(script=str(script)).script_command() == [str(script)]
    with pytest.raises(ValueError, match=r"^--script .*missing\.py: no such file$"):
        LaunchOptions(script=str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="is a directory"):
        LaunchOptions(script=str(tmp_path))


def test_a_missing_script_is_one_line_and_starts_nothing() -> None:
    result = subprocess.run(
        ftdiloco("launch", "--script", "no/such/train.py"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == "ftdiloco launch: --script no/such/train.py: no such file\n"
    assert result.stdout == ""


def test_launch_flags_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", "--groups", "2", "--min-replicas", "3"])
    assert exit_info.value.code == 2
    assert "no outer step could commit" in capsys.readouterr().err


def test_the_status_line_marks_down_and_recovering_groups() -> None:
    class FakeChild:
        killed = False

    group = Group(1, step=7)
    assert group.state() == "step 7"
    group.pending_kill = Kill(1, at=0.0, step=7)
    assert group.state() == "DOWN"  # killed, not started again yet
    group.child = FakeChild()  # type: ignore[assignment]
    assert group.state() == "recovering"  # running again, not yet committed
    group.pending_kill = None
    group.finished = True
    assert group.state() == "done"
    assert Group(0).state() == "starting"


def test_child_lines_cannot_move_the_cursor() -> None:
    assert printable("inner step 3/50\rinner step 4/50\r\x1b[Kouter step 1") == "outer step 1"
    assert printable("progress\r") == "progress"
    assert printable("\x1b[2Jclear\x07") == "clear"


def test_output_to_a_closed_pipe_is_dropped_and_reported_once() -> None:
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    out = _Output(Closed(), live=True)
    calls: list[int] = []
    out.on_closed = lambda: calls.append(1)
    out.set_status("quorum #1")
    out.line("group0", "outer step 1")
    out.plain("summary")
    out.finish()
    assert out.closed and calls == [1]


def test_a_log_line_is_written_above_the_status_line() -> None:
    stream = io.StringIO()
    out = _Output(stream, live=True)
    out.set_status("STATUS")
    out.line("group0", "hello\rworld")
    # Clear the status, write the line, draw the status again: one write each time.
    assert stream.getvalue() == "STATUS\r\x1b[K[group0] world\nSTATUS"


def test_status_table_shows_quorum_and_members() -> None:
    doc = {
        "quorum_id": 12,
        "epoch": 10,
        "reason": "fast quorum",
        "previous_quorum": {"quorum_id": 12, "members": [{"replica_id": "group0"}]},
        "joiners": [{"replica_id": "group1"}],
        "replicas": [
            {
                "replica_id": "group0",
                "step": 4,
                "address": "http://127.0.0.1:1234",
                "heartbeat_age_s": 0.25,
                "connected": True,
                "in_quorum": True,
                "recovering": False,
            },
            {"replica_id": "group1", "step": None, "address": None, "heartbeat_age_s": None},
        ],
    }
    text = cli.format_status(doc, "http://127.0.0.1:29510")
    assert "quorum 12 (#2 since the lighthouse started), 1 members: group0" in text
    assert "waiting to join the next quorum: group1" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[-3:]}
    assert rows["REPLICA"][:3] == ["REPLICA", "STEP", "ADDRESS"]
    assert rows["group0"][:5] == ["group0", "4", "http://127.0.0.1:1234", "0.2s", "ago"]
    assert rows["group0"][5:] == ["yes", "yes", "no"]
    assert rows["group1"][:4] == ["group1", "-", "-", "-"]


# -- ftdiloco status against a real lighthouse -------------------------------------------


@pytest.mark.integration
def test_status_against_a_real_lighthouse(capsys: pytest.CaptureFixture[str]) -> None:
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "1")
        with LighthouseClient(url) as client:
            member = Member("trainer-a", address="http://127.0.0.1:9", step=3)
            quorum = client.join(member, timeout=10)

            assert cli.status(url) == 0
            table = capsys.readouterr().out
            assert f"quorum {quorum.quorum_id} (#1 since the lighthouse started)" in table
            assert re.search(r"^trainer-a\s+3\s+http://127\.0\.0\.1:9\s", table, re.MULTILINE)

            assert cli.status(url, as_json=True) == 0
            doc = json.loads(capsys.readouterr().out)
            assert doc["previous_quorum"]["quorum_id"] == quorum.quorum_id
            assert [r["replica_id"] for r in doc["replicas"]] == ["trainer-a"]


def test_status_of_an_unreachable_lighthouse_exits_2() -> None:
    port = free_port()  # nothing listens there now
    result = subprocess.run(
        ftdiloco("status", "--lighthouse", f"127.0.0.1:{port}", "--timeout", "0.5"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == cli.EXIT_UNREACHABLE
    assert result.stdout == ""
    # One line saying what is wrong, not the client's retries.
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot read the lighthouse's status" in result.stderr and str(port) in result.stderr


# -- ftdiloco lighthouse (the batch job's lighthouse) --------------------------------------


@pytest.mark.integration
def test_batch_lighthouse_stops_once_every_group_came_and_went() -> None:
    with process_pool() as procs:
        proc = Proc(
            "lighthouse",
            ftdiloco(
                *("lighthouse", "--groups", "2", "--idle-exit", "0.5", "--"),
                *("--bind", "127.0.0.1:0", "--min-replicas", "1"),
            ),
        )
        procs.append(proc)
        url = listening_url(proc.wait_for(LISTENING, timeout=30))
        with LighthouseClient(url) as first:
            first.start_liveness("group0", lambda event: None)
            proc.wait_for("saw group0 (1 of 2 groups)", timeout=30)
            first.stop_liveness()
        with LighthouseClient(url) as client:
            deadline = time.monotonic() + 30
            while any(r.get("connected") for r in client.status()["replicas"]):
                assert time.monotonic() < deadline, "group0's disconnect was never noticed"
                time.sleep(0.05)
        # Idle past --idle-exit: a wrapper that took one group for all would exit now;
        # this one says why it stays, and must still be there to see the second group.
        proc.wait_for("idle with 1 of 2 groups seen; waiting for the others", timeout=30)
        assert proc.popen.poll() is None
        with LighthouseClient(url) as second:
            second.start_liveness("group1", lambda event: None)
            proc.wait_for("saw group1 (2 of 2 groups)", timeout=30)
        assert proc.wait(timeout=15) == 0
        proc.wait_for("came and went", timeout=10)


# -- the launcher, end to end ---------------------------------------------------------


@pytest.mark.integration
def test_launch_runs_a_job_to_the_end_and_summarises(launcher: list[Proc]) -> None:
    proc = start_launcher(launcher, "--groups", "2", "--outer-steps", "3", *TINY)
    code, out = finish(proc, timeout=90)
    assert code == 0, out
    for group in ("group0", "group1"):
        assert re.search(rf"^\[{group}\] outer step 3 \| loss .* \| committed", out, re.M), out
        assert re.search(rf"^\[{group}\] done \| 3 outer steps committed", out, re.M), out
    assert "result: success: all 2 groups finished" in out
    assert re.search(r"^group0\s+1\s+3\s+0\s+\d+\.\d{3}\s+(-|\d+\.\d{3})$", out, re.M), out
    assert re.search(r"^final loss: \d+\.\d{3}", out, re.M), out
    # The packaged example evaluates on the same held-out split in every group.
    assert re.search(r"^held-out loss: \d+\.\d{3} \(mean over groups, same split\)", out, re.M)


@pytest.mark.integration
def test_kill_every_kills_restarts_and_reports_the_recovery(launcher: list[Proc]) -> None:
    # Many steps, so the launcher sees time to recover; we stop it once it has.
    proc = start_launcher(
        launcher,
        *("--groups", "2", "--min-replicas", "1", "--kill-every", "1", "--outer-steps", "500"),
        *TINY,
    )
    killed = proc.wait_for("[launcher] SIGKILL group", timeout=90)
    victim = re.search(r"SIGKILL (group\d)", killed)
    assert victim is not None
    proc.wait_for(f"[launcher] started {victim[1]}", timeout=30)  # the restart
    recovered = proc.wait_for(f"[launcher] {victim[1]} recovered", timeout=60)
    assert re.search(r"after the kill", recovered)
    os.kill(proc.pid, signal.SIGINT)
    code, out = finish(proc, timeout=30)
    assert code == 130, out
    assert re.search(
        r"failures injected: [1-9]\d*, survived \(group back and committing\): [1-9]", out
    )
    assert re.search(rf"{victim[1]}: killed at outer step \d+, recovered in \d+\.\ds", out), out
    assert re.search(rf"^{victim[1]}\s+2\s", out, re.M), "the victim was started twice"


@pytest.mark.integration
@pytest.mark.skipif(not HAS_PROC, reason="finds the launcher's process tree in /proc")
def test_ctrl_c_stops_every_process_the_launcher_started(launcher: list[Proc]) -> None:
    proc = start_launcher(launcher, "--groups", "2", "--outer-steps", "500", *TINY)
    # Each worker prints its model line once it runs: then every process is up.
    deadline = time.monotonic() + 90
    while sum("tiny model" in line for line in proc.output) < 2:
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.tail()
        time.sleep(0.1)
    tree = process_tree(proc.pid)
    # launcher, lighthouse, and per group a torchrun and its worker
    assert len(tree) >= 6, tree
    os.kill(proc.pid, signal.SIGINT)
    code, out = finish(proc, timeout=30)
    assert code == 130, out
    assert "stopping every process this launcher started" in out
    assert "result: stopped (interrupted)" in out
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if alive(p)], "processes outlived the launcher"


@pytest.mark.integration
def test_out_keeps_logs_steps_summary_and_plots(launcher: list[Proc], tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_launcher(launcher, "--groups", "2", "--outer-steps", "2", "--out", str(out), *TINY)
    code, text = finish(proc, timeout=90)
    assert code == 0, text
    for group in ("group0", "group1"):
        assert "done | 2 outer steps committed" in (out / f"{group}.log").read_text()
    assert "lighthouse listening on" in (out / "lighthouse.log").read_text()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert sorted((r["group"], r["step"]) for r in steps) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(r["committed"] and r["loss"] > 0 for r in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 0
    assert [g["committed"] for g in summary["groups"]] == [2, 2]
    assert summary["final_loss"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"kept in {out}" in text


@pytest.mark.integration
@pytest.mark.skipif(not HAS_PROC, reason="finds the launcher's process tree in /proc")
@pytest.mark.parametrize("then_ctrl_c", [False, True], ids=["reader-gone", "tee-and-ctrl-c"])
def test_a_closed_pipe_stops_everything_without_a_traceback(
    launcher: list[Proc], then_ctrl_c: bool
) -> None:
    """`ftdiloco launch | head -n 5` and `| tee` killed by the same Ctrl-C."""
    read_end, write_end = os.pipe()
    popen = subprocess.Popen(
        ftdiloco("launch", "--timeout", "10", "--groups", "2", "--outer-steps", "500", *TINY),
        cwd=Path(__file__).resolve().parent.parent,
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    reader = os.fdopen(read_end)
    try:
        # Read until both workers run, like `head` would, then go away.
        seen = 0
        while seen < 2:
            line = reader.readline()
            assert line, "the launcher ended early"
            seen += "tiny model" in line
        tree = process_tree(popen.pid)
        assert len(tree) >= 6, tree
        reader.close()
        if then_ctrl_c:
            os.kill(popen.pid, signal.SIGINT)
        # Else the launcher notices at its next write: a group's next line.
        code = popen.wait(timeout=60)
        stderr = popen.stderr.read() if popen.stderr else ""
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert code == (130 if then_ctrl_c else EXIT_OUTPUT_CLOSED), stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    # Every process it started is gone (by the time it exits, not ~10 s later).
    assert not [p for p in tree if alive(p)], "processes outlived the launcher"


# -- ftdiloco kill / checkpoint / shutdown, and status from the environment -----------


def test_the_lighthouse_comes_from_the_flag_or_the_environment() -> None:
    env = {"FTDILOCO_LIGHTHOUSE": "lh:1", "FTDILOCO_TOKEN": "s3cret"}
    assert cli.lighthouse_and_token(None, env) == ("http://lh:1", "s3cret")
    assert cli.lighthouse_and_token("other:2", env) == ("http://other:2", "s3cret")
    with pytest.raises(ValueError, match="give --lighthouse URL or set FTDILOCO_LIGHTHOUSE"):
        cli.lighthouse_and_token(None, {})
    with pytest.raises(ValueError, match="standalone job has no lighthouse"):
        cli.lighthouse_and_token(None, {"FTDILOCO_LIGHTHOUSE": "none"})


def test_operator_commands_without_a_lighthouse_say_so_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTDILOCO", "TORCHFT"))}
    for command in ("status", "kill group0", "checkpoint", "shutdown"):
        result = subprocess.run(
            ftdiloco(*command.split()), capture_output=True, text=True, timeout=30, env=env
        )
        assert result.returncode == cli.EXIT_UNREACHABLE, result.stderr
        assert result.stderr == (
            f"ftdiloco {command.split()[0]}: no lighthouse: give --lighthouse URL or set "
            "FTDILOCO_LIGHTHOUSE\n"
        )


@pytest.mark.integration
def test_kill_checkpoint_shutdown_with_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with process_pool() as procs:
        daemon, url = start_lighthouse(
            procs, "--min-replicas", "1", "--token-file", str(token_file)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FTDILOCO", "TORCHFT"))}
        env["FTDILOCO_LIGHTHOUSE"] = url

        def run(*args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
            extra = {"FTDILOCO_TOKEN_FILE": str(token_file)} if token else {}
            return subprocess.run(
                ftdiloco(*args), capture_output=True, text=True, timeout=30, env={**env, **extra}
            )

        with LighthouseClient(url, "s3cret") as group:
            group.start_liveness("group0", lambda event: None)
            shown = run("status")  # --lighthouse from FTDILOCO_LIGHTHOUSE
            assert shown.returncode == 0, shown.stderr
            assert re.search(r"^group0\s", shown.stdout, re.M), shown.stdout

            refused = run("kill", "0", token=False)
            assert refused.returncode == cli.EXIT_UNREACHABLE
            assert refused.stderr.startswith("ftdiloco kill: ") and refused.stderr.count("\n") == 1

            # group0's address is not a manager (no server behind it): said per group.
            asked = run("checkpoint")
            assert asked.returncode == cli.EXIT_UNREACHABLE
            assert asked.stdout.startswith("group0: ") or "no connected group" in asked.stderr

            killed = run("kill", "0")
            assert killed.returncode == 0, killed.stderr
            assert killed.stdout == "killed group0\n"

        stopped = run("shutdown")
        assert stopped.returncode == 0, stopped.stderr
        assert daemon.wait(timeout=15) == 0
