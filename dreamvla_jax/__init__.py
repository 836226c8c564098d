"""DreamVLA in JAX/Flax NNX."""

import os as _os

# XLA:CPU aborts the whole process (SIGABRT, no Python exception) when the device threads of a collective
# arrive further apart than its rendezvous timeout. With fake CPU devices (--xla_force_host_platform_device_count)
# on a busy 2-core machine, 8 device threads share 2 cores and a large sharded step can legitimately skew that
# much, so allow 10 minutes unless the user set the flags (a real deadlock still ends in an abort with XLA's
# message). Read when JAX creates its CPU backend, i.e. after this import. The deadlock that XLA:CPU's
# collectives inside loops can cause is avoided in ``models.layers._unroll_scans``.
_CPU_COLLECTIVE_TIMEOUTS = {
    'xla_cpu_collective_timeout_seconds': 600,
    'xla_cpu_collective_call_terminate_timeout_seconds': 600,
}


def _raise_cpu_collective_timeouts() -> None:
    flags = _os.environ.get('XLA_FLAGS', '')
    extra = [f'--{k}={v}' for k, v in _CPU_COLLECTIVE_TIMEOUTS.items() if k not in flags]
    if extra:
        _os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()


_raise_cpu_collective_timeouts()
