"""DreamVLA in JAX/Flax NNX."""

import os as _os

# XLA:CPU aborts the whole process (SIGABRT, no Python exception) when one device thread of a collective
# waits longer than its rendezvous timeout. With fake CPU devices (--xla_force_host_platform_device_count)
# on a busy 2-core machine a sharded train step can legitimately take that long, so raise the timeouts to an
# hour unless the user set them. Only read when JAX creates its CPU backend, i.e. after this import.
_CPU_COLLECTIVE_TIMEOUTS = {
    'xla_cpu_collective_timeout_seconds': 3600,
    'xla_cpu_collective_call_terminate_timeout_seconds': 3600,
}


def _raise_cpu_collective_timeouts() -> None:
    flags = _os.environ.get('XLA_FLAGS', '')
    extra = [f'--{k}={v}' for k, v in _CPU_COLLECTIVE_TIMEOUTS.items() if k not in flags]
    if extra:
        _os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()


_raise_cpu_collective_timeouts()
