"""Hub benchmark: DiLoCo through ``ftdiloco hub`` against the allreduce, ingest, memory, restarts.

    python bench/hub.py [--quick] [--json PATH]

1. ``hub_ingest_gbps``, ``hub_peak_extra_mb``: a hub process and four
   groups (HubManager on threads of this process, each bound to its own
   copy of a synthetic fp32 model of ``--model-mb``) run rounds: join,
   submit the pseudo-gradient, take the new weights.  Ingest is the four
   submissions' bytes over the time from the first one's start to the last
   one's end (median over rounds).  Peak extra memory is the hub's peak RSS
   (VmHWM, the first group's upload of the initial weights included) minus
   its RSS before any group came, minus the state it must hold (the weights
   and the outer momentum, 2 x model); the goal is at most twice the model:
   the one accumulator plus staged segments.
2. ``hub_restart_lost_steps``: the same groups go on; right after a commit
   the hub is SIGKILLed and restarted on its port from its state file; the
   groups reconnect by themselves.  Lost = committed steps a group saw that
   the restarted hub no longer has (goal 0); every group's committed steps
   must stay consecutive (none applied twice).
3. ``tunnel_ok``: two fresh groups that know only a relay's port (the TCP
   relay of tests/test_hub.py, an SSH forward's stand-in) heal from the hub
   and commit rounds through it.
4. ``hub_step_ratio``: four groups of the example (tiny model) through the
   hub and through a lighthouse and allreduce, one after the other; the
   outer step's seconds as each group prints them (``sync X s``), median
   over groups and steps after the first, hub / allreduce.

The machine is shared: ``cat /proc/loadavg`` before and after is printed
with the table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ftdiloco.config import Config  # noqa: E402
from ftdiloco.hub.client import HubManager  # noqa: E402
from ftdiloco.training.outer_loop import GlobalWeights  # noqa: E402
from tests.procs import Proc, free_port, process_pool, start_lighthouse  # noqa: E402
from tests.test_hub import Relay, start_hub  # noqa: E402

GROUPS = 4
PARAMETERS = 16  # tensors per synthetic model


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Group:
    """One synthetic group: a model's backups, a pseudo-gradient, a HubManager."""

    def __init__(self, index: int, url: str, numel: int) -> None:
        env = {
            "FTDILOCO_HUB": url,
            "REPLICA_GROUP_ID": str(index),
            "NUM_REPLICA_GROUPS": str(GROUPS),
            "FTDILOCO_TIMEOUT": "120",
        }
        self.manager = HubManager(Config.from_env(env))
        size = numel // PARAMETERS
        generator = torch.Generator().manual_seed(0)
        self.backup = [torch.randn(size, generator=generator) for _ in range(PARAMETERS)]
        self.pseudo = torch.randn(size * PARAMETERS, generator=generator) * 1e-3
        self.manager.bind_global_weights(
            GlobalWeights(
                names=tuple(f"w{i}" for i in range(PARAMETERS)),
                backup=tuple(self.backup),
                fragments=((tuple(range(PARAMETERS)),),),
                sync_point=torch.zeros((), dtype=torch.int64),
                outer_lr=0.7,
                outer_momentum=0.9,
                momentum_every=1,
                adopt=lambda sync_point: None,
            )
        )
        self.committed: list[int] = []
        self.uploads: list[tuple[float, float, int]] = []  # start, end, bytes

    def rounds(self, n: int) -> None:
        for _ in range(n):
            self.manager.start_quorum()
            started = time.perf_counter()
            work = self.manager.allreduce([self.pseudo])
            self.uploads.append((started, time.perf_counter(), work.nbytes or 0))
            if self.manager.should_commit():
                self.committed.append(self.manager.step)


def run_groups(groups: list[Group], rounds: int) -> None:
    threads = [threading.Thread(target=g.rounds, args=(rounds,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def ingest_and_restart(work: Path, model_mb: int, rounds: int) -> dict[str, Any]:
    numel = model_mb * (1 << 20) // 4
    port = free_port()
    state = work / "hub-state.safetensors"
    with process_pool() as procs:
        hub = start_hub(procs, state, port)
        idle = memory_kb(hub.pid, "VmRSS")
        groups = [Group(i, f"http://127.0.0.1:{port}", numel) for i in range(GROUPS)]
        run_groups(groups, 1)  # initialise, heal, one empty round
        first = len(groups[0].uploads)
        run_groups(groups, rounds)
        peak = memory_kb(hub.pid, "VmHWM")
        per_round = []
        for r in range(first, first + rounds):
            spans = [g.uploads[r] for g in groups]
            seconds = max(s[1] for s in spans) - min(s[0] for s in spans)
            per_round.append(sum(s[2] for s in spans) / seconds / 1e9)

        # The hub SIGKILLed right after a commit, restarted; the groups go on.
        killer = threading.Thread(target=run_groups, args=(groups, rounds))
        before = groups[0].committed[-1]
        killer.start()
        deadline = time.monotonic() + 300
        while groups[0].committed[-1] == before and time.monotonic() < deadline:
            time.sleep(0.01)
        hub.kill()
        seen = max(g.committed[-1] for g in groups)
        restarted = start_hub(procs, state, port)
        killer.join()
        resumed_at = json.loads(_get(port, "/status"))["step"]
        consecutive = all(g.committed == list(range(1, len(g.committed) + 1)) for g in groups)
        for g in groups:
            g.manager.close()

        # Two fresh groups through a relay: they know only its port.
        relay = Relay(port)
        try:
            tunnel = [Group(i, f"http://127.0.0.1:{relay.port}", numel) for i in (7, 8)]
            run_groups(tunnel, 2)
            tunnel_ok = relay.connections > 0 and all(len(g.committed) >= 1 for g in tunnel)
            for g in tunnel:
                g.manager.close()
        finally:
            relay.close()
        restarted.kill()
    return {
        "hub_ingest_gbps": statistics.median(per_round),
        # Beyond the state itself (the weights and the outer momentum: 2 x model).
        "hub_peak_extra_mb": (peak - idle) / 1024 - 2 * model_mb,
        "model_mb": model_mb,
        "hub_restart_lost_steps": max(0, seen - min(resumed_at, seen)),
        "hub_restart_consecutive": consecutive,
        "tunnel_ok": tunnel_ok,
    }


def _get(port: int, path: str) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


SYNC = re.compile(r"^outer step (\d+) .*\| sync ([0-9.]+)s")


def example_step_seconds(topology: str, outer_steps: int) -> float:
    """Median outer-step seconds of four example groups (steps after the first)."""
    train = ["--model-size", "tiny", "--sync-every", "4", "--batch-size", "4"]
    train += ["--sample-bytes", "0", "--outer-steps", str(outer_steps)]
    with process_pool() as procs:
        env = {"NUM_REPLICA_GROUPS": str(GROUPS), "FTDILOCO_TIMEOUT": "120"}
        if topology == "hub":
            port = free_port()
            state = Path(f"/tmp/ftdiloco-bench-hub-{port}.safetensors")
            start_hub(procs, state, port)
            env["FTDILOCO_HUB"] = f"http://127.0.0.1:{port}"
        else:
            _, url = start_lighthouse(procs, "--min-replicas", str(GROUPS))
            env["FTDILOCO_LIGHTHOUSE"] = url
        groups = []
        for g in range(GROUPS):
            proc = Proc(
                f"{topology}{g}",
                [sys.executable, "-m", "ftdiloco.examples.train_diloco", *train],
                env={**env, "REPLICA_GROUP_ID": str(g), "OMP_NUM_THREADS": "1"},
            )
            procs.append(proc)
            groups.append(proc)
        seconds = []
        for proc in groups:
            assert proc.wait(900) == 0, proc.tail()
            for line in proc.output:
                m = SYNC.match(line)
                if m and int(m.group(1)) > 1:
                    seconds.append(float(m.group(2)))
        if topology == "hub":
            state.unlink(missing_ok=True)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer rounds")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model-mb", type=int, help="synthetic model size (64; quick 32)")
    args = parser.parse_args()
    model_mb = args.model_mb or (32 if args.quick else 64)
    rounds = 3 if args.quick else 8
    load_before = loadavg()
    work = Path(f"/tmp/ftdiloco-bench-hub-{free_port()}")
    work.mkdir(parents=True, exist_ok=True)
    results = ingest_and_restart(work, model_mb, rounds)
    steps = 3 if args.quick else 6
    hub_s = example_step_seconds("hub", steps)
    allreduce_s = example_step_seconds("allreduce", steps)
    results.update(
        hub_step_s=hub_s, allreduce_step_s=allreduce_s, hub_step_ratio=hub_s / allreduce_s
    )
    results["loadavg_before"], results["loadavg_after"] = load_before, loadavg()
    print("| metric | value | goal |\n|---|---|---|")
    goals = {
        "hub_step_ratio": "",
        "hub_ingest_gbps": ">= 1",
        "hub_peak_extra_mb": f"<= {2 * model_mb}",
        "hub_restart_lost_steps": "0",
        "tunnel_ok": "true",
    }
    for key, goal in goals.items():
        value = results[key]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value).lower()
        print(f"| {key} | {shown} | {goal} |")
    print(
        f"hub step {hub_s:.3f}s, allreduce step {allreduce_s:.3f}s; model {model_mb} MB;"
        f" load average {load_before} before, {results['loadavg_after']} after"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
