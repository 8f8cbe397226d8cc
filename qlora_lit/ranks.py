"""Where each process of a multi-process run stands, said by every rank before the ranks first meet.

A multi-node start that goes wrong (a task count that does not match, a rendezvous address the other nodes cannot
reach) waits in the rendezvous without a word; each rank's line says which node and slot it took and where it looks
for rank 0. Lightning's own line ("Initializing distributed: GLOBAL_RANK ...") names the global rank only.
"""

from __future__ import annotations

import lightning as L


def rank_layout(trainer: L.Trainer) -> str | None:
    """`rank 2 of 4: node 1 of 2, local rank 0; rendezvous vm:15042 (SLURMEnvironment)`, or None for one process.

    Reading the rendezvous address and port is what Lightning does when the ranks meet: the same values, once.
    """
    if trainer.world_size < 2:
        return None
    environment = trainer.strategy.cluster_environment  # every strategy of several processes has one
    return (
        f"rank {trainer.global_rank} of {trainer.world_size}: node {trainer.node_rank} of {trainer.num_nodes}, "
        f"local rank {trainer.local_rank}; rendezvous {environment.main_address}:{environment.main_port} "
        f"({type(environment).__name__})"
    )
