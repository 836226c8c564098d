"""Orbax checkpoints of a training run: train state, frozen weights, data-iterator state, config.

Layout (``<workdir>/checkpoints/<step>/``): ``state`` (trained params, optimizer state, step, rng),
``frozen`` (the frozen encoders, so a checkpoint alone is enough to evaluate), ``data`` (the Grain
iterator state as JSON: resuming replays no batch and skips none), ``config`` (JSON), ``meta``
(format version). Saves are asynchronous; ``wait()`` before exiting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
ITEMS = ('state', 'frozen', 'data', 'config', 'meta')
_CPU_HANDLER_SET = False


def _no_replica_parallel_on_cpu() -> None:
    """Saves each replicated array from one replica on CPU backends.

    Orbax's replica-parallel save (its default off GPU) slices every replicated array across its devices
    with one small jit per shape and device: hundreds of compilations, about 20 s per save of the debug
    model on CPU, for no gain there. TPU keeps the default. Called after ``jax.distributed`` is set up
    (asking for the backend earlier would pin it to this process's devices).
    """
    global _CPU_HANDLER_SET
    if _CPU_HANDLER_SET or jax.default_backend() != 'cpu':
        return
    from absl import logging
    from orbax.checkpoint._src.metadata import array_metadata_store  # the default handler's; no public name

    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                             array_metadata_store=array_metadata_store.Store())
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # the registry warns about every override
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        logging.set_verbosity(verbosity)
    _CPU_HANDLER_SET = True


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
        _no_replica_parallel_on_cpu()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.every = every

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, frozen, data_state: dict | None, config, *, force: bool = False) -> bool:
        """Saves when ``step`` is a multiple of ``every`` (or ``force``). Returns whether it saved."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        items = dict(state=ocp.args.StandardSave(state),
                     data=ocp.args.JsonSave(data_state or {}), config=ocp.args.JsonSave(json.loads(config.to_json())),
                     meta=ocp.args.JsonSave({'format_version': FORMAT_VERSION, 'step': int(step)}))
        if jax.tree.leaves(frozen):  # Orbax refuses an empty item: nothing frozen (model.freeze = ()) saves none
            items['frozen'] = ocp.args.StandardSave(frozen)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, abstract_frozen):
        """``(state, frozen, data_state)`` of ``step``, placed in the shardings of the abstract trees."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        if meta.get('format_version') != FORMAT_VERSION:
            raise ValueError(f"checkpoint {self.directory / str(step)} has format version "
                             f"{meta.get('format_version')}; this code reads version {FORMAT_VERSION}")
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        if jax.tree.leaves(abstract_frozen):
            items['frozen'] = ocp.args.StandardRestore(abstract_frozen)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out['state'], out['frozen'] if 'frozen' in items else abstract_frozen, out['data']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """``ShapeDtypeStruct`` leaves carrying the target shardings (restore places arrays there)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_model_weights(path: str | os.PathLike, step: int | None = None):
    """``(params, frozen, config_dict)`` of a training checkpoint, as host numpy trees (for eval).

    ``path``: a training workdir, its ``checkpoints`` folder (newest step unless ``step``) or one step's folder.
    """
    ckpt_dir = Path(path)
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"--checkpoint: no checkpoint directory at {ckpt_dir}")
    root = ckpt_dir / 'checkpoints' if (ckpt_dir / 'checkpoints').is_dir() else ckpt_dir
    if step is None and ckpt_dir.name.isdigit() and (ckpt_dir / 'state').is_dir():
        root, step = ckpt_dir.parent, int(ckpt_dir.name)  # one step's folder: <workdir>/checkpoints/<step>
    handlers = {'state': ocp.StandardCheckpointHandler(), 'frozen': ocp.StandardCheckpointHandler(),
                **{name: ocp.JsonCheckpointHandler() for name in ('data', 'config', 'meta')}}
    manager = ocp.CheckpointManager(root.absolute(), item_names=ITEMS, item_handlers=handlers)
    steps = sorted(manager.all_steps())  # one listing of the folder serves both checks
    if not steps:
        raise FileNotFoundError(f"--checkpoint: {root} holds no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"--checkpoint: {root} has no step {step} (it has steps {steps})")
    # Restore onto this process's first device whatever mesh wrote the checkpoint (a run on 8 devices
    # is evaluated on 1): the saved shardings would need the writer's topology.
    meta = manager.item_metadata(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = lambda tree: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    items = dict(state=ocp.args.StandardRestore(target(meta['state'])), config=ocp.args.JsonRestore())
    if meta.get('frozen') is not None:  # absent when the run froze nothing
        items['frozen'] = ocp.args.StandardRestore(target(meta['frozen']))
    out = manager.restore(step, args=ocp.args.Composite(**items))
    manager.close()
    frozen = _unwrap_variables(out['frozen']) if 'frozen' in items else {}
    return _unwrap_variables(out['state']['params']), frozen, out['config']


def _unwrap_variables(tree):
    """Restored without a target, each saved ``nnx.Variable`` comes back as ``{'value': array}``; the
    model's pure dicts (``_fill``) hold the arrays themselves."""
    if isinstance(tree, dict):
        if set(tree) == {'value'} and not isinstance(tree['value'], dict):
            return tree['value']
        return {k: _unwrap_variables(v) for k, v in tree.items()}
    return tree


def _fill(pure: dict, loaded: dict, where: str) -> list[str]:
    """Copies ``loaded`` leaves into ``pure`` (same nested keys), checking shapes; returns the
    top-level modules ``loaded`` lacks."""
    import numpy as np

    missing = []
    for name, sub in pure.items():
        key = name if name in loaded else str(name)  # Orbax stores the int keys of nnx.List as strings
        if key not in loaded:
            missing.append(name)
            continue
        src, dst = loaded[key], sub
        if isinstance(dst, dict):
            if not isinstance(src, dict):
                raise ValueError(f"{where}: '{name}' is a tensor in the checkpoint but a module in the model")
            inner = _fill(dst, src, where)
            if inner:
                raise ValueError(f"{where}: '{name}' lacks {inner[:5]} (was it written for another config?)")
        else:
            value = np.asarray(src)
            if tuple(value.shape) != tuple(dst.shape):
                raise ValueError(f"{where}: '{name}' has shape {list(value.shape)}, the model expects "
                                 f"{list(dst.shape)} (was it written for another config?)")
            pure[name] = value.astype(dst.dtype)
    return missing


def load_model_state(config, path: str | os.PathLike, step: int | None = None):
    """A ``DreamVLA`` holding the weights of a training checkpoint (``<workdir>`` or
    ``<workdir>/checkpoints``) or of a ``convert_weights --dreamvla/--seer`` output.

    Frozen encoders missing from a converted checkpoint (converted without ``--clip``/``--mae``) keep
    their random init, with a warning: give those folders for meaningful features.
    """
    from flax import nnx

    from dreamvla_jax.models import dreamvla

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: nothing at {path}")
    if (path / 'params').is_dir() and (path / 'metadata').is_dir():
        from dreamvla_jax.convert.official import load_converted

        loaded, _ = load_converted(path)
    else:
        params, frozen, _ = load_model_weights(path, step)
        loaded = {**params, **frozen}
    abstract = dreamvla.abstract_model(config)
    graphdef, state = nnx.split(abstract)
    pure = nnx.state(abstract, nnx.Param).to_pure_dict()
    missing = _fill(pure, loaded, str(path))
    if missing:
        frozen_names = set(config.model.freeze)
        if set(missing) - frozen_names:
            raise ValueError(f"{path}: the checkpoint lacks {sorted(set(missing) - frozen_names)} "
                             "(was it written for another config?)")
        print(f"warning: {path} holds no {missing}; they keep their random init "
              "(convert with --clip/--mae to fill them).", flush=True)
        init_pure = nnx.state(dreamvla.init_model(config), nnx.Param).to_pure_dict()
        for name in missing:
            pure[name] = init_pure[name]
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, pure))
    return nnx.merge(graphdef, state)
