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


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), frozen=ocp.args.StandardSave(frozen),
            data=ocp.args.JsonSave(data_state or {}), config=ocp.args.JsonSave(json.loads(config.to_json())),
            meta=ocp.args.JsonSave({'format_version': FORMAT_VERSION, 'step': int(step)}))
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state, abstract_frozen):
        """``(state, frozen, data_state)`` of ``step``, placed in the shardings of the abstract trees."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        if meta.get('format_version') != FORMAT_VERSION:
            raise ValueError(f"checkpoint {self.directory / str(step)} has format version "
                             f"{meta.get('format_version')}; this code reads version {FORMAT_VERSION}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), frozen=ocp.args.StandardRestore(abstract_frozen),
            data=ocp.args.JsonRestore()))
        return out['state'], out['frozen'], out['data']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """``ShapeDtypeStruct`` leaves carrying the target shardings (restore places arrays there)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_model_weights(path: str | os.PathLike, step: int | None = None):
    """``(params, frozen, config_dict)`` of a training checkpoint, as host numpy trees (for eval)."""
    ckpt_dir = Path(path)
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"--checkpoint: no checkpoint directory at {ckpt_dir}")
    root = ckpt_dir / 'checkpoints' if (ckpt_dir / 'checkpoints').is_dir() else ckpt_dir
    manager = ocp.CheckpointManager(root.absolute(), item_names=ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"--checkpoint: {root} holds no checkpoint")
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), frozen=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    manager.close()
    return out['state']['params'], out['frozen'], out['config']
