"""The package as a user gets it: a wheel, installed in a fresh venv, run outside the checkout.

The wheel is built from a copy of the sources (no build isolation, nothing
downloaded) and installed with ``--no-deps`` into a new venv that sees the
dev venv's site-packages through a path file, so torch and the other
dependencies are found without downloading them.  The dev venv's editable
install is not active there (path files in an added directory are not
processed), so ``ftdiloco`` can only come from the wheel.  Every command
runs in a temporary directory, never in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.integration

TRAIN_EXTRA = "pip install 'ftdiloco[train]'"


class Installed:
    def __init__(self, prefix: Path, home: Path) -> None:
        self.prefix = prefix
        self.home = home  # the working directory: outside the checkout
        self.python = str(prefix / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.prefix / "bin" / name)

    def run(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FTDILOCO"))}
        return subprocess.run(
            argv,
            cwd=self.home,
            env={**clean, "PATH": f"{self.prefix / 'bin'}{os.pathsep}{clean.get('PATH', '')}"}
            | (env or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _sources() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    for name in _sources():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    dist = base / "dist"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-q", "-w", str(dist), str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = dist.glob("ftdiloco-*.whl")
    prefix = base / "venv"
    venv.EnvBuilder(with_pip=False).create(prefix)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(prefix / "bin" / "python")),
            *("install", "--no-deps", "--no-index", "-q", str(wheel)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (site,) = prefix.glob("lib/python*/site-packages")
    (site / "dev-venv-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    home = base / "home"
    home.mkdir()
    yield Installed(prefix, home)


def test_public_names_import_from_the_wheel(installed: Installed) -> None:
    result = installed.run(
        installed.python,
        "-c",
        "import ftdiloco\n"
        "from ftdiloco import Manager, DiLoCo, LocalSGD, Config, ShardSampler, SyncReport\n"
        "print(ftdiloco.__file__)",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(installed.prefix)), result.stdout


def test_without_the_train_extra_one_line_names_it(installed: Installed) -> None:
    # A None in sys.modules makes `import safetensors` fail as if it were not installed.
    blocked = "import sys; sys.modules['safetensors'] = None; "
    result = installed.run(installed.python, "-c", blocked + "from ftdiloco import Manager")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "safetensors is not installed" in last and TRAIN_EXTRA in last
    # The example, as a program: that one line and nothing else.
    result = installed.run(
        installed.python,
        "-c",
        blocked + "import runpy; runpy.run_module('ftdiloco.examples.train_diloco', "
        "run_name='__main__')",
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and TRAIN_EXTRA in result.stderr, result.stderr


def test_the_example_ships_with_the_package(installed: Installed) -> None:
    result = installed.run(installed.python, "-m", "ftdiloco.examples.train_diloco", "--help")
    assert result.returncode == 0, result.stderr
    assert "--outer-steps" in result.stdout


def test_both_daemon_command_names(installed: Installed) -> None:
    for name in ("ftdiloco-lighthouse", "lighthouse"):
        result = installed.run(installed.bin(name), "--help")
        assert result.returncode == 0, result.stderr
        assert "--min-replicas" in result.stdout


def test_launch_refuses_a_missing_script_before_starting_anything(installed: Installed) -> None:
    result = installed.run(installed.bin("ftdiloco"), "launch", "--script", "nope.py")
    assert result.returncode == 2
    assert result.stderr == "ftdiloco launch: --script nope.py: no such file\n"
    assert result.stdout == ""  # nothing was started


def test_launch_runs_the_packaged_example_by_default(installed: Installed) -> None:
    result = installed.run(
        installed.bin("ftdiloco"),
        *("launch", "--groups", "1", "--min-replicas", "1", "--outer-steps", "1"),
        *("--", "--model-size", "tiny", "--sync-every", "5"),
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[group0] done | 1 outer steps committed" in result.stdout


def test_standalone_from_the_wheel(installed: Installed) -> None:
    result = installed.run(
        installed.python,
        *("-m", "ftdiloco.examples.train_diloco", "--model-size", "tiny", "--outer-steps", "1"),
        *("--sync-every", "3", "--batch-size", "4", "--sample-bytes", "20"),
        env={"FTDILOCO_LIGHTHOUSE": "none", "OMP_NUM_THREADS": "1"},
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("standalone: FTDILOCO_LIGHTHOUSE=none")
    assert "final eval" in result.stdout and "\nsample | def " in result.stdout


def test_torchx_builtins_lists_the_component(installed: Installed) -> None:
    pytest.importorskip("torchx", reason="torchx is not installed (extra: ftdiloco[torchx])")
    result = installed.run(installed.python, "-m", "torchx.cli.main", "builtins")
    assert result.returncode == 0, result.stderr
    assert "ftdiloco.train" in result.stdout
    assert "dist.ddp" in result.stdout  # torchx's own builtins are still there
