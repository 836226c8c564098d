"""The training loop: data -> sharded train step -> metrics and checkpoints, resumable exactly.

Reads top to bottom in banners, big_vision style: mesh, input, model and optimizer, (resume | init),
compile, loop. Exactness: the train step is pure, its randomness folds in the step number, and each
checkpoint stores the Grain iterator state of the last batch CONSUMED (not the prefetched ones), so a
run killed at any point and restarted reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from dreamvla_jax import sharding as shd
from dreamvla_jax.training import checkpoint as ckpt_lib
from dreamvla_jax.training import metrics as metrics_lib
from dreamvla_jax.training import state as state_lib


class NonFiniteLoss(RuntimeError):
    pass


class DevicePrefetcher:
    """Keeps ``size`` batches in flight to the devices; yields ``(global_batch, iterator_state)`` where
    the state is the iterator's position right after that batch (what a checkpoint must record)."""

    def __init__(self, iterator, sharding, size: int = 2):
        self.iterator, self.sharding, self.size = iterator, sharding, max(1, size)
        self.queue = collections.deque()

    def _fill(self):
        while len(self.queue) < self.size:
            local = next(self.iterator)
            state = self.iterator.get_state() if hasattr(self.iterator, 'get_state') else None
            self.queue.append((shd.global_batch(local, self.sharding), state))

    def __iter__(self):
        return self

    def __next__(self):
        self._fill()
        return self.queue.popleft()


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after every step (save, then exit).

    With several processes, JAX's preemption service (started by ``jax.distributed.initialize``) owns
    SIGTERM and picks one step at which every process stops: the checkpoint save is collective, so a
    process stopping alone would leave the others waiting for it.
    """

    def __init__(self):
        self.requested = False
        self._old = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def reached(self, step: int) -> bool:
        """Whether to stop after ``step`` (the same answer on every process)."""
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops logged lines after ``step`` (they will be logged again, identically, after a resume)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)['step'] <= step]
    path.write_text(''.join(ln + '\n' for ln in lines))


def load_initial_weights(config, state, frozen):
    """Applies ``config.init.pretrained`` (convert_weights output) / ``config.init.official``."""
    if config.init.pretrained:
        from dreamvla_jax.convert.pretrained import load_pretrained, merge_into

        pre = load_pretrained(config.init.pretrained)
        for tree in (state['params'], frozen):
            pure = tree.to_pure_dict()
            parts = {k: v for k, v in pre.items() if k in pure}
            nnx.replace_by_pure_dict(tree, merge_into(pure, parts))
        missing = set(pre) - set(state['params'].to_pure_dict()) - set(frozen.to_pure_dict())
        assert not missing, missing
    if config.init.official:
        from dreamvla_jax.convert.official import load_official_into

        load_official_into(config.init.official, state['params'], frozen)
    return state, frozen


def train(config, workdir: str | Path, *, iterator=None, steps_per_epoch: int | None = None,
          stop_at: int | None = None, progress: bool = True) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint). Returns the last metrics.

    ``iterator``/``steps_per_epoch`` replace the Grain pipeline (tests); ``stop_at`` ends the run
    early at that step (as a preemption would, with a checkpoint).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    # Wall-clock budget (config.train.time_limit_s > 0): stop with a checkpoint once exceeded; a rerun
    # resumes. One process only: separate clocks would stop processes at different steps.
    time_limit = float(config.train.get('time_limit_s', 0) or 0)
    if time_limit > 0 and jax.process_count() > 1:
        raise ValueError('config.train.time_limit_s works with one process only; use train.steps')
    t_start = time.perf_counter()

    # ------------------------------------------------------------------ mesh
    mesh = shd.make_mesh(config)

    # ------------------------------------------------------------------ input
    own_iterator = iterator is None
    if own_iterator:
        from dreamvla_jax.data import pipeline

        source = pipeline.make_source(config)
        steps_per_epoch = max(1, len(source) // config.train.batch_size)
        iterator = pipeline.make_iterator(config, source=source)
    total = int(config.train.steps) or int(config.train.epochs * steps_per_epoch)

    # ------------------------------------------------------------------ model, optimizer, shardings
    trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total)
    checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', every=config.checkpoint.every,
                                         keep=config.checkpoint.keep)
    metrics_path = workdir / 'metrics.jsonl'

    # ------------------------------------------------------------------ resume or init
    latest = checkpointer.latest_step()
    with jax.set_mesh(mesh):
        if latest is not None:
            abs_state, abs_frozen = jax.eval_shape(lambda: state_lib.init_state(config, trainer.tx))
            state, frozen, data_state = checkpointer.restore(
                latest, ckpt_lib.abstract_with_shardings(abs_state, trainer.state_shardings),
                ckpt_lib.abstract_with_shardings(abs_frozen, trainer.frozen_shardings))
            if data_state and hasattr(iterator, 'set_state'):
                iterator.set_state(data_state)
            if is_main:
                _truncate_metrics(metrics_path, latest)
                print(f"Resumed from {checkpointer.directory / str(latest)} at step {latest}.", flush=True)
        else:
            state, frozen = state_lib.create_state(trainer)
            state, frozen = load_initial_weights(config, state, frozen)
    step = int(jax.device_get(state['step']))

    # ------------------------------------------------------------------ compile
    prefetch = DevicePrefetcher(iterator, trainer.batch_sharding, config.data.prefetch)
    logger = metrics_lib.MetricsLogger(workdir, enabled=is_main)
    if step >= total:
        checkpointer.close()
        if own_iterator:
            iterator.close()
        return {}
    first_batch, first_state = next(prefetch)
    with jax.set_mesh(mesh):
        traced = trainer.step_fn.trace(state, frozen, first_batch)
        compiled = traced.lower().compile()
    # Matmul FLOPs per device for MFU, from the jaxpr (XLA's cost analysis counts a scanned stack once).
    flops = metrics_lib.matmul_flops(traced.jaxpr) / jax.device_count()
    global_batch = int(first_batch['robot_obs'].shape[0])

    # ------------------------------------------------------------------ loop
    last = {}
    pending = None  # (step, metrics) of the previous step: checked one step behind to avoid a sync stall
    bar = tqdm(total=total, initial=step, desc='train', disable=not (progress and is_main), dynamic_ncols=True)
    t_log, steps_since_log = time.perf_counter(), 0
    batch, data_state = first_batch, first_state
    with _Preemption() as preempt, jax.set_mesh(mesh):
        while step < total:
            state, metrics = compiled(state, frozen, batch)
            step += 1
            steps_since_log += 1
            if pending is not None and config.train.nan_check:
                _check_finite(*pending, checkpointer)
            pending = (step, metrics)
            log_now = step % config.train.log_every == 0 or step == total
            save_now = checkpointer.every > 0 and step % checkpointer.every == 0
            out_of_time = time_limit > 0 and time.perf_counter() - t_start > time_limit
            stop = preempt.reached(step) or (stop_at is not None and step >= stop_at) or out_of_time
            if log_now or save_now or stop or step == total:
                _check_finite(step, metrics, checkpointer)
                pending = None
            if log_now:
                host = {'step': step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
                dt = (time.perf_counter() - t_log) / steps_since_log
                host.update(step_time=dt, windows_per_s=global_batch / dt,
                            mfu=metrics_lib.mfu(flops, dt, jax.devices()))
                logger.log(step, {k: v for k, v in host.items() if k != 'step'})
                bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.2e}")
                last = host
                t_log, steps_since_log = time.perf_counter(), 0
            if save_now or stop or step == total:
                checkpointer.save(step, state, frozen, data_state, config, force=stop or step == total)
            bar.update(1)
            if stop:
                checkpointer.wait()
                why = ('SIGTERM' if preempt.requested else
                       f'time_limit_s={time_limit:g}' if out_of_time else f'stop_at={stop_at}')
                if is_main:
                    print(f"\nStopped at step {step} ({why}); checkpoint saved in "
                          f"{checkpointer.directory / str(step)}.", flush=True)
                break
            if step < total:
                batch, data_state = next(prefetch)
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    logger.close()
    if own_iterator:  # stops the Grain worker processes before the interpreter exits
        iterator.close()
    return last


def _check_finite(step: int, metrics: dict, checkpointer) -> None:
    loss, pnorm = (float(x) for x in jax.device_get((metrics['loss'], metrics['param_norm'])))
    if not (np.isfinite(loss) and np.isfinite(pnorm)):
        good = checkpointer.latest_step()
        where = checkpointer.directory / str(good) if good is not None else 'none yet'
        raise NonFiniteLoss(f"the loss became non-finite ({loss}) at step {step}; "
                            f"last good checkpoint: {where}")
