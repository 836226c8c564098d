"""Test setup: 8 fake CPU devices for every test (must happen before jax is imported)."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
# Many tests (and the subprocesses they start) compile the same debug-model programs: share them through
# JAX's persistent compilation cache (keyed by the program and the JAX version, so it never goes stale).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(__import__('tempfile').gettempdir(), 'dreamvla_jax_test_jit_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import dreamvla_jax  # noqa: E402,F401  (raises XLA:CPU's collective timeouts before JAX makes its backend)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'configs'))


@pytest.fixture(scope='session')
def root():
    return ROOT


def load_config(preset='debug'):
    """The configs/calvin.py preset, as the command line would build it."""
    import calvin  # configs/calvin.py
    return calvin.get_config(preset)
