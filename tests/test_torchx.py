"""The torchx component (`ftdiloco.train`, ftdiloco/operate/torchx_component.py) and .torchxconfig.

Skipped where torchx is not installed (`pip install -e '.[torchx]'`).  The
component is loaded the way `torchx run ftdiloco.train` loads it: by name,
from the package's `torchx.components` entry point, through torchx's own
finder, which also lints it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchx.specs", reason="torchx is not installed (extra: ftdiloco[torchx])")

from torchx.runner.config import get_config, get_configs
from torchx.specs import AppDef
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component, get_components

from ftdiloco.operate.launch import free_port
from tests.procs import ROOT, Proc

COMPONENT = "ftdiloco.train"
EXAMPLE = ["-m", "ftdiloco.examples.train_diloco"]


def appdef(*args: str) -> AppDef:
    component = get_component(COMPONENT)  # raises on lint errors
    return materialize_appdef(component.fn, list(args))


def test_the_entry_point_adds_ours_and_keeps_torchx_builtins() -> None:
    components = get_components()  # what `torchx builtins` lists
    assert COMPONENT in components
    assert not components[COMPONENT].validation_errors
    assert "dist.ddp" in components and "utils.echo" in components
    # Only `train`: torchx would list any other function of the module as a component.
    assert [name for name in components if name.startswith("ftdiloco.")] == [COMPONENT]


def roles(app: AppDef) -> dict[str, Any]:
    return {role.name: role for role in app.roles}


def test_lighthouse_role_and_one_torchrun_role_per_group() -> None:
    app = appdef(
        *("--groups", "3", "--nproc_per_node", "2", "--min_replicas", "2"),
        *("--sync_every", "25", "--outer_steps", "40", "--lighthouse_port", "29999"),
        *("--timeout", "20", "--token", "s3cret", "--cpu", "4", "--memMB", "2048"),
        *("--max_retries", "2", "--max_restarts", "5", "--image", "reg/ftdiloco:1"),
        *("--env", "EXTRA=1", "--log_dir", "/var/log/job", "--", "--model-size", "tiny"),
    )
    by_name = roles(app)
    assert list(by_name) == ["lighthouse", "group0", "group1", "group2"]

    lighthouse = by_name["lighthouse"]
    assert lighthouse.entrypoint == "python"
    assert lighthouse.args[:5] == ["-m", "ftdiloco.operate.cli", "lighthouse", "--groups", "3"]
    assert lighthouse.args[7:9] == ["--log-file", "/var/log/job/lighthouse.log"]
    daemon = lighthouse.args[lighthouse.args.index("--") + 1 :]
    assert daemon == [
        *("--bind", "127.0.0.1:29999", "--min-replicas", "2"),
        *("--join-timeout-ms", "10000"),
    ]
    assert lighthouse.port_map == {"lighthouse": 29999}
    assert lighthouse.env["FTDILOCO_TOKEN"] == "s3cret"
    assert lighthouse.max_retries == 2

    for index in range(3):
        group = by_name[f"group{index}"]
        assert group.image == "reg/ftdiloco:1"
        assert group.entrypoint == "python"
        assert group.args == [
            *("-m", "torch.distributed.run", "--standalone", "--nnodes=1"),
            *("--nproc_per_node=2", "--max_restarts=5"),
            *(f"--log-dir=/var/log/job/group{index}", "--tee=3", *EXAMPLE),
            *("--outer-steps", "40", "--sync-every", "25", "--model-size", "tiny"),
        ]
        assert group.env == {
            "PYTHONUNBUFFERED": "1",
            "EXTRA": "1",
            "FTDILOCO_TOKEN": "s3cret",
            "FTDILOCO_LIGHTHOUSE": "http://127.0.0.1:29999",
            "NUM_REPLICA_GROUPS": "3",
            "FTDILOCO_MIN_REPLICAS": "2",
            "FTDILOCO_TIMEOUT": "20",
            "FTDILOCO_HOST": "127.0.0.1",
            "REPLICA_GROUP_ID": str(index),
        }
        assert (group.resource.cpu, group.resource.gpu, group.resource.memMB) == (4, 0, 2048)
        assert group.max_retries == 2


def test_cluster_settings_an_external_lighthouse_and_bad_values() -> None:
    remote = roles(appdef("--lighthouse_host", "lh.example.internal", "--token_file", "/t"))
    daemon = remote["lighthouse"].args[remote["lighthouse"].args.index("--") + 1 :]
    assert daemon[:2] == ["--bind", "0.0.0.0:29510"]
    assert daemon[-2:] == ["--token-file", "/t"]
    assert "FTDILOCO_TOKEN_FILE" not in remote["lighthouse"].env
    group = remote["group0"]
    assert group.env["FTDILOCO_LIGHTHOUSE"] == "http://lh.example.internal:29510"
    assert group.env["FTDILOCO_TOKEN_FILE"] == "/t"
    assert "FTDILOCO_HOST" not in group.env  # each node advertises its own name

    external = roles(appdef("--lighthouse", "http://lh:29510", "--groups", "2"))
    assert list(external) == ["group0", "group1"]
    assert external["group1"].env["FTDILOCO_LIGHTHOUSE"] == "http://lh:29510"

    with pytest.raises(ValueError, match="nothing could commit"):
        appdef("--groups", "2", "--min_replicas", "3")


def test_a_script_path_and_no_log_dir() -> None:
    app = roles(appdef("--script", "train.py", "--log_dir", "", "--", "--x"))
    assert "--log-file" not in app["lighthouse"].args
    assert app["group0"].args[-2:] == ["train.py", "--x"]
    assert not any(a.startswith(("--log-dir", "--tee")) for a in app["group0"].args)


def test_torchxconfig_makes_plain_torchx_run_use_the_component_on_local_cwd() -> None:
    dirs = [str(ROOT)]
    assert get_config(prefix="cli", name="run", key="component", dirs=dirs) == COMPONENT
    assert get_config(prefix="cli", name="run", key="scheduler", dirs=dirs) == "local_cwd"
    defaults = get_configs(prefix="component", name=COMPONENT, dirs=dirs)
    component = get_component(COMPONENT)
    app = materialize_appdef(component.fn, [], defaults)
    assert app.roles[1].args[-2:] == ["--model-size", "tiny"]


@pytest.fixture
def torchx_runs() -> Iterator[list[Proc]]:
    """`torchx run` processes; SIGTERM makes torchx cancel its app (every role) first."""
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.integration
def test_torchx_run_on_local_cwd_trains_and_succeeds(
    torchx_runs: list[Proc], tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    bindir = str(Path(sys.executable).parent)
    torchx = str(Path(bindir) / "torchx")
    if not Path(torchx).exists():
        pytest.skip("no torchx command next to this Python")
    started = time.monotonic()
    proc = Proc(
        "torchx",
        [
            # No scheduler log_dir: torchx's own would be a temporary directory it deletes.
            *(torchx, "run", "-s", "local_cwd", COMPONENT),
            *("--groups", "2", "--outer_steps", "3", "--sync_every", "10", "--timeout", "10"),
            *("--log_dir", str(logs)),
            *("--lighthouse_port", str(free_port()), "--lighthouse_idle_exit", "1"),
            *("--", "--model-size", "tiny"),
        ],
        # The roles run `python` from PATH: this venv's.
        env={"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    torchx_runs.append(proc)
    code = proc.wait(timeout=90)
    with contextlib.suppress(EOFError):  # every line read: the output has ended
        proc.wait_line(lambda line: False, timeout=10, what="the end of the output")
    out = "".join(proc.output)
    assert code == 0, out
    assert "SUCCEEDED" in out
    for group in ("group0", "group1"):
        # torchrun tees the worker output, prefixed with its local rank.
        assert re.search(rf"{group}/0 (\[default0\]:)?done \| 3 outer steps committed", out), out
    assert "came and went; stopping the lighthouse" in out
    assert time.monotonic() - started < 60
    # The logs outlive the run.
    lighthouse_log = (logs / "lighthouse.log").read_text()
    assert "lighthouse listening on" in lighthouse_log and "came and went" in lighthouse_log
    for group in ("group0", "group1"):
        worker_logs = [p.read_text() for p in (logs / group).rglob("stdout.log")]
        assert any("done | 3 outer steps committed" in text for text in worker_logs), group
