"""Several processes, one program: ``jax.distributed`` on a pod, or N processes on one machine.

On a TPU pod or a cluster JAX finds the coordinator, the process count and each process's id by
itself. ``dsjax-launch`` starts N local processes and tells them through the environment:

    JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator (read by JAX itself)
    DSJAX_NUM_PROCESSES       N
    DSJAX_PROCESS_ID          0 .. N-1
    DSJAX_HEARTBEAT_TIMEOUT   seconds after which the others give up on a process that died

CPU processes exchange their collectives over gloo.
"""

from __future__ import annotations

import os

import jax

ENV = ("DSJAX_NUM_PROCESSES", "DSJAX_PROCESS_ID")


def launched() -> bool:
    """Whether ``dsjax-launch`` started this process (one of several on this machine)."""
    return all(name in os.environ for name in ENV)


def initialize() -> None:
    """``jax.distributed.initialize`` with what ``dsjax-launch`` set, or what JAX detects on a pod."""
    kwargs = {}
    if launched():
        kwargs = dict(
            num_processes=int(os.environ["DSJAX_NUM_PROCESSES"]),
            process_id=int(os.environ["DSJAX_PROCESS_ID"]),
            heartbeat_timeout_seconds=int(os.environ.get("DSJAX_HEARTBEAT_TIMEOUT", "100")),
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend's; TPU / GPU keep theirs
    jax.distributed.initialize(**kwargs)
