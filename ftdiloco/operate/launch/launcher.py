"""Run a whole job on this machine, and break it on purpose (``ftdiloco launch``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from ftdiloco.hub.cli import listening_url as hub_listening_url
from ftdiloco.operate.launch.processes import Child, free_port
from ftdiloco.operate.launch.record import Record, json_float
from ftdiloco.operate.launch.swarm import StageLayout
from ftdiloco.operate.launch.terminal import _Output, compact_log
from ftdiloco.training import events
from lighthouse.cli import listening_url

# The launcher's exit code when its output was closed: 128 + SIGPIPE, as a shell reports it.
EXIT_OUTPUT_CLOSED = 141

# `ftdiloco launch`'s default training script (`torchrun -m` runs it).
EXAMPLE_MODULE = "ftdiloco.examples.train_diloco"
STATUS_POLL_S = 1.0
# How long to wait between checks when a kill is due but no group is a fair victim.
_KILL_RETRY_S = 0.5


@dataclass(frozen=True)
class LaunchOptions:
    groups: int = 3
    nproc_per_node: int = 1
    min_replicas: int = 2
    # Groups of unequal speed: FTDILOCO_DYLU and FTDILOCO_MODE for every group.
    dylu: bool = False
    mode: str = "sync"
    # "hub": the groups train through `ftdiloco hub` (FTDILOCO_HUB) instead of a lighthouse.
    topology: str = "direct"
    kill_every: float | None = None
    duration: float | None = None
    outer_steps: int | None = None
    # A training script's path; None: the example that ships with the package.
    script: str | None = None
    script_args: tuple[str, ...] = ()
    # FTDILOCO_TIMEOUT for the groups; the lighthouse waits half of it for stragglers.
    timeout: float = 10.0
    verbose: bool = False
    seed: int | None = None
    # None: a live status line only when stdout is a terminal.
    status_line: bool | None = None
    # Keep logs, per-step JSONL, a summary JSON and plots here.
    out_dir: str | None = None
    # A DiLoCo-SWARM pipeline: the groups are its stage workers (groups = stages x workers).
    swarm: StageLayout | None = None

    def __post_init__(self) -> None:
        if self.groups < 1 or self.nproc_per_node < 1 or self.min_replicas < 1:
            raise ValueError("groups, nproc_per_node and min_replicas must be >= 1")
        # A stage worker's quorum is its stage's room.
        per_quorum = self.groups if self.swarm is None else self.swarm.workers_per_stage
        if self.min_replicas > per_quorum:
            raise ValueError(
                f"min_replicas={self.min_replicas} is more than the {per_quorum} "
                f"{'groups' if self.swarm is None else 'workers per stage'}: "
                "no outer step could commit"
            )
        if self.swarm is not None:
            self.swarm.check(self.groups, self.nproc_per_node, self.script)
        for name in ("kill_every", "duration", "timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.topology not in ("direct", "hub"):
            raise ValueError(f"topology must be direct or hub, got {self.topology!r}")
        if self.topology == "hub" and self.nproc_per_node > 1:
            raise ValueError("--topology hub runs one rank per group (--nproc-per-node 1)")
        if self.outer_steps is not None and self.outer_steps < 1:
            raise ValueError(f"outer_steps must be >= 1, got {self.outer_steps}")
        # Checked here, before anything starts: torchrun would otherwise fail in
        # every group with a page of tracebacks.
        if self.script is not None and not os.path.isfile(self.script):
            problem = "is a directory" if os.path.isdir(self.script) else "no such file"
            raise ValueError(f"--script {self.script}: {problem}")

    def script_command(self) -> list[str]:
        """What torchrun runs: the script's path, or ``-m`` the packaged example."""
        if self.script is None:
            return ["-m", EXAMPLE_MODULE]
        return [self.script]

    def target_steps(self) -> int | None:
        """The outer steps the script will run, if the launcher can tell."""
        if self.outer_steps is not None:
            return self.outer_steps
        args = list(self.script_args)
        found: int | None = None
        for i, arg in enumerate(args):
            value = None
            if arg == "--outer-steps" and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith("--outer-steps="):
                value = arg.partition("=")[2]
            if value is not None and value.isdigit():
                found = int(value)  # argparse keeps the last one; so do we
        return found


@dataclass
class Kill:
    group: int
    at: float  # monotonic
    step: int | None  # the group's last committed step when it was killed
    recovered_after: float | None = None
    back_at_step: int | None = None
    healed: bool = False


@dataclass
class Group:
    index: int
    child: Child | None = None
    starts: int = 0
    committed: int = 0
    rolled_back: int = 0
    step: int | None = None  # last step reported
    loss: float = math.nan
    finished: bool = False
    lines_since_start: int = 0  # outer-step lines from the current process
    first_step_after: float | None = None  # seconds from its first start to its first step line
    step_times: list[float] = field(default_factory=list)
    pending_kill: Kill | None = None
    eval_loss: float = math.nan  # last held-out loss reported
    label: str = ""  # the name when not group<index> (a stage worker)

    def state(self) -> str:
        """For the status line: the last step, or what keeps it from training."""
        if self.finished:
            return "done"
        kill = self.pending_kill
        if kill is not None:
            restarted = self.child is not None and not self.child.killed
            return "recovering" if restarted else "DOWN"
        if self.step is None:
            return "starting"
        return f"step {self.step}"

    @property
    def name(self) -> str:
        return self.label or f"group{self.index}"

    def step_interval(self) -> float | None:
        """Recent seconds per outer step, from this group's own lines."""
        times = self.step_times[-6:]
        if len(times) < 2:
            return None
        return (times[-1] - times[0]) / (len(times) - 1)


# -- the launcher -------------------------------------------------------------------


class _Launcher:
    def __init__(self, options: LaunchOptions, out: TextIO) -> None:
        self.options = options
        live = out.isatty() if options.status_line is None else options.status_line
        self.out = _Output(out, live)
        self.out.on_closed = self._on_output_closed
        self.output_closed = False
        self.record = Record(options.out_dir) if options.out_dir is not None else None
        self.rng = random.Random(options.seed)
        swarm = options.swarm
        self.groups = [
            Group(i, label=swarm.name(i) if swarm else "") for i in range(options.groups)
        ]
        self.lighthouse: Child | None = None
        self.url = ""
        # --topology hub without --out: the hub's state file lives here for the job.
        self._hub_dir: tempfile.TemporaryDirectory[str] | None = None
        self.env: dict[str, str] = {}
        self.lighthouse_args: list[str] = []
        self.kills: list[Kill] = []
        self.status: dict[str, Any] | None = None
        self.started = time.monotonic()
        self.done = asyncio.Event()
        self.failure: str | None = None
        self.interrupted = False
        self.duration_reached = False
        self.shutting_down = False
        self.tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self._prepare_env()
            await self._start_lighthouse()
            if self.failure is None:
                for group in self.groups:
                    await self._start_group(group)
                self.tasks.append(asyncio.create_task(self._poll_status()))
                if self.options.kill_every is not None:
                    self.tasks.append(asyncio.create_task(self._chaos(self.options.kill_every)))
                if self.options.duration is not None:
                    self.tasks.append(asyncio.create_task(self._deadline(self.options.duration)))
                await self.done.wait()
        finally:
            self.shutting_down = True
            for task in self.tasks:
                task.cancel()
            await self._stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self.out.finish()
        self._summary()
        code = self.exit_code()
        if self.record is not None:
            self._save_record(code)
        return code

    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.output_closed:
            return EXIT_OUTPUT_CLOSED
        return 1 if self.failure is not None else 0

    def _on_signal(self, sig: signal.Signals) -> None:
        # Flags first: saying so may fail (the pipe's reader got the same Ctrl-C).
        again = self.interrupted
        self.interrupted = True
        self.done.set()
        if again:
            # A second Ctrl-C does not wait out the grace period: SIGKILL now.
            for child in [*(g.child for g in self.groups), self.lighthouse]:
                if child is not None:
                    child.kill()
            return
        self._say(f"{sig.name}: stopping every process this launcher started")

    def _on_output_closed(self) -> None:
        # Nobody reads us any more (`| head` exited): stop the job, as SIGPIPE would.
        if not self.output_closed and not self.interrupted:
            self.output_closed = True
            self.done.set()

    def _fail(self, reason: str) -> None:
        if self.failure is None and not self.shutting_down:
            self.failure = reason
            self._say(f"job failed: {reason}")
        self.done.set()

    def _say(self, text: str) -> None:
        self.out.line("launcher", text)

    def _prepare_env(self) -> None:
        o = self.options
        env = dict(os.environ)
        env["FTDILOCO_TIMEOUT"] = f"{o.timeout:g}"
        env["FTDILOCO_MIN_REPLICAS"] = str(o.min_replicas)
        env["FTDILOCO_DYLU"] = "1" if o.dylu else "0"
        env["FTDILOCO_MODE"] = o.mode
        env["NUM_REPLICA_GROUPS"] = str(o.groups)
        env.setdefault("FTDILOCO_HOST", "127.0.0.1")
        # One CPU thread per process or so: more only fight over the cores.
        env.setdefault(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (o.groups * o.nproc_per_node)))
        )
        env["PYTHONUNBUFFERED"] = "1"
        # A fresh token unless the user brought one: nothing else on this
        # machine can join or kill our groups.
        token_file = env.get("FTDILOCO_TOKEN_FILE", "").strip()
        if token_file:
            self.lighthouse_args += ["--token-file", token_file]
        elif not env.get("FTDILOCO_TOKEN", "").strip():
            env["FTDILOCO_TOKEN"] = secrets.token_hex(16)
        if o.swarm is not None:
            self.lighthouse_args += o.swarm.lighthouse_args()
        self.env = env

    async def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            limit=1 << 20,  # a JSON log line with a traceback can be long
        )
        child = Child(name, proc)
        self._say(f"started {name}: pid {child.pid} (process group {child.pid})")
        if self.record is not None:
            self.record.log(name, f"== started: pid {child.pid} ==")
            self.record.event(self._now(), "start", name=name, pid=child.pid)
        return child

    def _now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    async def _start_lighthouse(self) -> None:
        """The lighthouse, or with ``--topology hub`` the hub, in the same role."""
        o = self.options
        if o.topology == "hub":
            self._hub_dir = tempfile.TemporaryDirectory(prefix="ftdiloco-hub-")
            state = Path(o.out_dir or self._hub_dir.name) / "hub-state.safetensors"
            argv = [
                sys.executable,
                "-m",
                "ftdiloco.operate.cli",
                "hub",
                "--bind",
                "127.0.0.1:0",
                "--state",
                str(state),
                "--min-groups",
                str(o.min_replicas),
                "--join-timeout",
                f"{o.timeout / 2:g}",
                "--log-format",
                "json",
                *self.lighthouse_args,
            ]
            self.env.pop("FTDILOCO_LIGHTHOUSE", None)
        else:
            argv = [
                sys.executable,
                "-m",
                "lighthouse.cli",
                "--bind",
                "127.0.0.1:0",
                "--min-replicas",
                str(o.min_replicas),
                "--join-timeout-ms",
                str(int(o.timeout * 500)),
                "--log-format",
                "json",
                *self.lighthouse_args,
            ]
        child = await self._spawn("lighthouse", argv, self.env)
        self.lighthouse = child
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        child.watcher = asyncio.create_task(self._watch_lighthouse(child, listening))
        try:
            self.url = await asyncio.wait_for(asyncio.shield(listening), 30)
        except (asyncio.TimeoutError, RuntimeError) as e:
            self._fail(f"the lighthouse did not start: {e or 'no URL in 30s'}")
            return
        self.env["FTDILOCO_HUB" if o.topology == "hub" else "FTDILOCO_LIGHTHOUSE"] = self.url
        self._say(f"lighthouse at {self.url} (try: ftdiloco status --lighthouse {self.url})")

    async def _watch_lighthouse(self, child: Child, listening: asyncio.Future[str]) -> None:
        assert child.proc.stdout is not None
        async for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            url = listening_url(line) or hub_listening_url(line)
            if url is not None and not listening.done():
                listening.set_result(url)
            self._show(child, line)
        code = await child.proc.wait()
        if not listening.done():
            listening.set_exception(RuntimeError(f"it exited ({code})"))
        if not child.stopping:
            self._fail(f"the lighthouse exited ({code})")

    async def _start_group(self, group: Group) -> None:
        o = self.options
        command = (
            o.swarm.command(group.index)
            if o.swarm is not None
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={o.nproc_per_node}",
                f"--master_port={free_port()}",
                *o.script_command(),
            ]
        )
        argv = [*command, *o.script_args]
        if o.outer_steps is not None:
            argv += ["--outer-steps", str(o.outer_steps)]
        env = {**self.env, "REPLICA_GROUP_ID": str(group.index)}
        if o.swarm is not None:
            env.update(o.swarm.env(group.index))
        group.starts += 1
        group.lines_since_start = 0
        child = await self._spawn(group.name, argv, env)
        group.child = child
        if self.shutting_down:  # a restart that raced with the end
            await child.stop()
            return
        child.watcher = asyncio.create_task(self._watch_group(group, child))

    async def _watch_group(self, group: Group, child: Child) -> None:
        assert child.proc.stdout is not None
        async for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self._on_group_line(group, child, line)
            self._show(child, line)
        code = await child.proc.wait()
        if child.stopping or self.shutting_down:
            return
        if child.killed:
            self._say(f"{group.name} is gone (exit {code}); starting it again")
            await self._start_group(group)
        elif code == 0:
            group.finished = True
            if all(g.finished for g in self.groups):
                self.done.set()
        else:
            self._fail(f"{group.name} exited with code {code}")

    def _on_group_line(self, group: Group, child: Child, line: str) -> None:
        event = events.parse(line)
        if isinstance(event, events.StepEvent):
            step = event
            now = time.monotonic()
            group.lines_since_start += 1
            group.step = step.step
            group.loss = step.loss if step.loss is not None else math.nan
            if step.eval_loss is not None:
                group.eval_loss = step.eval_loss
            group.step_times.append(now)
            if self.record is not None:
                self.record.step(
                    {
                        "t": self._now(),
                        "group": group.index,
                        "start": group.starts,
                        "step": step.step,
                        "loss": json_float(step.loss),
                        "eval_loss": json_float(step.eval_loss),
                        "committed": step.committed,
                        "healed": step.healed,
                    }
                )
            if group.first_step_after is None:
                group.first_step_after = now - child.started
            if step.committed:
                group.committed += 1
                kill = group.pending_kill
                if kill is not None:
                    kill.recovered_after = now - kill.at
                    kill.back_at_step = step.step
                    kill.healed = step.healed
                    group.pending_kill = None
                    if self.record is not None:
                        self.record.event(
                            self._now(),
                            "recovered",
                            group=group.index,
                            step=step.step,
                            after_s=round(kill.recovered_after, 3),
                            healed=step.healed,
                        )
                    how = ", healed from a peer" if step.healed else ""
                    self._say(
                        f"{group.name} recovered: committed step {step.step} "
                        f"{kill.recovered_after:.1f}s after the kill{how}"
                    )
            else:
                group.rolled_back += 1
            self._refresh_status()
            return
        if isinstance(event, events.DoneEvent):
            if event.loss is not None:
                group.loss = event.loss
            if event.eval_loss is not None:
                group.eval_loss = event.eval_loss
            group.finished = True

    def _show(self, child: Child, line: str) -> None:
        if self.record is not None:
            self.record.log(child.name, line)
        if child.stopping and not self.options.verbose:
            return  # torchrun's traceback for the SIGTERM we sent it tells nobody anything
        text = compact_log(line, self.options.verbose)
        if text is not None:
            self.out.line(child.name, text)

    async def _stop_all(self) -> None:
        children = [g.child for g in self.groups if g.child is not None]
        await asyncio.gather(*(c.stop() for c in children))
        if self.lighthouse is not None:
            await self.lighthouse.stop()
        watchers = [c.watcher for c in [*children, self.lighthouse] if c and c.watcher]
        # The pipes are closed now that every process is gone: the watchers end.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), 10)

    # -- chaos ----------------------------------------------------------------------

    async def _chaos(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            while True:
                if any(g.finished for g in self.groups):
                    self._say("a group has finished: no more kills")
                    return
                victim = self._pick_victim()
                if victim is not None:
                    break
                await asyncio.sleep(_KILL_RETRY_S)
            self._kill(victim)

    def _pick_victim(self) -> Group | None:
        """A running group, but only when the kill can be survived and healed in time."""
        groups = self.groups
        # One failure at a time: wait until the last victim is back.
        if any(g.pending_kill is not None or g.child is None for g in groups):
            return None
        # Kill mid-training, not while a group is still starting.
        if any(g.lines_since_start == 0 for g in groups):
            return None
        if not self._time_to_recover():
            return None
        return self.rng.choice(groups)

    def _time_to_recover(self) -> bool:
        """Is there time left for a restarted group to come back before the job ends?"""
        restart = max((g.first_step_after or 0.0) for g in self.groups)
        needed = 1.5 * restart
        left: list[float] = []
        if self.options.duration is not None:
            left.append(self.options.duration - (time.monotonic() - self.started))
        target = self.options.target_steps()
        intervals = [i for g in self.groups if (i := g.step_interval()) is not None]
        steps = [g.step for g in self.groups if g.step is not None]
        if target is not None and intervals and steps:
            left.append((target - max(steps)) * min(intervals))
        return all(seconds > needed for seconds in left)

    def _kill(self, group: Group) -> None:
        child = group.child
        assert child is not None
        kill = Kill(group.index, time.monotonic(), group.step)
        self.kills.append(kill)
        group.pending_kill = kill
        if self.record is not None:
            self.record.event(self._now(), "kill", group=group.index, step=group.step)
        child.killed = True
        self._say(
            f"SIGKILL {group.name} (pid {child.pid} and all its workers) at outer step "
            f"{group.step} -- failure {len(self.kills)}"
        )
        child.kill()

    async def _deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.duration_reached = True
        self._say(f"--duration {seconds:g}s reached: stopping the job")
        self.done.set()

    # -- status -----------------------------------------------------------------------

    async def _poll_status(self) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    async with http.get(f"{self.url}/status") as response:
                        self.status = await response.json()
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    self.status = None
                self._refresh_status()
                await asyncio.sleep(STATUS_POLL_S)

    def _refresh_status(self) -> None:
        if self.out.live:
            self.out.set_status(self.status_text())

    def status_text(self) -> str:
        parts: list[str] = []
        status = self.status
        prev = status.get("previous_quorum") if status else None
        if status is None:
            parts.append("lighthouse: no answer")
        elif self.options.swarm is not None:
            parts.append(self.options.swarm.describe(status))
        elif prev is None:
            parts.append("quorum: forming")
        else:
            seq = int(prev["quorum_id"]) - int(status.get("epoch", 0))
            members = ",".join(str(m.get("replica_id")) for m in prev.get("members", []))
            parts.append(f"quorum #{seq} [{members}]")
        steps = [g.step for g in self.groups if g.step is not None]
        target = self.options.target_steps()
        if steps:
            parts.append(f"step {max(steps)}" + (f"/{target}" if target else ""))
        # A killed group's last loss is stale until it is back.
        live = [g for g in self.groups if g.pending_kill is None]
        losses = [g.loss for g in live if not math.isnan(g.loss)]
        if losses:
            parts.append(f"loss {sum(losses) / len(losses):.3f}")
        parts.append(", ".join(f"g{g.index} {g.state()}" for g in self.groups))
        if self.kills:
            parts.append(f"kills {len(self.kills)}")
        parts.append(f"{time.monotonic() - self.started:.0f}s")
        return " | ".join(parts)

    # -- the end ----------------------------------------------------------------------

    def _summary(self) -> None:
        write = self.out.plain
        elapsed = time.monotonic() - self.started
        if self.interrupted:
            result = "stopped (interrupted)"
        elif self.output_closed:
            result = "stopped (nobody reads the output any more)"
        elif self.failure is not None:
            result = f"FAILED: {self.failure}"
        elif self.duration_reached:
            result = f"stopped after --duration {self.options.duration:g}s, nothing failed"
        else:
            result = f"success: all {len(self.groups)} groups finished"
        write("")
        write(f"== ftdiloco launch summary ({elapsed:.1f}s) ==")
        write(f"result: {result}")
        if self.options.swarm is not None:
            write(f"pipeline: {self.options.swarm.describe(self.status)}")
        width = max(8, *(len(g.name) for g in self.groups))
        write(
            f"{'group':<{width}} {'starts':>6} {'committed':>9} {'rolled back':>11} "
            f"{'final loss':>10} {'eval loss':>9}"
        )
        for g in self.groups:
            write(
                f"{g.name:<{width}} {g.starts:>6} {g.committed:>9} {g.rolled_back:>11} "
                f"{_fmt_loss(g.loss):>10} {_fmt_loss(g.eval_loss):>9}"
            )
        survived = [k for k in self.kills if k.recovered_after is not None]
        write(
            f"failures injected: {len(self.kills)}, survived (group back and committing): "
            f"{len(survived)}"
        )
        for k in self.kills:
            if k.recovered_after is None:
                write(
                    f"  {self.groups[k.group].name}: killed at outer step {k.step}, "
                    "not back before the end"
                )
            else:
                healed = ", healed from a peer" if k.healed else ""
                write(
                    f"  {self.groups[k.group].name}: killed at outer step {k.step}, recovered in "
                    f"{k.recovered_after:.1f}s (committed step {k.back_at_step}{healed})"
                )
        losses = [g.loss for g in self.groups if not math.isnan(g.loss)]
        if losses:
            write(f"final loss: {sum(losses) / len(losses):.3f} (mean over groups)")
        evals = [g.eval_loss for g in self.groups if not math.isnan(g.eval_loss)]
        if evals:
            write(f"held-out loss: {sum(evals) / len(evals):.3f} (mean over groups, same split)")
        if self.record is not None:
            write(f"kept in {self.record.root}: group logs, steps.jsonl, summary.json, plots")

    def summary_document(self, code: int) -> dict[str, Any]:
        def mean(values: list[float]) -> float | None:
            kept = [v for v in values if not math.isnan(v)]
            return sum(kept) / len(kept) if kept else None

        return {
            "exit_code": code,
            "interrupted": self.interrupted,
            "failure": self.failure,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "options": {
                "groups": self.options.groups,
                "nproc_per_node": self.options.nproc_per_node,
                "min_replicas": self.options.min_replicas,
                "kill_every": self.options.kill_every,
                "outer_steps": self.options.target_steps(),
                "script": self.options.script or EXAMPLE_MODULE,
                "script_args": list(self.options.script_args),
            },
            "groups": [
                {
                    "group": g.name,
                    "starts": g.starts,
                    "committed": g.committed,
                    "rolled_back": g.rolled_back,
                    "step": g.step,
                    "final_loss": json_float(g.loss),
                    "eval_loss": json_float(g.eval_loss),
                    "finished": g.finished,
                }
                for g in self.groups
            ],
            "kills": [
                {
                    "group": self.groups[k.group].name,
                    "at_s": round(k.at - self.started, 3),
                    "step": k.step,
                    "recovered_after_s": None
                    if k.recovered_after is None
                    else round(k.recovered_after, 3),
                    "back_at_step": k.back_at_step,
                    "healed": k.healed,
                }
                for k in self.kills
            ],
            "final_loss": mean([g.loss for g in self.groups]),
            "eval_loss": mean([g.eval_loss for g in self.groups]),
        }

    def _save_record(self, code: int) -> None:
        assert self.record is not None
        self.record.close()
        self.record.write_summary(self.summary_document(code))
        problem = self.record.plot()
        if problem is not None:
            self.out.plain(problem)


def _fmt_loss(loss: float) -> str:
    return "-" if math.isnan(loss) else f"{loss:.3f}"


def launch(options: LaunchOptions, out: TextIO | None = None) -> int:
    """Run the job to the end; the exit code.

    0 success, 1 failure, 130 interrupted (SIGINT/SIGTERM), 141 when the
    output was closed (a pipe's reader went away) and the job was stopped.
    """
    stream = out or sys.stdout
    launcher = _Launcher(options, stream)
    code = asyncio.run(launcher.run())
    if launcher.out.closed and stream is sys.stdout:
        # Python flushes stdout at exit; into a closed pipe that prints a traceback.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
    return code
