"""Shared command-line plumbing: config loading and one-sentence errors instead of tracebacks."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import ml_collections


class UsageError(ValueError):
    """Bad input from the user: a missing file, a wrong flag, an inconsistent config."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` the way ``--config`` does (``get_config(arg)``)."""
    path, _, arg = spec.partition(':')
    if not Path(path).is_file():
        raise UsageError(f"--config: no config file at {path!r} (expected e.g. configs/calvin.py:debug)")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise UsageError(f"--config: {path} defines no get_config(arg)")
    return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` arguments (as ``train`` takes them) to ``config`` in place.

    Values are Python literals (``3``, ``1e-3``, ``True``, ``(1, 2)``, ``'x'``) or, failing that, plain
    strings; ml_collections keeps each field's type (an int where a float lives becomes a float).
    """
    import ast

    for arg in overrides:
        key, sep, raw = arg[len('--config.'):].partition('=') if arg.startswith('--config.') else ('', '', '')
        if not key or not sep:
            raise UsageError(f"unrecognized argument {arg!r} (config overrides look like --config.train.lr=1e-4)")
        node, leaf = _field(config, key)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            node[leaf] = value
        except TypeError as e:
            raise UsageError(f"--config.{key}={raw}: {e}") from e
    return config


def _field(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """``(parent node, leaf name)`` of the dotted field ``key``; one sentence if the config lacks a part."""
    parts = key.split('.')
    node = config
    for i, name in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise UsageError(f"--config.{key}: the config has no field {'.'.join(parts[:i + 1])!r}")
        if i < len(parts) - 1:
            node = node[name]
    return node, parts[-1]


def check_override_keys(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """One sentence for a ``--config.a.b[=value]`` naming a field the config lacks (absl's config_flags
    would raise a bare AttributeError traceback from inside flag parsing)."""
    for arg in argv:
        if arg.startswith('--config.'):
            _field(config, arg[len('--config.'):].partition('=')[0])


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith('--config='):
            return a.split('=', 1)[1]
        if a == '--config' and i + 1 < len(argv):
            return argv[i + 1]
    return None


def run(main) -> None:
    """``absl.app.run(main)`` after checking ``--config`` so a bad config file or preset is one
    sentence rather than absl's embedded traceback."""
    from absl import app

    spec = _config_arg(sys.argv[1:])
    if spec is not None and not os.environ.get('DREAMVLA_DEBUG'):
        try:
            config = load_config(spec)
            check_override_keys(config, sys.argv[1:])
        except Exception as e:  # noqa: BLE001 - any failure here is the config file's fault
            msg = e.args[0] if e.args else repr(e)
            prefix = '' if isinstance(e, UsageError) else f"--config {spec}: "
            print(f"error: {prefix}{msg}", file=sys.stderr)
            sys.exit(2)
    app.run(friendly_errors(main))


def friendly_errors(main):
    """Wraps an entry point: user-facing errors print one line and exit 2.

    Set ``DREAMVLA_DEBUG=1`` to get the full traceback instead.
    """
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if os.environ.get('DREAMVLA_DEBUG'):
            return main(*args, **kwargs)
        try:
            return main(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as e:  # DataError, ConvertError, UsageError, ...
            msg = e.args[0] if e.args else repr(e)
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
    return wrapper
