"""DiLoCo over pipeline stages (DiLoCo-SWARM).

A model too big for one worker is cut into stages (:mod:`.split`); each stage
is served by several workers, each an ordinary DiLoCo replica group of its
stage's lighthouse room (``lighthouse --rooms``), so rollback, heal,
compression and fragments work inside a stage unchanged.  Micro-batches flow
from any worker of one stage to a worker of the next, chosen in proportion to
measured throughput (:mod:`.routing`), as safetensors over HTTP
(:mod:`.transport`); :mod:`.worker` runs a stage.
"""

from ftdiloco.swarm.routing import INFO_ADDRESS, PeerList, choose, pipeline_pause, routing_weights
from ftdiloco.swarm.split import balanced_cuts, split_layers
from ftdiloco.swarm.transport import StageServer
from ftdiloco.swarm.worker import BACKWARD, FORWARD, Counters, Forwarder, StageWorker

__all__ = [
    "BACKWARD",
    "FORWARD",
    "INFO_ADDRESS",
    "Counters",
    "Forwarder",
    "PeerList",
    "StageServer",
    "StageWorker",
    "balanced_cuts",
    "choose",
    "pipeline_pause",
    "routing_weights",
    "split_layers",
]
