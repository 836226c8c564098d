"""Mesh and sharding rules, declared once.

Mesh: ``(data, fsdp)`` from ``config.mesh`` (``data`` spans hosts, ``fsdp`` the devices within);
axes are Auto, so ``jax.jit`` propagates shardings from the explicit in/out shardings given here.

Parameters and optimizer state: an ordered list of ``(regex, rule)`` overrides from
``config.mesh.rules`` (first match wins; rule 'replicate' or 'fsdp'), then the default FSDP rule
(big_vision's): shard the largest dimension divisible by the ``fsdp`` axis size of every tensor of at
least ``config.mesh.fsdp_min_bytes``; replicate the rest. The layer axis of scanned stacks is never
sharded (the scan walks it). The batch is split over ``(data, fsdp)`` on its leading axis.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def make_mesh(config, devices=None) -> Mesh:
    """The ``(data, fsdp)`` mesh of ``config.mesh`` over all (global) devices.

    ``config.mesh.data`` -1 means one row per process. With several processes the devices are laid out
    in process order (``check_process_layout``), so each process's slice of the global batch lands on
    its own devices.
    """
    n = len(devices) if devices is not None else jax.device_count()
    data = int(config.mesh.data)
    fsdp = int(config.mesh.fsdp)
    if data == -1:
        data = jax.process_count()
    if fsdp == -1:
        if n % data:
            raise ValueError(f"config.mesh.data {data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"config.mesh.data x config.mesh.fsdp = {data} x {fsdp} != {n} devices")
    kw = {} if devices is None else {'devices': devices}
    mesh = jax.make_mesh((data, fsdp), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2, **kw)
    if jax.process_count() > 1 and not _in_process_order(mesh):
        # make_mesh follows the physical topology, which may interleave hosts; the batch layout needs
        # each process's devices to be one contiguous run of the flattened (data, fsdp) grid.
        ordered = sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.array(ordered).reshape(data, fsdp), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2)
    check_process_layout(mesh)
    return mesh


def _in_process_order(mesh: Mesh) -> bool:
    procs = [d.process_index for d in mesh.devices.flat]
    return procs == sorted(procs)


def check_process_layout(mesh: Mesh) -> None:
    """Asserts the multi-process batch layout: the flattened ``(data, fsdp)`` devices are grouped by
    process in process order (``global_batch`` then concatenates the processes' local batches in order,
    so a run on P processes sees the same global batch as on one), and when ``data`` is a multiple of
    the process count, each process owns whole rows of the ``data`` axis (its ``fsdp`` groups stay within
    the host)."""
    if not _in_process_order(mesh):
        raise AssertionError("mesh devices are not grouped by process: "
                             f"{[[d.process_index for d in row] for row in mesh.devices]}")
    pc = len({d.process_index for d in mesh.devices.flat})
    rows = mesh.devices.shape[0]
    if pc > 1 and rows % pc == 0:
        for i, row in enumerate(mesh.devices):
            owners = {d.process_index for d in row}
            if owners != {i // (rows // pc)}:
                raise AssertionError(f"mesh row {i} of the data axis spans processes {sorted(owners)}")


def path_str(path) -> str:
    """'a/b/0/c' for a key path (the names regex rules match against)."""
    parts = []
    for k in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return '/'.join(parts)


def _fsdp_spec(shape, itemsize: int, fsdp: int, min_bytes: int, stacked: bool) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) * itemsize < min_bytes:
        return P()
    dims = sorted(range(1 if stacked else 0, len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            spec = [None] * len(shape)
            spec[d] = 'fsdp'
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, config):
    """NamedShardings for a pytree of (abstract) arrays: params, optimizer state, frozen weights."""
    fsdp = mesh.shape['fsdp']
    min_bytes = int(config.mesh.fsdp_min_bytes)
    rules = [(re.compile(pattern), rule) for pattern, rule in config.mesh.rules]

    def one(path, leaf):
        if not hasattr(leaf, 'shape') or len(leaf.shape) == 0:
            return NamedSharding(mesh, P())
        name = path_str(path)
        stacked = '/layers/' in f'/{name}/'
        for pattern, rule in rules:
            if pattern.search(name):
                if rule == 'replicate':
                    return NamedSharding(mesh, P())
                if rule == 'fsdp':
                    return NamedSharding(mesh, _fsdp_spec(leaf.shape, leaf.dtype.itemsize, fsdp, 0, stacked))
                raise ValueError(f"config.mesh.rules: unknown rule {rule!r} for {pattern.pattern!r} "
                                 "(use 'replicate' or 'fsdp')")
        return NamedSharding(mesh, _fsdp_spec(leaf.shape, leaf.dtype.itemsize, fsdp, min_bytes, stacked))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def unsharded_bytes(tree) -> int:
    """Bytes of the leaves that are fully replicated over a multi-device mesh (for the assertion that
    parameters are sufficiently sharded)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, 'sharding') and leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) > 1:
            total += leaf.size * leaf.dtype.itemsize
    return total


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Host-local numpy batch -> global ``jax.Array`` batch (the leading axes of all processes are
    concatenated in process order)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
