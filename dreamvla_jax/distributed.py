"""Multi-host initialisation: one process per host, one global mesh.

``initialize()`` calls ``jax.distributed.initialize`` when the environment describes a multi-process
job (explicit flags/variables, SLURM, or a TPU pod) and does nothing for a single process. It must run
before anything touches the devices.
"""

from __future__ import annotations

import os

import jax

_DONE = False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    global _DONE
    if _DONE:
        return
    coordinator = coordinator or os.environ.get('DREAMVLA_COORDINATOR')
    num_processes = num_processes or _int_env('DREAMVLA_NUM_PROCESSES')
    process_id = process_id if process_id is not None else _int_env('DREAMVLA_PROCESS_ID')
    if coordinator and num_processes and num_processes > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    elif 'SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) > 1:
        jax.distributed.initialize()  # JAX's SLURM cluster detection fills in the rest
    elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
        jax.distributed.initialize()  # TPU pod metadata
    _DONE = True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
