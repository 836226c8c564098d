"""Loads an ml_collections config file given as ``path/to/file.py[:arg]`` (big_vision's command-line form)."""

from __future__ import annotations

import importlib.util
import os

from dreamvla_jax.data.errors import DataError


def load_config(spec: str):
    """``'configs/calvin.py:debug'`` -> ``get_config('debug')`` of that file (arg optional)."""
    path, _, arg = spec.partition(':')
    if not os.path.isfile(path):
        raise DataError(f"--config {spec}: no such file {path}.")
    name = '_dreamvla_config_' + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise DataError(f"--config {spec}: {path} defines no get_config().")
    return module.get_config(arg or None)
