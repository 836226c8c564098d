"""Multi-process initialisation: one JAX process per host (or per GPU), one global mesh.

``initialize()`` calls ``jax.distributed.initialize`` when the job has several processes and does nothing
for a single one. It must run before anything touches the devices (the first ``jax.devices()``, array or
jit fixes the backend to this process's devices alone). Where the topology comes from, first match wins:

  1. explicit arguments: ``--coordinator HOST:PORT --num-processes N --process-id I`` (absl flags of
     ``dreamvla_jax.train``, argparse flags of ``dreamvla_jax.eval``);
  2. ``DREAMVLA_COORDINATOR`` / ``DREAMVLA_NUM_PROCESSES`` / ``DREAMVLA_PROCESS_ID`` (``launch/*.sh``);
  3. SLURM (``SLURM_NTASKS`` > 1): JAX reads the node list, task ids and local ids itself;
  4. a TPU pod slice (``DREAMVLA_TPU_POD=1``, set by ``launch/tpu_pod.sh``, or a multi-host
     ``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES``): JAX reads the TPU metadata.

After it, ``jax.devices()`` lists the devices of all processes, ``sharding.make_mesh`` lays the ``data``
axis across processes, each process feeds its contiguous slice of every global batch
(``data/pipeline.py``) and ``sharding.global_batch`` assembles the global array. Process 0 alone writes
logs, metrics and progress bars; every process takes part in each Orbax checkpoint save.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import flags

log = logging.getLogger(__name__)

# absl flags of `python -m dreamvla_jax.train` (the entry point imports this module before parsing).
_COORDINATOR = flags.DEFINE_string('coordinator', None,
                                   'HOST:PORT of process 0 (multi-process runs without SLURM or a TPU pod).')
_NUM_PROCESSES = flags.DEFINE_integer('num-processes', None, 'Number of processes of the job.')
_PROCESS_ID = flags.DEFINE_integer('process-id', None, 'Index of this process, 0..num-processes-1.')

_MODE: str | None = None  # how initialize() set the job up; None until it ran


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> str:
    """Joins the multi-process job described by the arguments or the environment (see module docstring).

    Returns how: 'explicit', 'env', 'slurm', 'tpu' or 'single'. Calling it again is a no-op.
    """
    global _MODE
    if _MODE is not None:
        return _MODE
    explicit = any(v is not None for v in (coordinator, num_processes, process_id))
    coordinator = coordinator or os.environ.get('DREAMVLA_COORDINATOR') or None
    num_processes = num_processes if num_processes is not None else _int_env('DREAMVLA_NUM_PROCESSES')
    process_id = process_id if process_id is not None else _int_env('DREAMVLA_PROCESS_ID')
    if local_device_ids is None:
        local_device_ids = _slurm_node_device_ids()
    kwargs = {}
    if coordinator or (num_processes or 1) > 1:
        mode = 'explicit' if explicit else 'env'
        _check_explicit(coordinator, num_processes, process_id)
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                      local_device_ids=local_device_ids)
    elif _int_env('SLURM_NTASKS', 1) > 1:
        mode = 'slurm'
        kwargs = dict(local_device_ids=local_device_ids)
    elif os.environ.get('DREAMVLA_TPU_POD') == '1' or _tpu_hosts() > 1:
        mode = 'tpu'
    else:
        _MODE = 'single'
        return _MODE
    _enable_cpu_collectives()
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if 'before' in str(e).lower():
            raise RuntimeError(
                'dreamvla_jax.distributed.initialize() ran after JAX had already initialised its devices; '
                'call it first thing in main(), before any jax.devices(), array or jit.') from e
        raise
    _MODE = mode
    log.info('process %d of %d (%s): %d local of %d devices', jax.process_index(), jax.process_count(),
             mode, jax.local_device_count(), jax.device_count())
    return _MODE


def initialize_from_flags() -> str:
    """``initialize`` with the absl flags ``--coordinator``/``--num-processes``/``--process-id``."""
    return initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def add_argparse_flags(parser) -> None:
    """The same three flags for argparse entry points (``dreamvla_jax.eval``)."""
    parser.add_argument('--coordinator', help='HOST:PORT of process 0 (multi-process runs)')
    parser.add_argument('--num-processes', type=int, help='number of processes of the job')
    parser.add_argument('--process-id', type=int, help='index of this process, 0..num-processes-1')


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, TensorBoard and progress bars."""
    return jax.process_index() == 0


def check_global_batch(batch_size: int, process_count: int | None = None,
                       device_count: int | None = None) -> None:
    """Fails with one clear sentence when the global batch cannot be split over the processes/devices.

    Each process feeds ``batch_size // process_count`` windows and the batch axis is sharded over every
    device of the ``(data, fsdp)`` mesh, so both counts must divide it.
    """
    pc = jax.process_count() if process_count is None else process_count
    dc = jax.device_count() if device_count is None else device_count
    if batch_size % pc:
        raise ValueError(f"config.train.batch_size {batch_size} (the global batch) is not divisible by the "
                         f"{pc} processes; choose a multiple of {pc} (each process loads batch_size / "
                         "process count windows per step) or change the number of processes.")
    if batch_size % dc:
        raise ValueError(f"config.train.batch_size {batch_size} (the global batch) is not divisible by the "
                         f"{dc} devices of the mesh ({pc} processes); choose a multiple of {dc}.")


def _check_explicit(coordinator, num_processes, process_id) -> None:
    given = {'--coordinator / DREAMVLA_COORDINATOR': coordinator,
             '--num-processes / DREAMVLA_NUM_PROCESSES': num_processes,
             '--process-id / DREAMVLA_PROCESS_ID': process_id}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"a multi-process run needs all of coordinator, num-processes and process-id; "
                         f"missing {', '.join(missing)}.")
    if ':' not in coordinator:
        raise ValueError(f"--coordinator {coordinator!r} must be HOST:PORT (process 0's address).")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in 0..{num_processes - 1} "
                         f"(--num-processes {num_processes}).")


def _enable_cpu_collectives() -> None:
    # Cross-process computations on CPU devices need a collectives backend; without one XLA fails at
    # the first all-reduce. GPUs and TPUs ignore this setting.
    if str(jax.config.jax_cpu_collectives_implementation or 'none').lower() == 'none':
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def _slurm_node_device_ids() -> list[int] | None:
    """All GPUs of the node when SLURM runs one task per node (None elsewhere: JAX decides).

    Under SLURM, JAX pins each process to the GPU numbered by its local task id (even with an explicit
    coordinator), which is right for one task per GPU but would leave a one-task-per-node job with one
    GPU per node. ``JAX_LOCAL_DEVICE_IDS``, when set, wins over both.
    """
    if os.environ.get('JAX_LOCAL_DEVICE_IDS') or 'SLURM_PROCID' not in os.environ:
        return None
    if _int_env('SLURM_NTASKS_PER_NODE') != 1 and \
            os.environ.get('SLURM_STEP_TASKS_PER_NODE', '').split('(')[0].split(',')[0] != '1':
        return None
    gpus = _int_env('SLURM_GPUS_ON_NODE')
    return list(range(gpus)) if gpus else None


def _tpu_hosts() -> int:
    names = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get('TPU_WORKER_HOSTNAMES') or ''
    return len([n for n in names.split(',') if n.strip()])


def _int_env(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default
