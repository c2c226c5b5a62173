"""torchx component ``ftdiloco.train``: a fault-tolerant DiLoCo job as one AppDef.

One ``lighthouse`` role and ``groups`` replica-group roles (``group0`` ...),
each group a ``torchrun`` of ``script`` with ``nproc_per_node`` ranks::

    torchx run                                     # .torchxconfig: this, on local_cwd
    torchx run ftdiloco.train --groups 3 --min_replicas 2 -- --model-size tiny
    torchx run -s kubernetes ftdiloco.train --image my/image:tag \\
        --lighthouse_host <a name the groups can resolve> --gpu 8 --nproc_per_node 8

It is registered under torchx's ``torchx.components`` entry point (see
pyproject.toml), so ``torchx builtins`` lists it once the package is
installed.  torchx shows only the registered components when any are
registered, so the entry point registers torchx's own builtins too.

Groups reach the lighthouse at ``lighthouse_host:lighthouse_port``; with the
local schedulers the default 127.0.0.1 is right.  On a cluster, either give a
``lighthouse_host`` the scheduler makes resolvable, or run a standing
lighthouse and pass ``--lighthouse URL`` (then there is no lighthouse role).

The lighthouse role runs ``ftdiloco lighthouse``, which stops the daemon once
every group has connected and then left, so the job finishes when training
does.  Restarts: ``max_restarts`` is torchrun's (a group's workers restart in
place, then heal from a peer); ``max_retries`` is the scheduler's (the whole
role is started again, where the scheduler supports it; local_cwd does not).

Every run keeps its logs in ``log_dir`` (default ``ftdiloco-logs`` under the
role's working directory): torchrun writes each worker's stdout and stderr
there (``--log-dir``, ``--tee 3``: to the files and to the console), and the
lighthouse role its own output to ``log_dir/lighthouse.log``.  torchx's
local schedulers otherwise keep logs in a temporary directory that they
delete when the run ends.

torchx lints this module's source and lists every function in it as a
component: it holds ``train`` only, with typing's ``Dict``/``Optional``
spellings, which torchx's argument parser understands, and without
``from __future__ import annotations``.
"""

from typing import Dict, Optional  # noqa: UP035 -- torchx parses these spellings only

import torchx.specs as specs

from ftwire import guard


def train(
    *script_args: str,
    script: str = "",
    groups: int = 2,
    nproc_per_node: int = 1,
    min_replicas: int = 1,
    sync_every: int = 0,
    outer_steps: int = 0,
    lighthouse: str = "",
    lighthouse_host: str = "127.0.0.1",
    lighthouse_port: int = 29510,
    lighthouse_idle_exit: float = 30.0,
    timeout: float = 60.0,
    token: str = "",
    token_file: str = "",
    image: str = "ftdiloco:latest",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: str = "",
    max_retries: int = 0,
    max_restarts: int = 3,
    python: str = "python",
    log_dir: str = "ftdiloco-logs",
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """Fault-tolerant DiLoCo: a lighthouse role and one torchrun role per replica group.

    Args:
        script_args: arguments passed to the training script
        script: training script each group runs under torchrun (path in the image or cwd);
            empty: the example that ships with the package (ftdiloco.examples.train_diloco)
        groups: number of replica groups (one role each, REPLICA_GROUP_ID 0..groups-1)
        nproc_per_node: ranks per group (torchrun --nproc_per_node)
        min_replicas: groups needed for a quorum and a commit
        sync_every: inner steps per outer step, passed as --sync-every (0: the script's default)
        outer_steps: passed to the script as --outer-steps (0: the script's default)
        lighthouse: URL of a lighthouse that is already running; empty: add a lighthouse role
        lighthouse_host: host name or address at which the groups reach the lighthouse role
        lighthouse_port: port of the lighthouse role
        lighthouse_idle_exit: seconds with no group connected after which the lighthouse
            role, once every group has connected, considers the job done and exits
        timeout: FTDILOCO_TIMEOUT for the groups (quorum, collective and heal deadlines)
        token: shared secret for the lighthouse and the groups (FTDILOCO_TOKEN); empty: none
        token_file: a file in the image holding the token (instead of token)
        image: container image (ignored by local_cwd, which runs in the current directory)
        cpu: CPUs per group
        gpu: GPUs per group
        memMB: memory per group in MB
        h: a registered named resource per group (instead of cpu/gpu/memMB)
        max_retries: times the scheduler may start a failed role again
        max_restarts: times torchrun restarts a group's workers in place before giving up
        python: the Python interpreter to run, from PATH or an absolute path
        log_dir: directory (relative to each role's working directory) that keeps every
            role's output after the run: log_dir/lighthouse.log, log_dir/group<N>/...
        env: extra environment variables for every role
    """
    if groups < 1 or nproc_per_node < 1 or min_replicas < 1:
        raise ValueError("groups, nproc_per_node and min_replicas must be >= 1")
    if min_replicas > groups:
        raise ValueError(f"min_replicas={min_replicas} > groups={groups}: nothing could commit")
    if token and token_file:
        raise ValueError("give token or token_file, not both")

    common = {"PYTHONUNBUFFERED": "1", **(env or {})}
    if token:
        common["FTDILOCO_TOKEN"] = token
    if token_file:
        common["FTDILOCO_TOKEN_FILE"] = token_file
    loopback = guard.is_loopback(lighthouse_host)
    roles = []

    address = lighthouse
    if not address:
        address = f"http://{lighthouse_host}:{lighthouse_port}"
        bind = f"{'127.0.0.1' if loopback else '0.0.0.0'}:{lighthouse_port}"
        daemon_args = [
            "--bind",
            bind,
            "--min-replicas",
            str(min_replicas),
            # Stragglers are waited for half a timeout, so a quorum forms well
            # within the groups' own quorum deadline.
            "--join-timeout-ms",
            str(int(timeout * 500)),
        ]
        if token_file:
            daemon_args += ["--token-file", token_file]
        lighthouse_env = dict(common)
        lighthouse_env.pop("FTDILOCO_TOKEN_FILE", None)  # given as --token-file instead
        roles.append(
            specs.Role(
                name="lighthouse",
                image=image,
                entrypoint=python,
                args=[
                    "-m",
                    "ftdiloco.operate.cli",
                    "lighthouse",
                    "--groups",
                    str(groups),
                    "--idle-exit",
                    f"{lighthouse_idle_exit:g}",
                    *(["--log-file", f"{log_dir}/lighthouse.log"] if log_dir else []),
                    "--",
                    *daemon_args,
                ],
                env=lighthouse_env,
                num_replicas=1,
                resource=specs.resource(cpu=1, gpu=0, memMB=1024),
                port_map={"lighthouse": lighthouse_port},
                max_retries=max_retries,
            )
        )

    script_flags = []
    if outer_steps:
        script_flags += ["--outer-steps", str(outer_steps)]
    if sync_every:
        script_flags += ["--sync-every", str(sync_every)]
    group_env = {
        **common,
        "FTDILOCO_LIGHTHOUSE": address,
        "NUM_REPLICA_GROUPS": str(groups),
        "FTDILOCO_MIN_REPLICAS": str(min_replicas),
        "FTDILOCO_TIMEOUT": f"{timeout:g}",
    }
    if loopback and not lighthouse:
        # Everything on one machine: peers reach each other on loopback too.
        group_env.setdefault("FTDILOCO_HOST", "127.0.0.1")
    for group in range(groups):
        roles.append(
            specs.Role(
                name=f"group{group}",
                image=image,
                entrypoint=python,
                args=[
                    "-m",
                    "torch.distributed.run",
                    # One node per group; --standalone picks a free rendezvous
                    # port, so groups sharing a machine never collide.
                    "--standalone",
                    "--nnodes=1",
                    f"--nproc_per_node={nproc_per_node}",
                    f"--max_restarts={max_restarts}",
                    # Each worker's output to a file under log_dir and to the console.
                    *([f"--log-dir={log_dir}/group{group}", "--tee=3"] if log_dir else []),
                    *([script] if script else ["-m", "ftdiloco.examples.train_diloco"]),
                    *script_flags,
                    *script_args,
                ],
                env={**group_env, "REPLICA_GROUP_ID": str(group)},
                num_replicas=1,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h or None),
                max_retries=max_retries,
            )
        )
    return specs.AppDef(name="ftdiloco", roles=roles)
