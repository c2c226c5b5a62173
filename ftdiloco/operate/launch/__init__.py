"""Run a whole job on this machine, and break it on purpose.

:func:`launch` starts a lighthouse and ``groups`` replica groups (each a
``torchrun`` of the training script), streams their output with a
``[name]`` prefix, and keeps a one-line status at the bottom of a terminal.
With ``kill_every`` it SIGKILLs a random group every so many seconds and
starts it again under the same ``REPLICA_GROUP_ID``, so a user can watch the
survivors carry on and the restarted group heal.  At the end it prints what
happened: outer steps committed and rolled back per group, failures
survived, how long each recovery took, and the final loss.

Every child is started in a session of its own (``start_new_session``), so
no terminal signal reaches it behind the launcher's back.  A kill or a stop
reaches the child, its process group and every process below it (torchrun
puts each worker in a session of its own) by PID; nothing else is touched.

:func:`serve_lighthouse` is the lighthouse for a batch scheduler (the torchx
component's lighthouse role): the plain daemon runs until it is stopped, so
a job with a lighthouse role would never finish; this one stops it once
every group has connected and then left.

This module is for people at a terminal: it prints.  The library's own
structured logs stay in the children, and are shown compactly here.
"""

from ftdiloco.operate.launch.batch_lighthouse import serve_lighthouse
from ftdiloco.operate.launch.launcher import (
    EXAMPLE_MODULE,
    EXIT_OUTPUT_CLOSED,
    Group,
    Kill,
    LaunchOptions,
    launch,
)
from ftdiloco.operate.launch.processes import alive, free_port, process_tree
from ftdiloco.operate.launch.terminal import _Output, compact_log, printable

__all__ = [
    "EXAMPLE_MODULE",
    "EXIT_OUTPUT_CLOSED",
    "Group",
    "Kill",
    "LaunchOptions",
    "_Output",
    "alive",
    "compact_log",
    "free_port",
    "launch",
    "printable",
    "process_tree",
    "serve_lighthouse",
]
